"""The app's workspace holds: escapes tried as a hostile user would, through the handlers and the HTTP API.

    python -m pytest -q tests/test_security.py

Each test is one way out that once worked (issue 10): a run directory name read as a CLI override, a saved
config whose paths leave the workspace then continued, symlinks planted where the app or a run writes, a
config path with "=" read as an override by the CLI. None of them may write or read outside the workspace.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spin_lite.app import form, processes, workspace
from spin_lite.app import export as app_export
from spin_lite.config import ConfigError, SpinConfig
from spin_lite.state import LinkError
from conftest import start_app, stop_app
from test_app import DEMO, REPO, made_run, make_workspace, tiny_config

# Run directory names that, passed on the run's command line, were read as overrides (`=`, ` #` comments out
# the rest): the first wrote the run outside the workspace, the second made Inspect show an outside file.
HOSTILE_RUN_DIRS = ["run_dir=/{outside}/x #", "data={{path: /{outside}/secret.jsonl, eval_size: 2, max_examples: 2}} #",
                    "-rf", "runs/a b", "runs/'q'", "runs/x;y"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.jsonl").write_text(DEMO.read_text())
    (folder / "keep.txt").write_text("untouched\n")
    return folder


def untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["keep.txt", "secret.jsonl"] and \
        (outside / "keep.txt").read_text() == "untouched\n"


# -- names on the command line ------------------------------------------------------------------------------------
def test_run_dir_names_cannot_become_overrides(ws, outside):
    for pattern in HOSTILE_RUN_DIRS:
        name = pattern.format(outside=str(outside).lstrip("/"))
        with pytest.raises(workspace.AppError, match="run directory name"):
            processes.start_run(ws, dataclasses.replace(tiny_config("runs/ok"), run_dir=name))
        with pytest.raises(workspace.AppError):
            processes.continue_run(ws, name)
    assert untouched(outside)
    assert not any(p.name.startswith(("run_dir=", "data=")) for p in ws.rglob("*"))


def test_cli_config_path_with_equals_is_a_path(tmp_path, capsys):
    from spin_lite.cli import config_and_overrides, main

    assert config_and_overrides("cfg/lr=5e-4.yaml", ["train.beta=0.2"]) == ("cfg/lr=5e-4.yaml", ["train.beta=0.2"])
    assert config_and_overrides("train.beta=0.2", ["iterations=1"]) == (None, ["train.beta=0.2", "iterations=1"])
    config = tmp_path / "lr=5e-4.yaml"
    config.write_text("iterations: 0\n")  # read as the config file: its one error is reported
    assert main(["run", str(config)]) == 2
    assert "iterations must be >= 1" in capsys.readouterr().err
    assert main(["run", "cfg/lr=5e-4.yaml"]) == 2
    err = capsys.readouterr().err
    assert "config file cfg/lr=5e-4.yaml does not exist" in err and "unknown setting" not in err
    # A run directory whose name has "=" in it: its config path is still a path.
    odd = tmp_path / "run_dir=elsewhere #"
    odd.mkdir()
    (odd / "app-launch.yaml").write_text("iterations: 0\n")
    assert main(["run", str(odd / "app-launch.yaml")]) == 2
    assert "iterations must be >= 1" in capsys.readouterr().err


# -- every path of a run, on every way into one ---------------------------------------------------------------------
def test_saved_config_with_outside_paths_is_neither_saved_loaded_nor_continued(ws, outside):
    bad = tiny_config("runs/saved-bad", **{"data.path": str(outside / "secret.jsonl")})
    with pytest.raises(workspace.AppError, match="outside the workspace"):
        form.save_config(ws, bad, "configs/bad.yaml")
    assert not (ws / "configs" / "bad.yaml").exists()
    # The same config written to the workspace some other way (or by an older app): loading and continuing it
    # are refused too, and no process starts.
    for key, value in (("data.path", outside / "secret.jsonl"), ("data.eval_path", outside / "secret.jsonl"),
                       ("model.name", outside), ("model.adapter", outside)):
        run = ws / "runs" / f"planted-{key.replace('.', '-')}"
        run.mkdir(parents=True, exist_ok=True)
        data = tiny_config("x").to_dict()
        section, leaf = key.split(".")
        data[section][leaf] = str(value)
        data["run_dir"] = str(run.relative_to(ws))
        (run / "config.yaml").write_text(yaml.safe_dump(data))
        (run / "state.json").write_text("{}")  # a run made by an earlier version, or by hand
        with pytest.raises(workspace.AppError, match="outside the workspace"):
            processes.continue_run(ws, str(run.relative_to(ws)))
        with pytest.raises(workspace.AppError, match="outside the workspace"):
            form.open_config(ws, str(run.relative_to(ws)))
        assert not (run / processes.PROCESS_FILE).exists() and not (run / processes.LOG_FILE).exists()
    assert untouched(outside)


def test_symlinks_are_never_written_through(ws, outside):
    # An upload onto a dangling link: the link is skipped, its target never created.
    uploads = ws / "uploads"
    uploads.mkdir(exist_ok=True)
    (uploads / "demo_sft.jsonl").symlink_to(outside / "planted.jsonl")
    assert workspace.save_upload(ws, DEMO) == "uploads/demo_sft-1.jsonl"
    assert not (outside / "planted.jsonl").exists()
    # Links at the files the app and the run write in a run directory: the launch is refused.
    for name in (processes.LOG_FILE, "iter-00"):
        for launch in ("start", "continue"):
            rel = f"runs/linked-{launch}-{name.replace('.', '-')}"
            run = made_run(ws, rel)
            (run / name).symlink_to(outside / "keep.txt")
            with pytest.raises((workspace.AppError, LinkError), match="symbolic link"):
                if launch == "start":
                    processes.start_run(ws, tiny_config(rel))
                else:
                    processes.continue_run(ws, rel)
    # A config saved onto a link to a file inside the workspace: not written through either.
    (ws / "configs").mkdir(exist_ok=True)
    (ws / "configs" / "target.yaml").write_text("iterations: 2\n")
    (ws / "configs" / "link.yaml").symlink_to(ws / "configs" / "target.yaml")
    with pytest.raises(workspace.AppError, match="symbolic link"):
        form.save_config(ws, SpinConfig(), "configs/link.yaml")
    assert (ws / "configs" / "target.yaml").read_text() == "iterations: 2\n"
    assert untouched(outside)


def test_export_never_writes_through_a_link(ws, outside):
    run = ws / "runs" / "exp"
    (run / "iter-00" / "adapter").mkdir(parents=True)
    (run / "iter-00" / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(tiny_config("runs/exp").to_yaml())
    (ws / "exports").mkdir(exist_ok=True)
    (ws / "exports" / "runs+exp-iter-00-adapter.zip").symlink_to(outside / "stolen.zip")
    with pytest.raises(workspace.AppError, match="symbolic link"):
        app_export.export(ws, "runs/exp", 0, kind="adapter")
    assert untouched(outside)


def test_a_run_config_that_is_not_a_mapping_is_a_named_error(ws):
    run = made_run(ws, "runs/listy")
    (run / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        processes.continue_run(ws, "runs/listy")
    assert processes.run_status(ws, "runs/listy")["status"] == "not started"
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a text file"):
        processes.continue_run(ws, "runs/listy")


# -- the same escapes through the HTTP API (gradio_client) ------------------------------------------------------------
@pytest.fixture(scope="module")
def api(ws):
    client_module = pytest.importorskip("gradio_client")
    server, url = start_app(ws)
    try:
        yield client_module.Client(url, verbose=False)
    finally:
        stop_app(server, ws)


def test_escapes_through_the_http_api(api, ws, outside):
    keys = [s.key for s in form.settings()]
    for pattern in HOSTILE_RUN_DIRS[:2]:
        values = form.form_values(tiny_config("runs/ok"))
        values[keys.index("run_dir")] = pattern.format(outside=str(outside).lstrip("/"))
        _, refusal, *_ = api.predict(*values, api_name="/start")  # (the last launch's message, the refusal, ...)
        assert "Error" in refusal and "run directory name" in refusal
        message = api.predict(values[keys.index("run_dir")], 0, 0, api_name="/continue_run")  # Continue
        assert "Error" in message
    values = form.form_values(tiny_config("runs/api", **{"data.path": str(outside / "secret.jsonl")}))
    _, refusal, *_ = api.predict(*values, api_name="/start")
    assert "outside the workspace" in refusal
    setup_msg, _ = api.predict("configs/api.yaml", *values, api_name="/save")
    assert "outside the workspace" in setup_msg and not (ws / "configs" / "api.yaml").exists()
    setup_msg, _ = api.predict("../escape.yaml", *form.form_values(tiny_config("runs/api")), api_name="/save")
    assert "outside the workspace" in setup_msg
    planted = tiny_config("runs/api").to_dict()
    planted["data"]["path"] = str(outside / "secret.jsonl")
    (ws / "configs").mkdir(exist_ok=True)
    (ws / "configs" / "planted.yaml").write_text(yaml.safe_dump(planted))
    loaded = api.predict("configs/planted.yaml", api_name="/load")
    assert "outside the workspace" in loaded[0]
    message = api.predict("../", 0, 0, api_name="/continue_run")
    assert "outside the workspace" in message or "run directory name" in message
    assert "Error" in api.predict("runs/listy", api_name="/abort_run")  # Abort of a run the app did not start
    assert untouched(outside)
    assert not (outside.parent / "x").exists()


GENERIC = "upstream Gradio app has raised an exception"


def test_refusals_through_the_http_api_are_named(api, ws):
    """A null character or a 5,000-character name on every endpoint that takes a path, and values of the wrong
    type: each answered with a message that names the problem, never an unexpected error or Gradio's generic one."""
    from gradio_client.exceptions import AppError as ClientError

    def answer(*args, api_name):
        try:
            out = api.predict(*args, api_name=api_name)
        except ClientError as e:  # Gradio's own refusal (a value its component cannot take): its reason is sent
            out = str(e)
        text = str(out)
        assert GENERIC not in text and "unexpected error" not in text, (api_name, text)
        return text

    keys = [s.key for s in form.settings()]
    for bad, named in (("runs/a\0b", "null character"), ("r" * 5000, "too long for a path")):
        values = form.form_values(tiny_config("runs/ok"))
        values[keys.index("run_dir")] = bad
        assert named in answer(*values, api_name="/start")
        assert named in answer(*values, api_name="/estimate")
        values = form.form_values(tiny_config("runs/ok", **{"data.path": "data/demo_sft.jsonl"}))
        values[keys.index("data.path")] = bad
        assert named in answer(*values, api_name="/preview")
        assert named in answer(bad, *values, api_name="/save")
        assert named in answer(bad, api_name="/load")
        assert named in answer(bad, 0, 0, api_name="/continue_run")
        assert named in answer(bad, api_name="/abort_run")
    values = form.form_values(tiny_config("runs/typed"))
    values[keys.index("iterations")] = "three"  # a number box given text
    assert "iterations must be an integer, got 'three'" in answer(*values, api_name="/start")
    values[keys.index("iterations")] = {"x": 1}
    assert "iterations must be an integer" in answer(*values, api_name="/start")
    assert "must be a whole number >= 0" in answer("runs/typed", "abc", None, api_name="/continue_run")
    assert "Input should be a valid list" in answer("hi", "not a chat", [], api_name="/add_message")
    assert not (ws / "runs" / "typed").exists()


