"""The web app's handlers (spin_lite.app: workspace, form, preview, processes, views, chat, export) as plain
functions, on real files and a tiny model.

    python -m pytest -q tests/test_app.py

One workspace holds a tiny random Llama (the real SmolLM2 tokenizer and chat template) and the demo data;
the run tests launch real `spin-lite run` processes in it, as the app does, and read back what the page shows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from spin_lite.app import chat, form, preview, processes, views, workspace
from spin_lite.app import export as app_export
from spin_lite.config import ConfigError, SpinConfig, load_config
from spin_lite.data import DataError
from spin_lite.model import ModelError
from spin_lite.state import RunDir, flatten

from conftest import hold_run, make_tiny_model, recorded_launch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "data" / "demo_sft.jsonl"
# The tiny run of these tests and the browser test: 8 training prompts, 4 held out, 8 new tokens.
TINY = {"model.name": "models/tiny", "data.path": "data/demo_sft.jsonl", "data.max_examples": 8,
        "data.eval_size": 4, "data.max_prompt_length": 96, "data.max_length": 160, "generation.max_new_tokens": 8,
        "generation.batch_size": 8, "train.epochs": 1, "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2, "train.learning_rate": 0.01, "train.gradient_checkpointing": False,
        "eval.max_new_tokens": 8, "iterations": 1,
        # 4 validation rows; the stop rule judges but does not stop, so Continue always has an iteration to run
        "data.val_size": 4, "train.stop_when": "never"}


def make_workspace(root: Path) -> Path:
    """A workspace with models/tiny (2-layer Llama, real tokenizer) and data/demo_sft.jsonl."""
    from spin_lite.config import ModelConfig
    from spin_lite.model import embedded_model_dir, load_tokenizer

    make_tiny_model(root / "models" / "tiny", load_tokenizer(ModelConfig(name=str(embedded_model_dir()))))
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO, root / "data" / DEMO.name)
    return root


def made_run(ws: Path, rel: str) -> Path:
    """A run directory as a run leaves it before its first stage: config.yaml, state.json, its lock file."""
    run = ws / rel
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(tiny_config(rel).to_yaml())
    RunDir(run).lock().close()
    (run / "state.json").write_text("{}")
    return run


def tiny_config(run_dir: str, **extra) -> SpinConfig:
    return load_config(None, [f"{k}={v}" for k, v in {**TINY, "run_dir": run_dir, **extra}.items()])


def wait_until_stopped(ws, run_dir: str, timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = processes.run_status(ws, run_dir)
        if status["status"] != "running":
            return status
        time.sleep(0.3)
    raise AssertionError(f"{run_dir} still running after {timeout_s} s:\n{views.run_log(ws, run_dir)}")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    # One thread per run process: the CPU is shared, and a tiny model gains nothing from more.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    root = make_workspace(tmp_path_factory.mktemp("workspace"))
    yield root
    for run in views.list_runs(root):
        if processes.run_status(root, run)["status"] == "running":
            processes.abort_run(root, run, grace_s=2)
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def finished_run(ws):
    """runs/tiny: one iteration started as the Run tab starts it, run to the end."""
    message = processes.start_run(ws, tiny_config("runs/tiny"))
    assert "started" in message
    with pytest.raises(workspace.AppError, match="already running"):  # one run per run directory at a time
        processes.start_run(ws, tiny_config("runs/tiny"))
    status = wait_until_stopped(ws, "runs/tiny")
    assert status["status"] == "finished", views.run_log(ws, "runs/tiny")
    return "runs/tiny"


# -- the settings form ------------------------------------------------------------------------------------------
def test_form_has_every_setting_with_the_configs_default():
    cfg = SpinConfig()
    flat = flatten(cfg.to_dict())
    assert [s.key for s in form.settings()] == list(flat)
    assert all(s.help for s in form.settings())
    assert form.config_from_form(form.form_values(cfg)) == cfg
    assert form.cli_overrides(cfg) == []


def test_form_round_trip_and_cli_command_are_the_same_config(tmp_path):
    cfg = tiny_config("runs/x", **{"train.beta": "[0.1, 0.2]", "data.system_prompt": "'Be brief: yes.'",
                                   "eval.match_regex": "'^In short: '", "mode": "merge"})
    values = form.form_values(cfg)
    assert form.config_from_form(values) == cfg
    command = form.cli_command(tmp_path, cfg)
    assert command.splitlines()[0] == f"cd {tmp_path.resolve()}"
    args = shlex.split(command.splitlines()[1])
    assert args[:2] == ["spin-lite", "run"]
    assert load_config(None, args[2:]) == cfg



def test_a_changed_ratio_sets_the_rate_in_the_form():
    """The CPU demo preset sets SPIN's rate as a ratio of the SFT rate; the form shows the rate it gave. Changing
    the ratio or the SFT rate there sets the rate anew, instead of being refused as disagreeing with the one shown."""
    keys = [s.key for s in form.settings()]
    values = form.form_values(load_config(REPO / "examples" / "configs" / "demo.yaml"))
    values[keys.index("train.lr_ratio_to_sft")] = "0.5"
    assert form.config_from_form(values).train.learning_rate == pytest.approx(0.5 * 2e-4)
    values[keys.index("sft.learning_rate")] = 1e-4
    assert form.config_from_form(values).train.learning_rate == pytest.approx(0.5 * 1e-4)

def test_form_values_typed_by_hand():
    keys = [s.key for s in form.settings()]
    values = form.form_values(SpinConfig())
    values[keys.index("train.learning_rate")] = "5e-5"  # YAML 1.1 reads this as a string
    values[keys.index("data.max_examples")] = " 12 "
    cfg = form.config_from_form(values)
    assert cfg.train.learning_rate == 5e-5 and cfg.data.max_examples == 12
    values[keys.index("train.beta")] = "abc"
    values[keys.index("data.max_examples")] = "twelve"
    with pytest.raises(ConfigError) as e:
        form.config_from_form(values)
    assert "train.beta" in str(e.value) and "data.max_examples" in str(e.value)  # every problem at once


def test_presets_are_the_shipped_configs():
    """Each preset is its shipped config (examples/configs, carried in the package as spin_lite/presets), as the
    form opens on it; the CPU demo reads the demo rows shipped in the package, so it works in any workspace."""
    for name, (file, overrides) in form.PRESETS.items():
        shipped = REPO / "examples" / "configs" / file
        assert (form.PRESETS_DIR / file).read_bytes() == shipped.read_bytes()
        cfg = form.preset_config(name)
        assert cfg == load_config(shipped, overrides) and form.config_from_form(form.form_values(cfg)) == cfg
    demo = form.preset_config("CPU demo")
    assert demo.data.path == "sample:demo" and demo.model.name == "embedded"
    assert demo == load_config(REPO / "examples" / "configs" / "demo.yaml", ["data.path=sample:demo"])
    t4, big = form.preset_config("T4 16 GB QLoRA"), form.preset_config("24 GB QLoRA")
    assert t4.model.load_in_4bit and t4.model.dtype == "float16" and big.model.load_in_4bit  # a T4: no bfloat16
    # the recipe the README recommends, in every preset: the anchor, patience 2, sampling at temperature 1
    assert all(c.train.sft_weight == 1.0 and c.train.stop_patience == 2 and c.generation.temperature == 1.0
               for c in (demo, t4, big))
    with pytest.raises(workspace.AppError, match="unknown preset 'nope'"):
        form.preset_config("nope")


def test_the_recommended_preset_follows_the_machine():
    assert form.recommended_preset(None) == "CPU demo"  # no CUDA
    assert form.recommended_preset(14.6) == "T4 16 GB QLoRA"  # what a T4 reports
    assert form.recommended_preset(23.6) == "24 GB QLoRA"  # an RTX 4090
    assert form.recommended_preset(139.8) == "24 GB QLoRA"


def test_the_first_screen_opens_on_the_recommended_preset(tmp_path, monkeypatch):
    """The page built for a machine without CUDA shows the CPU demo preset in every input, and one with a 24 GB
    GPU the 24 GB one; the settings that matter first are above "Advanced", every other one in one topic."""
    pytest.importorskip("gradio")
    from spin_lite.app import ui

    specs = form.settings()
    assert {form.topic(s.key) for s in specs} == {None} | {tid for _, tid, _ in form.TOPICS}  # no empty topic
    assert [s.key for s in specs if form.topic(s.key) is None] == sorted(form.FIRST, key=[s.key for s in specs].index)
    for gib, preset in ((None, "CPU demo"), (23.6, "24 GB QLoRA")):
        monkeypatch.setattr(form, "gpu_memory_gib", lambda: gib)
        page = ui.build_demo(tmp_path)
        inputs = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
        assert inputs["preset"].value == preset
        shown = [inputs["cfg-" + s.key.replace(".", "-")].value for s in specs]
        assert form.config_from_form(shown) == form.preset_config(preset)
        assert shown == form.form_values(form.preset_config(preset))


def test_save_and_load_a_config(ws, tmp_path):
    cfg = tiny_config("runs/saved")
    path = form.save_config(ws, cfg, "configs/tiny.yaml")
    assert path == ws / "configs" / "tiny.yaml"
    assert form.open_config(ws, "configs/tiny.yaml") == cfg
    (ws / "configs" / "bad.yaml").write_text("iterations: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        form.open_config(ws, "configs/bad.yaml")
    (ws / "configs" / "wrong.yaml").write_text("iterations: 0\ntrain: {beta: -1}\n")
    with pytest.raises(ConfigError, match="iterations.*\n.*train.beta"):
        form.open_config(ws, "configs/wrong.yaml")


# -- the workspace ------------------------------------------------------------------------------------------
def test_paths_outside_the_workspace_are_refused(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.jsonl").write_text(DEMO.read_text())
    (ws / "escape").symlink_to(outside)
    for typed in ("../x", "/etc/passwd", str(outside / "data.jsonl"), "escape/data.jsonl", "data/../../x"):
        with pytest.raises(workspace.AppError, match="outside the workspace"):
            workspace.inside(ws, typed)
    with pytest.raises(workspace.AppError, match="outside the workspace"):
        preview.preview_data(ws, tiny_config("runs/x", **{"data.path": str(outside / "data.jsonl")}))
    with pytest.raises(workspace.AppError, match="outside the workspace"):
        processes.start_run(ws, tiny_config(str(outside / "run")))
    with pytest.raises(workspace.AppError, match="outside the workspace"):
        form.save_config(ws, SpinConfig(), "../config.yaml")
    assert sorted(p.name for p in outside.iterdir()) == ["data.jsonl"]
    assert workspace.inside(ws, "data/demo_sft.jsonl") == ws.resolve() / "data" / "demo_sft.jsonl"
    assert workspace.local_or_hub(ws, "HuggingFaceH4/ultrachat_200k") == "HuggingFaceH4/ultrachat_200k"  # a hub id


@pytest.mark.parametrize("bad, named", [("runs/a\0b", "null character"), ("r" * 5000, "too long for a path"),
                                        ("runs/" + "x" * 256, "too long for a path")], ids=["null", "5000", "256"])
def test_names_no_file_system_takes_are_refused_by_name(ws, bad, named):
    """A null character or an over-long name, on every way a typed path comes in: a named refusal (AppError),
    not the operating system's ValueError or OSError read as a crash."""
    cfg = tiny_config("runs/ok")
    with_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=bad))
    calls = {"inside": lambda: workspace.inside(ws, bad),
             "start": lambda: processes.start_run(ws, dataclasses.replace(cfg, run_dir=bad)),
             "start (data)": lambda: processes.start_run(ws, with_data),
             "continue": lambda: processes.continue_run(ws, bad), "abort": lambda: processes.abort_run(ws, bad),
             "status": lambda: processes.run_status(ws, bad), "save": lambda: form.save_config(ws, cfg, bad),
             "load": lambda: form.open_config(ws, bad), "preview": lambda: preview.preview_data(ws, with_data),
             "estimate": lambda: preview.estimate_time(ws, with_data), "log": lambda: views.run_log(ws, bad),
             "samples": lambda: views.samples(ws, bad, "start"), "menus": lambda: views.model_menus(ws, bad),
             "chat": lambda: list(chat.chat_reply(ws, bad, "start", [{"role": "user", "content": "hi"}])),
             "export": lambda: app_export.export(ws, bad, "best")}
    for name, call in calls.items():
        with pytest.raises(workspace.AppError, match=named) as refused:
            call()
        assert len(str(refused.value)) < 300, name  # the name quoted cut, not 5,000 characters of it