# -- links planted after the launch: refused where each file is used (spin_lite.state.confined) ---------------------
def test_a_link_planted_in_a_running_run_is_not_written_through(ws, outside):
    """A real run, launched as the app launches it; `iter-00` planted as a link to a folder outside right after the
    launch (the launch's own check has passed): the run refuses it when it makes the folder, and fails saying so.
    Before, its generations, adapter, eval.json and summary.json landed outside."""
    from test_app import wait_until_stopped

    processes.start_run(ws, tiny_config("runs/planted-late"))
    (ws / "runs" / "planted-late" / "iter-00").symlink_to(outside, target_is_directory=True)
    status = wait_until_stopped(ws, "runs/planted-late")
    assert status["status"] == "failed" and "symbolic link" in status["error"], status
    assert untouched(outside)


def test_every_folder_write_and_model_read_of_a_run_refuses_links(tmp_path, outside):
    """The run's folders (iteration, control, SFT stage), its atomic writes and folder moves in a run directory it
    has locked, and the adapters read for a model: each refuses a link at the point of use."""
    from spin_lite.state import LinkError, RunDir, atomic_write_json, replace_dir

    rd = RunDir(tmp_path / "run")
    lock = rd.lock()
    try:
        for name, folder in (("control-03", lambda: rd.control(3)), ("iter-01", lambda: rd.iteration(1)),
                             ("sft", lambda: rd.sft_dir)):
            (rd.root / name).symlink_to(outside, target_is_directory=True)
            with pytest.raises(LinkError, match="symbolic link"):
                folder()
            for write in (lambda: atomic_write_json(rd.root / name / "summary.json", {"x": 1}),
                          lambda: replace_dir(rd.root / "tmp-adapter", rd.root / name / "adapter")):
                (rd.root / "tmp-adapter").mkdir(exist_ok=True)
                with pytest.raises(LinkError, match="symbolic link"):
                    write()
        assert not rd.stage_done(0, "train") and rd.completed() == 0
        (rd.root / "iter-00" / "adapter").mkdir(parents=True)
        (rd.root / "iter-00" / "adapter" / "adapter_config.json").write_text("{}")
        (rd.root / "iter-00" / "adapter" / "adapter_model.safetensors").symlink_to(outside / "keep.txt")
        with pytest.raises(LinkError, match="adapter_model.safetensors is a symbolic link"):
            rd.adapters_after(0, "stack")
        (rd.root / "iter-00" / "adapter" / "adapter_model.safetensors").unlink()
        assert rd.adapters_after(0, "merge", "models/start") == ["models/start", str(rd.root / "iter-00" / "adapter")]
    finally:
        lock.close()
    assert untouched(outside)


def test_chat_export_and_inspect_never_read_through_a_link(ws, outside):
    """An adapter and a samples file of a finished run replaced by links to files outside the workspace: Compare,
    Export and Inspect refuse them by name; nothing outside is zipped or shown."""
    from spin_lite.app import chat, views
    from test_app import fake_run

    root = fake_run(ws / "runs" / "linked-read", [True])
    adapter = root / "iter-00" / "adapter"
    (outside / "adapter").mkdir()
    (outside / "adapter" / "adapter_config.json").write_text("{}")
    (outside / "adapter" / "adapter_model.safetensors").write_text("stolen")
    os.rename(adapter, root / "iter-00" / "adapter-real")
    adapter.symlink_to(outside / "adapter", target_is_directory=True)
    with pytest.raises(Exception, match="symbolic link") as refused:
        chat.chat_model(ws, "runs/linked-read", "iter 0")
    assert workspace.user_message(refused.value).startswith(str(adapter))  # a named refusal, not "unexpected"
    with pytest.raises(workspace.AppError, match="symbolic link"):
        app_export.export(ws, "runs/linked-read", "iter 0", kind="adapter")
    assert not list((ws / "exports").glob("linked-read*"))
    (root / "iter-00" / "samples.jsonl").unlink()
    (root / "iter-00" / "samples.jsonl").symlink_to(outside / "secret.jsonl")
    with pytest.raises(Exception, match="symbolic link") as refused:
        views.samples(ws, "runs/linked-read", "iter 0")
    assert "unexpected" not in workspace.user_message(refused.value)
    (outside / "adapter" / "adapter_config.json").unlink()
    (outside / "adapter" / "adapter_model.safetensors").unlink()
    (outside / "adapter").rmdir()
    assert untouched(outside)