def test_values_of_the_wrong_type_are_refused_by_name(ws):
    """What the API can send that the page cannot: each refused with a message that names the value."""
    for iterations, patience in (("three", None), (2.5, None), (None, -1), (None, True), (None, [2])):
        with pytest.raises(workspace.AppError, match="for Continue must be a whole number >= 0"):
            processes.continue_run(ws, "runs/none", iterations=iterations, stop_patience=patience)
    with pytest.raises(workspace.AppError, match="new tokens per reply: a whole number from 1"):
        next(chat.chat_reply(ws, "runs/none", "start", [], max_new_tokens="many"))
    with pytest.raises(workspace.AppError, match="unknown weight type 'int3'"):
        app_export.export(ws, "runs/none", "best", kind="merged", dtype="int3")
    with pytest.raises(workspace.AppError, match="unknown model 'iter x'"):
        views.samples(ws, "runs/none", "iter x")
    keys = [s.key for s in form.settings()]
    values = form.form_values(SpinConfig())
    values[keys.index("iterations")], values[keys.index("sft.enabled")] = "three", "yes"
    with pytest.raises(ConfigError, match=r"iterations must be an integer, got 'three'[\s\S]*sft.enabled must be true"):
        form.config_from_form(values)
    with pytest.raises(workspace.AppError, match=f"the settings form has {len(keys)} values; got 2"):
        form.config_from_form([1, 2])