# -- uploads are data only; Save config, Abort and the form's values --------------------------------------------------
def upload(ws: Path, tmp_path: Path, name: str, text: str) -> str:
    source = tmp_path / "sent" / name
    source.parent.mkdir(exist_ok=True)
    source.write_text(text)
    return workspace.save_upload(ws, source)


def test_an_upload_never_makes_a_folder_a_run_or_carries_a_process_record(ws, tmp_path):
    """Uploads named as a run's records (app-launch.yaml with run_dir: uploads, state.json of [1], app-run.json,
    .lock) are stored under other names, uploads/ is never a run, and the Run tab's overview still reads every run."""
    from spin_lite.app import views

    before = views.runs_overview(ws)
    for name, text, stored in (("app-launch.yaml", "run_dir: uploads\n", "upload-app-launch.yaml"),
                               ("state.json", "[1]\n", "upload-state.json"),
                               ("config.yaml", "iterations: 1\n", "upload-config.yaml"),
                               ("app-run.json", '{"pid": %d}\n' % os.getpid(), "upload-app-run.json"),
                               (".lock.json", "1", "upload-lock.json"), ("data.jsonl", "{}\n", "data.jsonl")):
        assert upload(ws, tmp_path, name, text) == f"uploads/{stored}"
    assert not any(p.name in ("state.json", "config.yaml", "app-run.json", ".lock") for p in (ws / "uploads").iterdir())
    assert not any(r.startswith("uploads") for r in views.list_runs(ws))
    assert views.runs_overview(ws) == before
    with pytest.raises(workspace.AppError, match="an upload is a data file or a config"):
        upload(ws, tmp_path, "run.log", "x")
    for run_dir in ("uploads", "uploads/x", "exports/y"):
        with pytest.raises(workspace.AppError, match="app's (uploads|exports)/ folder"):
            processes.start_run(ws, tiny_config(run_dir))
        with pytest.raises(workspace.AppError, match="app's (uploads|exports)/ folder"):
            processes.continue_run(ws, run_dir)


def test_a_broken_run_directory_does_not_hide_the_others(ws):
    from spin_lite.app import views

    made_run(ws, "runs/state-list")
    made_run(ws, "runs/state-fine")
    (ws / "runs" / "state-list" / "state.json").write_text("[1]\n")
    rows = {r["run_dir"]: r for r in views.runs_overview(ws)}
    assert rows["runs/state-list"]["status"].startswith("unreadable")
    assert rows["runs/state-fine"]["status"] == "not started"


def test_save_config_never_writes_inside_a_run_directory(ws):
    run = made_run(ws, "runs/kept")
    before = (run / "config.yaml").read_text()
    changed = tiny_config("runs/kept", **{"train.beta": 5, "train.learning_rate": 0.05})
    for path in ("runs/kept/config.yaml", "runs/kept/iter-00/x.yaml", "runs/kept/app-launch.yaml"):
        with pytest.raises(workspace.AppError, match="inside the run directory runs/kept"):
            form.save_config(ws, changed, path)
    assert (run / "config.yaml").read_text() == before and not (run / "iter-00").exists()
    assert form.save_config(ws, changed, "configs/kept.yaml") == ws / "configs" / "kept.yaml"


# A process that holds a run directory's lock and writes `pid` into the lock file, as a forged record would read.
FORGE = ("import sys, time\nfrom spin_lite.state import RunDir\nlock = RunDir(sys.argv[1]).lock()\n"
         "lock.seek(0); lock.truncate(); lock.write(sys.argv[2].encode())\nprint('held', flush=True)\ntime.sleep(120)")