def test_upload_goes_to_the_workspace(ws, tmp_path):
    assert workspace.save_upload(ws, DEMO) == "uploads/demo_sft.jsonl"
    assert workspace.save_upload(ws, DEMO) == "uploads/demo_sft.jsonl"  # the same file again: no copy
    other = tmp_path / "demo_sft.jsonl"
    other.write_text(DEMO.read_text().splitlines()[0] + "\n")
    assert workspace.save_upload(ws, other) == "uploads/demo_sft-1.jsonl"


# -- data preview -------------------------------------------------------------------------------------------
def test_preview_shows_rows_with_the_chat_template(ws):
    rows, message = preview.preview_data(ws, tiny_config("runs/x"))
    first = json.loads(DEMO.read_text().splitlines()[0])["messages"]
    assert len(rows) == 5 and "140 rows" in message
    assert rows[0]["prompt"].endswith(f"<|im_start|>user\n{first[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert rows[0]["response"] == first[1]["content"] + "<|im_end|>"
    assert rows[0]["problem"] == "" and rows[0]["prompt tokens"] > 0
    assert rows[0]["raw columns"].startswith('messages: [{"role": "user", "content": ' + json.dumps(first[0]["content"]))
    assert "columns messages (read as chat, data.format: auto)" in message
    # what the model sees and what is wrong first, the file's own columns last
    assert preview.PREVIEW_COLUMNS == ["row", "problem", "prompt", "response", "prompt tokens", "response tokens",
                                       "raw columns"]
    assert all(list(r) == preview.PREVIEW_COLUMNS for r in rows)
    from spin_lite.config import ModelConfig
    from spin_lite.model import load_tokenizer
    tokenizer = load_tokenizer(ModelConfig(name=str(ws / "models" / "tiny")))
    assert rows[0]["prompt tokens"] == len(tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"])


def test_preview_shows_an_alpaca_csv_raw_beside_its_prompt(ws):
    (ws / "data" / "alpaca.csv").write_text("instruction,input,output\nTranslate to French,good morning,bonjour\n")
    rows, message = preview.preview_data(ws, tiny_config("runs/x", **{"data.path": "data/alpaca.csv"}))
    assert rows[0]["raw columns"] == "instruction: Translate to French\ninput: good morning\noutput: bonjour"
    assert "Translate to French" in rows[0]["prompt"] and "good morning" in rows[0]["prompt"]  # input kept
    assert rows[0]["response"] == "bonjour<|im_end|>" and "read as alpaca" in message


def test_preview_reports_bad_data_and_models(ws):
    (ws / "data" / "qa.jsonl").write_text('{"question": "Hi?", "answer": "Hello."}\n')
    rows, message = preview.preview_data(ws, tiny_config("runs/x", **{"data.path": "data/qa.jsonl"}))
    problem = rows[0]["problem"]  # the columns the row has, and the settings that would map them (spin_lite.data)
    assert "('question', 'answer')" in problem and "data.prompt_field=question data.response_field=answer" in problem
    assert "1 of them cannot be used" in message and "no row shown can be used" in message
    assert "skip_bad_rows" not in message  # skipping every row is no advice
    rows, _ = preview.preview_data(ws, tiny_config("runs/x", **{"data.path": "data/qa.jsonl", "data.prompt_field": "question",
                                                           "data.response_field": "answer"}))
    assert rows[0]["problem"] == "" and rows[0]["response"] == "Hello.<|im_end|>"
    (ws / "data" / "broken.jsonl").write_text('{"messages": [\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        preview.preview_data(ws, tiny_config("runs/x", **{"data.path": "data/broken.jsonl"}))
    with pytest.raises(DataError, match="does not exist"):
        preview.preview_data(ws, tiny_config("runs/x", **{"data.path": "data/missing.jsonl"}))
    (ws / "models" / "broken").mkdir()
    (ws / "models" / "broken" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="could not load the tokenizer"):
        preview.preview_data(ws, tiny_config("runs/x", **{"model.name": "models/broken"}))


def test_a_mistyped_model_is_the_clis_message_at_once_when_offline(ws, monkeypatch):
    """A model name that is neither a folder of the workspace nor in the hub cache, offline: the CLI's message
    (spin_lite.preflight), naming the folder tried in the workspace and HF_HUB_OFFLINE, without hub retries."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = tiny_config("runs/x", **{"model.name": "models/tinyy"})
    started = time.time()
    with pytest.raises(ModelError) as check:
        preview.check_model(ws, cfg)
    with pytest.raises(ModelError) as shown:
        preview.preview_data(ws, cfg)
    assert time.time() - started < 10  # no minute of retries
    folder = ws.resolve() / "models" / "tinyy"
    assert str(check.value) == str(shown.value) == (
        f"could not load the tokenizer of model 'models/tinyy' (model.name): no such folder {folder} (relative to "
        f"the workspace {ws.resolve()}), and 'models/tinyy' is not in the hub cache while HF_HUB_OFFLINE is set. "
        "Offline? Use a local folder, or download the model once with network access and set HF_HUB_OFFLINE=1")
    with pytest.raises(ModelError, match="no such folder"):
        processes.start_run(ws, tiny_config("runs/typo", **{"model.name": "models/tinyy"}))
    assert not (ws / "runs" / "typo").exists()


def test_error_messages_for_the_page():
    import torch

    assert "out of memory" in workspace.user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert "out of memory" in workspace.user_message(MemoryError())
    assert workspace.user_message(workspace.AppError("plain")) == "plain"
    assert workspace.user_message(KeyError("x")).startswith("unexpected error: KeyError")


# -- runs -----------------------------------------------------------------------------------------------------
def test_a_finished_run_shows_its_files(ws, finished_run):
    root = ws / finished_run
    assert finished_run in views.list_runs(ws)
    steps = views.step_metrics(ws, finished_run)
    log = [json.loads(line) for line in (root / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert [(s["step"], s["loss"], s["margin"], s["accuracy"]) for s in steps] == \
           [(r["step"], r["loss"], r["margin"], r["accuracy"]) for r in log]
    per_iter = views.iteration_metrics(ws, finished_run)
    assert [r["model"] for r in per_iter] == ["start", "iter 0"]
    assert per_iter[1]["logp_per_token"] == json.loads((root / "iter-00" / "eval.json").read_text())["test"]["logp_per_token"]
    # progress.json: the last stage's, evaluation of the test rows (generation: tests/test_fast_generate.py)
    progress = views.progress(ws, finished_run)
    assert (progress["iteration"], progress["stage"], progress["total"], progress["unit"]) == (0, "evaluate test", 4, "prompts")
    rows = views.results_rows(ws, finished_run)
    assert [r["model"] for r in rows] == ["start", "iter 0"] and "iterations" not in rows[0]
    assert all(v == round(v, 3) for r in rows for v in r.values() if isinstance(v, float))
    assert rows[1]["test logp/tok"] == round(per_iter[1]["logp_per_token"], 3)
    assert "$ spin-lite run -    # the config of runs/tiny checked and started by the app" in views.run_log(ws, finished_run)
    overview = {r["run_dir"]: r for r in views.runs_overview(ws)}
    assert overview[finished_run]["status"] == "finished" and overview[finished_run]["iterations"] == "1/1"


def test_inspect_samples_and_summary(ws, finished_run):
    on_disk = [json.loads(line) for line in (ws / finished_run / "iter-00" / "samples.jsonl").read_text().splitlines()]
    assert views.sample_sets(ws, finished_run) == ["start", "iter 0"]
    table = views.samples(ws, finished_run, "iter 0")
    assert table == [{c: s[c] for c in ("prompt", "real", "opponent", "model")} for s in on_disk]
    word = on_disk[0]["real"].split()[2]
    found = views.samples(ws, finished_run, "iter 0", word.upper())
    assert found and all(word.lower() in " ".join(r.values()).lower() for r in found)
    assert views.samples(ws, finished_run, "iter 0", "no such text anywhere") == []
    assert views.samples(ws, finished_run, "start")[0]["opponent"] == ""
    assert views.summary(ws, finished_run, "iter 0") == json.loads((ws / finished_run / "iter-00" / "summary.json").read_text())


def test_a_changed_config_or_a_foreign_folder_is_refused_and_left_alone(ws, finished_run):
    before = digest(ws / finished_run)
    with pytest.raises(workspace.AppError, match="started with other settings.*train.beta"):
        processes.start_run(ws, tiny_config(finished_run, **{"train.beta": 0.5}))
    with pytest.raises(workspace.AppError, match="not a run directory"):
        processes.start_run(ws, tiny_config("data"))
    assert digest(ws / finished_run) == before
    assert not (ws / "runs" / "never").exists()
    with pytest.raises(DataError):
        processes.start_run(ws, tiny_config("runs/never", **{"data.path": "data/missing.jsonl"}))
    assert not (ws / "runs" / "never").exists()


def test_abort_then_continue(ws, finished_run):
    """Continue the finished run to 2 iterations, abort it while it works, and continue it to the end. Continue
    launches the run's config with the page's changes, checked, on the run's standard input, as Start does."""
    message = processes.continue_run(ws, finished_run, iterations=2)
    assert message.startswith(f"started the run {finished_run} (process ")
    assert not (ws / finished_run / "app-launch.yaml").exists()  # no file in the run directory is the launch
    deadline = time.time() + 120
    while not (ws / finished_run / "iter-01").exists() and time.time() < deadline:  # iteration 1 has begun
        time.sleep(0.02)
    hold_run(ws / finished_run)  # held there, however fast the machine: the abort cannot come after the end
    assert load_config(ws / finished_run / "config.yaml").iterations == 2  # what it runs: written by the run
    assert processes.run_status(ws, finished_run)["status"] == "running"
    assert "aborted" in processes.abort_run(ws, finished_run, grace_s=2)
    status = processes.run_status(ws, finished_run)
    assert status["status"] == "aborted" and status["iterations_done"] == 1
    with pytest.raises(workspace.AppError, match="not running"):
        processes.abort_run(ws, finished_run)
    processes.continue_run(ws, finished_run, iterations=2)
    status = wait_until_stopped(ws, finished_run)
    assert status["status"] == "finished" and status["iterations_done"] == 2, views.run_log(ws, finished_run)
    assert [r["model"] for r in views.iteration_metrics(ws, finished_run)] == ["start", "iter 0", "iter 1"]
    steps = views.step_metrics(ws, finished_run)
    assert [r["global_step"] for r in steps] == list(range(1, len(steps) + 1))
    assert [r["iteration"] for r in steps] == sorted(r["iteration"] for r in steps) and steps[-1]["iteration"] == 1
    assert "aborted from the app" in views.run_log(ws, finished_run, 400)


def test_a_launch_cannot_be_swapped_in_the_seconds_before_the_run_reads_it(ws, tmp_path):
    """The run is a real `spin-lite run -` child, which reads its config some seconds after the check: a config
    planted in the run directory at once (the old channel, app-launch.yaml, naming a run directory and data outside
    the workspace) changes nothing. The run writes the checked config, and nothing lands outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    checked = tiny_config("runs/swap")
    processes.start_run(ws, checked)
    hostile = tiny_config(str(outside / "run"), **{"data.path": str(ws / "data" / "demo_sft.jsonl"), "train.beta": 5})
    (ws / "runs" / "swap" / "app-launch.yaml").write_text(hostile.to_yaml())  # in the window: the child is starting
    try:
        deadline = time.time() + 120
        while not (ws / "runs" / "swap" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert load_config(ws / "runs" / "swap" / "config.yaml") == checked, views.run_log(ws, "runs/swap")
        assert list(outside.iterdir()) == []
    finally:
        if processes.run_status(ws, "runs/swap")["status"] == "running":
            processes.abort_run(ws, "runs/swap", grace_s=2)
    assert list(outside.iterdir()) == []


def test_spin_lite_run_reads_its_config_from_standard_input(tmp_path, monkeypatch, capsys):
    """`spin-lite run -`: the YAML on standard input, overrides after it, every problem reported as for a file."""
    import io

    from spin_lite.cli import load_run_config, main

    monkeypatch.setattr(sys, "stdin", io.StringIO(tiny_config("runs/x").to_yaml()))
    assert load_run_config("-", ["iterations=3"]) == tiny_config("runs/x", iterations=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("iterations: 0\ntrain: {beta: [1\n"))
    assert main(["run", "-"]) == 2 and "the config on standard input is not valid YAML" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("iterations: 0\n"))
    assert main(["run", "-"]) == 2 and "iterations must be >= 1" in capsys.readouterr().err


def test_a_failed_run_says_why(ws):
    """A model whose tokenizer loads but whose weights are missing passes the checks before the launch and
    fails in the run's process; the page shows the run as failed, with the error line of its log."""
    broken = ws / "models" / "no-weights"
    shutil.copytree(ws / "models" / "tiny", broken, ignore=shutil.ignore_patterns("*.safetensors"))
    processes.start_run(ws, tiny_config("runs/fails", **{"model.name": "models/no-weights"}))
    status = wait_until_stopped(ws, "runs/fails")
    assert status["status"] == "failed" and status["returncode"] == 2
    assert status["error"].startswith("error: could not load model 'models/no-weights'")


# -- compare and export ---------------------------------------------------------------------------------------------
def test_chat_streams_both_models(ws, finished_run):
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    start = list(chat.chat_reply(ws, finished_run, "start", question, max_new_tokens=6))
    after = list(chat.chat_reply(ws, finished_run, "iter 0", question, max_new_tokens=6))
    for stream in (start, after):
        assert stream and all(isinstance(t, str) for t in stream)
        assert all(a == b[:len(a)] for a, b in zip(stream, stream[1:]))  # each yield extends the last
    model, _ = chat.chat_model(ws, finished_run, "iter 0")
    assert type(model).__name__ == "PeftModelForCausalLM"
    # The page loads both models at once, from two threads: the same replies as one after the other.
    assert not any(p.requires_grad for p in model.parameters())  # built for inference: frozen
    chat._load_chat_model.cache_clear()
    replies = {}
    threads = [threading.Thread(target=lambda w: replies.__setitem__(w, list(chat.chat_reply(ws, finished_run, w, question, 6))),
                                args=(which,)) for which in ("start", "iter 0")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies["start"][-1] == start[-1] and replies["iter 0"][-1] == after[-1]
    with pytest.raises(workspace.AppError, match="no trained adapter"):
        list(chat.chat_reply(ws, finished_run, "iter 7", question))


def test_export_adapter_zip_and_merged_folder(ws, finished_run):
    assert views.trained_iterations(ws, finished_run)[0] == 0
    archive = app_export.export(ws, finished_run, 0, kind="adapter")
    assert archive == ws / "exports" / "runs+tiny-iter-00-adapter.zip"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zipfile.ZipFile(archive).namelist())
    merged = app_export.export(ws, finished_run, 0, kind="merged")
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(workspace.AppError, match="iteration 5"):
        app_export.export(ws, finished_run, 5, kind="adapter")


def fake_run(root: Path, accepted: list[bool], untrained_after: bool = False) -> Path:
    """A run directory written by hand, no model: the stop rule's verdicts on its iterations (`accepted`), each
    with an adapter folder, samples and a summary; `untrained_after`: one more iteration trained, not evaluated."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(tiny_config(str(root)).to_dict()))
    (root / "eval-start.json").write_text(json.dumps({"metrics": {}, "val": {}, "samples": []}))
    best = "the starting model"
    for t, ok in enumerate(accepted + [None] * untrained_after):
        folder = root / f"iter-{t:02d}"
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        if ok is None:
            continue
        (folder / "samples.jsonl").write_text("")
        reasons = [] if ok else ["val repetitive got worse (0.00 -> 0.50)"]
        (folder / "summary.json").write_text(json.dumps({"iteration": t, "selection": {
            "compared_with": best, "accepted": ok, "reasons": reasons, "rejected_in_a_row": int(not ok), "stop": False}}))
        best = f"iteration {t}" if ok else best
    return root


def test_menus_open_on_the_chosen_model_and_mark_the_rejected(tmp_path):
    """Inspect, Compare and Export open on the model the stop rule chose and name every model with its verdict;
    Export offers "best" and warns of a rejected iteration; a chosen starting model is said plainly."""
    fake_run(tmp_path / "runs" / "r", [True, True, False], untrained_after=True)  # iteration 1 chosen
    menus = views.model_menus(tmp_path, "runs/r")
    rejected = ("iter 2 (rejected by the stop rule)", "iter 2")
    assert menus["inspect"] == ([("start", "start"), ("iter 0", "iter 0"), ("iter 1 (chosen)", "iter 1"), rejected],
                                "iter 1")
    assert menus["compare"] == ([("start", "start"), ("iter 0", "iter 0"), ("iter 1 (chosen)", "iter 1"), rejected,
                                 ("iter 3 (not evaluated)", "iter 3")], "iter 1")
    assert menus["export"] == ([("best = iter 1 (chosen)", "best"), *menus["compare"][0][1:]], "best")
    assert app_export.model_number(tmp_path, "runs/r", "best") == 1 and app_export.export_note(tmp_path, "runs/r", "best") == ""
    assert app_export.export_note(tmp_path, "runs/r", "iter 2") == (
        "**Warning: the stop rule rejected iteration 2: not better than iteration 1 on the validation rows (val "
        "repetitive got worse (0.00 -> 0.50)); the model it chose is iteration 1.**")
    with pytest.raises(workspace.AppError, match="unknown model 'iter x'"):
        app_export.export_note(tmp_path, "runs/r", "iter x")

    fake_run(tmp_path / "runs" / "s", [False, False])  # no iteration better: the starting model is chosen
    menus = views.model_menus(tmp_path, "runs/s")
    assert menus["inspect"][1] == menus["compare"][1] == "start" and menus["compare"][0][0] == ("start (chosen)", "start")
    assert menus["export"][0][:2] == [("best = start (chosen)", "best"), ("start (chosen)", "start")]
    note = app_export.export_note(tmp_path, "runs/s", "best")
    assert note.startswith("The stop rule chose the starting model: no iteration was better on the validation rows.")
    assert "nothing trained to export" in note
    with pytest.raises(workspace.AppError, match="is the starting model: no iteration of run runs/s was better.*nothing "
                                         "trained to export"):
        app_export.export(tmp_path, "runs/s", "best")  # the CLI's refusal, in the page
    assert not (tmp_path / "exports" / "runs+s-start-adapter").exists()

    fake_run(tmp_path / "runs" / "none", [])  # nothing trained yet: empty menus
    assert views.model_menus(tmp_path, "runs/none") == {"inspect": ([("start", "start")], "start"),
                                                    "compare": ([], None), "export": ([], None)}


def test_export_gguf_and_hub_push_from_the_app(ws, finished_run, monkeypatch, tmp_path):
    """The Export tab's GGUF file, and a Hub push: no token is a clear refusal before any work; a token from the
    form reaches the export process (its environment, not its command line) and an unreachable Hub is named."""
    gguf = app_export.export(ws, finished_run, 0, kind="gguf", gguf_type="f16")
    assert gguf == ws / "exports" / "runs+tiny-iter-00-gguf-f16" / gguf.name and gguf.suffix == ".gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    with pytest.raises(workspace.AppError, match="needs a token"):
        app_export.export(ws, finished_run, 0, push_repo="someone/tiny-spin")
    with pytest.raises(workspace.AppError, match="not of the form OWNER/NAME"):
        app_export.export(ws, finished_run, 0, push_repo="../../etc")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(workspace.AppError, match=r"could not push .* someone/tiny-spin.*export itself is complete"):
        app_export.export(ws, finished_run, 0, push_repo="someone/tiny-spin", token="hf_not_a_real_token")


# -- the app module ---------------------------------------------------------------------------------------------------
def test_app_flags(monkeypatch, tmp_path):
    launched = recorded_launch(monkeypatch)
    from spin_lite.app import ui as app
    app.main(["--workspace", str(tmp_path)])
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False and launched["auth"] is None
    assert launched["show_error"] is True  # Gradio's own refusals (a value of the wrong shape) say why
    app.main(["--workspace", str(tmp_path), "--host", "0.0.0.0", "--share", "--auth", "ann:secret"])
    assert launched["server_name"] == "0.0.0.0" and launched["share"] is True and launched["auth"] == ("ann", "secret")
    with pytest.raises(SystemExit):
        app.main(["--auth", "no-password"])
    with pytest.raises(SystemExit):
        app.main(["--workspace", str(tmp_path / "missing")])
    help_text = subprocess.run([sys.executable, "-m", "spin_lite", "app", "--help"], cwd=tmp_path, text=True,
                               capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert help_text.returncode == 0 and "--workspace" in help_text.stdout and "127.0.0.1" in help_text.stdout


def test_plot_limits_keep_the_edge_points_inside():
    pytest.importorskip("gradio")
    from spin_lite.app.ui_run import padded

    assert padded([1, 2, 3, 4, 5, 6]) == pytest.approx([0.7, 6.3])  # 6% of the span (5) on each side
    assert padded([0.5, float("nan")]) == pytest.approx([0.47, 0.53])  # one value: 6% of itself; NaN: not drawn
    assert padded([0, 0]) == [-0.05, 0.05] and padded([]) is None


def test_a_wheel_serves_the_app(tmp_path):
    """`pip wheel .` installed (no dependencies) into a fresh venv: `spin-lite app --help` works and the page
    builds, from the installed package, outside the checkout. The venv sees this environment's dependencies
    through a .pth file, so nothing is downloaded."""
    pytest.importorskip("gradio")
    import sysconfig

    run = lambda *args, **kw: subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                                             cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                             **kw)
    done = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", REPO)
    assert done.returncode == 0, done.stderr
    wheel = next((tmp_path / "dist").glob("spin_lite-*.whl"))
    assert run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp_path / "venv").returncode == 0
    python = tmp_path / "venv" / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, gradio, ...
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel)
    assert done.returncode == 0, done.stderr
    help_text = run(tmp_path / "venv" / "bin" / "spin-lite", "app", "--help")
    assert help_text.returncode == 0 and "--workspace" in help_text.stdout, help_text.stderr
    built = run(python, "-c", "import spin_lite.app.ui as ui, gradio as gr; print(ui.__file__); "
                              "print(isinstance(ui.build_demo('.'), gr.Blocks)); "
                              "from spin_lite.app import form; print(any((form.PRESETS_DIR / f).is_symlink() "
                              "for f, _ in form.PRESETS.values()), all(form.preset_config(n) for n in form.PRESETS))")
    assert built.returncode == 0, built.stderr
    where, blocks, linked, presets = built.stdout.split()[-4:]
    assert where.startswith(purelib) and blocks == "True"
    assert (linked, presets) == ("False", "True")  # the presets' files themselves, not links, are in the wheel


def test_an_abort_that_comes_after_the_run_finished_says_so(tmp_path, monkeypatch):
    """A run that finishes on its own while Abort is being clicked (its process still there, then gone with exit
    code 0): the message and the run's log say that it had finished and nothing was stopped, not "aborted". (A run
    the abort's signal ends has a negative exit code: test_abort_then_continue.)"""
    root = fake_run(tmp_path / "runs" / "done", [True])
    RunDir(root).set_state(status="finished", iteration=0, stage="done")
    # a process the app would have started for it (its command line names spin_lite)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "spin_lite"], start_new_session=True)
    try:
        record = {"pid": proc.pid, "process_start": processes._process_start(proc.pid)}
        monkeypatch.setitem(processes.LAUNCHED, root.resolve(), record)
        # what _record_exit writes when the run ends on its own
        (root / processes.PROCESS_FILE).write_text(json.dumps({**record, "returncode": 0}))
        message = processes.abort_run(tmp_path, "runs/done", grace_s=1)
    finally:
        proc.kill()
        proc.wait()
    assert message == "runs/done had finished before the abort reached it: nothing was stopped"
    assert "came after the run had finished" in (root / processes.LOG_FILE).read_text()
    assert processes.run_status(tmp_path, "runs/done")["status"] == "finished"