def test_abort_signals_only_what_this_app_started(ws):
    """A run held by a process the app did not start, whose lock file names the app's own pid and whose app-run.json
    names the holder with its true start time: Abort signals nothing, and never says "kill" the app."""
    root = made_run(ws, "runs/forged")
    holder = subprocess.Popen([sys.executable, "-c", FORGE, str(root), str(os.getpid())], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (root / processes.PROCESS_FILE).write_text(
            '{"pid": %d, "process_start": %d}' % (holder.pid, processes._process_start(holder.pid)))
        with pytest.raises(workspace.AppError, match="did not start") as refused:
            processes.abort_run(ws, "runs/forged", grace_s=1)
        assert str(os.getpid()) not in str(refused.value) and "kill" not in str(refused.value)
        status = processes.run_status(ws, "runs/forged")
        assert status["status"] == "running" and status["pid"] is None
        assert holder.poll() is None  # not signalled
    finally:
        holder.kill()
        holder.wait()


# A YAML "billion laughs" in one form value: 9^6 (531,441) values from 200 characters.
ALIAS_BOMB = ("[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
              "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]")


def test_form_values_are_bounded_before_yaml_and_aliases_refused(ws):
    keys = [s.key for s in form.settings()]
    values = form.form_values(tiny_config("runs/bomb"))
    values[keys.index("train.beta")] = ALIAS_BOMB
    started = time.time()
    with pytest.raises(ConfigError, match="train.beta is not valid YAML: anchors and aliases") as refused:
        form.config_from_form(values)
    assert time.time() - started < 2 and len(str(refused.value)) < 1000
    values = form.form_values(tiny_config("runs/bomb"))
    values[keys.index("data.system_prompt")] = "x" * (form.MAX_VALUE_CHARS + 1)
    values[keys.index("train.beta")] = "1" * (form.MAX_VALUE_CHARS + 1)
    with pytest.raises(workspace.AppError, match=r"train.beta, data.system_prompt|data.system_prompt, train.beta"):
        form.config_from_form(values)
    # a config file: aliases that expand it past the bound are refused; a merge key (<<: *defaults) is fine
    (ws / "configs").mkdir(exist_ok=True)
    (ws / "configs" / "bomb.yaml").write_text("train:\n  beta: " + ALIAS_BOMB + "\n")
    with pytest.raises(workspace.AppError, match="aliases .* expand it past"):
        form.open_config(ws, "configs/bomb.yaml")
    (ws / "configs" / "merge.yaml").write_text("base: &b {beta: 0.2}\n")
    with pytest.raises(ConfigError):  # an unknown setting, named by the config's own check
        form.open_config(ws, "configs/merge.yaml")
    assert len(workspace.user_message(ConfigError("x" * 10 ** 6))) < 5000  # no message of megabytes on the page


def test_appended_logs_refuse_a_link_planted_after_launch(tmp_path):
    """generations.jsonl and train_log.jsonl are appended, not renamed into place: a link planted at the file after
    launch is refused where the write happens (O_NOFOLLOW), and so is a folder swapped for a link inside a run
    directory this process holds (state._confine_write)."""
    from spin_lite.state import LinkError, RunDir, open_append

    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    lock = rd.lock()
    try:
        (rd.root / "iter-00").mkdir()
        (rd.root / "iter-00" / "train_log.jsonl").symlink_to(outside / "stolen.jsonl")
        with pytest.raises(OSError):
            open_append(rd.root / "iter-00" / "train_log.jsonl")
        (rd.root / "iter-01").symlink_to(outside, target_is_directory=True)
        with pytest.raises(LinkError):
            open_append(rd.root / "iter-01" / "generations.jsonl")
        with open_append(rd.root / "iter-00" / "generations.jsonl") as f:  # a plain file inside: fine
            f.write("{}\n")
    finally:
        lock.close()
    assert not (outside / "stolen.jsonl").exists() and not (outside / "generations.jsonl").exists()
