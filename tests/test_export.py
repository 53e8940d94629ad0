"""spin_lite.export: the adapter export loads with PEFT and is the run's model; the merged export matches the
base + adapter(s) within the dtype's tolerance, also for a run that trained on a 4-bit base.

Tolerances (max abs difference of the logits; the tiny model's logits are about 1 in size, and the trained
adapters move them by about 1, so a wrong or missing adapter fails every check by far):
  adapter export vs the run's model:                         exact (0.0 measured), asserted at 1e-6
  merged float32 vs float32 base + adapter (PeftModel):      atol 1e-4 (measured 0 to 6e-7)
  merged bfloat16 vs float32 base + adapter:                 atol 5e-2 (measured 5e-3 to 1.1e-2: bfloat16 keeps
                                                             8 mantissa bits, 4e-3 relative per rounding)
Three short runs of a tiny random Llama (hidden 64) share the module: stack (2 iterations), merge from a
starting adapter (2 iterations), and stack on a 4-bit base from a starting adapter (1 iteration).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
F32_ATOL = 1e-4
BF16_ATOL = 5e-2
PROMPTS = [[{"role": "user", "content": "Why is the sky blue?"}],
           [{"role": "user", "content": "Give me one fact about the Moon, please."}]]


# -- fixtures: a tiny model and three tiny runs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def export_tokenizer():
    from transformers import AutoTokenizer

    from spin_lite.model import embedded_model_dir
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def export_model_dir(tmp_path_factory, export_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = export_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("export-tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(run_dir: Path, model_dir: Path, *extra: str):
    from spin_lite.config import load_config
    from spin_lite.run import SpinRun

    cfg = load_config(None, [
        f"run_dir={run_dir}", f"model.name={model_dir}", f"data.path={REPO / 'examples/data/demo_sft.jsonl'}",
        "data.max_examples=8", "data.eval_size=4", "data.max_prompt_length=96", "data.max_length=160",
        "generation.max_new_tokens=8", "generation.batch_size=8", "train.epochs=1", "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=2", "train.learning_rate=0.01", "train.gradient_checkpointing=false",
        "eval.enabled=false", "iterations=2", *extra])
    SpinRun(cfg, log=lambda *a: None).run()
    return cfg


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory, export_model_dir):
    return _run(tmp_path_factory.mktemp("export-runs") / "stack", export_model_dir)


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory, stack_run) -> Path:
    """A starting adapter for the other runs: the stack run's iteration 0, exported."""
    from spin_lite.export import export_adapter
    return export_adapter(stack_run.run_dir, 0, tmp_path_factory.mktemp("export-start") / "adapter")


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory, export_model_dir, start_adapter):
    return _run(tmp_path_factory.mktemp("export-runs") / "merge", export_model_dir, "mode=merge",
                "train.mix_previous=false", f"model.adapter={start_adapter}")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, export_model_dir, start_adapter):
    return _run(tmp_path_factory.mktemp("export-runs") / "qlora", export_model_dir, "model.load_in_4bit=true",
                "iterations=1", f"model.adapter={start_adapter}")


# -- helpers ---------------------------------------------------------------------------------------------------
def _logits(model, tokenizer) -> torch.Tensor:
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in PROMPTS]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _run_model_after(cfg, iteration: int):
    """The run's own model after `iteration`: the model the run builds for the next one (spin_lite.run)."""
    from spin_lite.run import SpinRun
    return SpinRun(cfg, log=lambda *a: None).model_for(iteration + 1)


def _base(cfg, load_in_4bit=False):
    from spin_lite.model import load_base
    return load_base(dataclasses.replace(cfg.model, load_in_4bit=load_in_4bit), load_in_4bit=load_in_4bit)


def _recorded_opponent_logps(cfg, model):
    """(recorded, recomputed) log-probs of iteration 1's pairs: the run scored them with the model after
    iteration 0, in this order and batch size, before training iteration 1."""
    from spin_lite.evaluate import score
    from spin_lite.model import load_tokenizer
    from spin_lite.state import read_jsonl

    pairs = read_jsonl(Path(cfg.run_dir) / "iter-01" / "pairs.jsonl")
    prompts = [p["prompt_ids"] for p in pairs]
    bs, pad = cfg.train.micro_batch_size * 2, load_tokenizer(cfg.model).pad_token_id
    real, _ = score(model, prompts, [p["real_ids"] for p in pairs], pad, bs)
    gen, _ = score(model, prompts, [p["gen_ids"] for p in pairs], pad, bs)
    recorded = torch.tensor([p["opponent_real"] for p in pairs] + [p["opponent_gen"] for p in pairs])
    return recorded, torch.tensor(real + gen)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


# -- adapter export --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iteration", [0, 1])
def test_adapter_export_is_the_runs_model(stack_run, export_tokenizer, export_model_dir, tmp_path, iteration):
    from peft import PeftModel

    from spin_lite.export import MARKER, export_adapter

    out = export_adapter(stack_run.run_dir, iteration, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", MARKER} <= names
    assert not list(tmp_path.glob("*.tmp*")), "the temporary folder was left behind"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(export_model_dir)

    run_logits = _logits(_run_model_after(stack_run, iteration), export_tokenizer)
    base = _base(stack_run)
    base_logits = _logits(base, export_tokenizer)
    exported = PeftModel.from_pretrained(base, out)
    diff = _diff(_logits(exported, export_tokenizer), run_logits)
    print(f"adapter export iteration {iteration}: max |logits diff| {diff:.2e} "
          f"(base vs run {_diff(base_logits, run_logits):.2f})")
    assert diff <= 1e-6
    assert _diff(base_logits, run_logits) > 0.1, "the trained adapter should change the logits"
    if iteration == 0:  # the run itself recorded this model's log-probs: as iteration 1's opponent
        recorded, recomputed = _recorded_opponent_logps(stack_run, exported)
        assert torch.allclose(recorded, recomputed, atol=1e-3), _diff(recorded, recomputed)


def test_merge_mode_has_no_standalone_adapter(merge_run, stack_run, tmp_path):
    from spin_lite.export import ExportError, adapters_to_merge, export_adapter

    for iteration in (0, 1):  # iteration 0 too: it was trained on the base with the starting adapter merged
        with pytest.raises(ExportError, match="--merged"):
            export_adapter(merge_run.run_dir, iteration, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert adapters_to_merge(merge_run.run_dir, 1) == [
        merge_run.model.adapter, str(Path(merge_run.run_dir) / "iter-00/adapter"),
        str(Path(merge_run.run_dir) / "iter-01/adapter")]
    # a merge-mode run with no starting adapter: iteration 0 is a plain adapter on the base, iteration 1 is not
    copy = tmp_path / "merge-copy"
    shutil.copytree(stack_run.run_dir, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("mode: stack", "mode: merge"))
    assert export_adapter(copy, 0, tmp_path / "a0").exists()
    with pytest.raises(ExportError, match="trained on a base with the adapter of iteration 0 merged in"):
        export_adapter(copy, 1, tmp_path / "a1")


# -- merged export ---------------------------------------------------------------------------------------------
def test_merged_export_matches_base_plus_adapter(stack_run, export_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spin_lite.export import MARKER, export_merged

    reference = _logits(PeftModel.from_pretrained(_base(stack_run), f"{stack_run.run_dir}/iter-01/adapter"),
                        export_tokenizer)
    for dtype, atol in (("float32", F32_ATOL), ("bfloat16", BF16_ATOL)):
        out = export_merged(stack_run.run_dir, 1, tmp_path / dtype, dtype=dtype, log=lambda *a: None)
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
        assert not list(tmp_path.glob("*.tmp*"))
        info = json.loads((out / MARKER).read_text())
        assert info["merged_adapters"] == [str((Path(stack_run.run_dir) / "iter-01/adapter").resolve())]
        model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        assert not any("lora" in n for n, _ in model.named_parameters())
        diff = _diff(_logits(model, export_tokenizer), reference)
        print(f"merged {dtype} (stack): max |logits diff| {diff:.2e} (atol {atol})")
        assert diff <= atol


def test_merged_export_of_merge_mode_with_starting_adapter(merge_run, export_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from spin_lite.export import export_merged

    out = export_merged(merge_run.run_dir, 1, tmp_path / "m1", dtype="float32", log=lambda *a: None)
    reference = _logits(_run_model_after(merge_run, 1), export_tokenizer)
    diff = _diff(_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), export_tokenizer),
                 reference)
    print(f"merged float32 (merge mode, starting adapter + 0 + 1): max |logits diff| {diff:.2e}")
    assert diff <= F32_ATOL
    # iteration 0 (starting adapter + adapter 0) is the model that scored iteration 1's pairs
    out0 = export_merged(merge_run.run_dir, 0, tmp_path / "m0", dtype="float32", log=lambda *a: None)
    recorded, recomputed = _recorded_opponent_logps(
        merge_run, AutoModelForCausalLM.from_pretrained(out0, dtype=torch.float32))
    assert torch.allclose(recorded, recomputed, atol=1e-3), _diff(recorded, recomputed)


def test_qlora_run_exports_from_the_16_bit_base(qlora_run, export_tokenizer, tmp_path):
    """The run trained on a 4-bit base; the merged export merges into the 16/32-bit base, never into nf4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spin_lite.export import export_adapter, export_merged

    adapter = f"{qlora_run.run_dir}/iter-00/adapter"
    out = export_merged(qlora_run.run_dir, 0, tmp_path / "merged", dtype="float32", log=lambda *a: None)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference16 = _logits(PeftModel.from_pretrained(_base(qlora_run), adapter), export_tokenizer)
    diff = _diff(_logits(model, export_tokenizer), reference16)
    run_logits = _logits(_run_model_after(qlora_run, 0), export_tokenizer)
    print(f"merged float32 (4-bit run) vs 16-bit base + adapter: max |logits diff| {diff:.2e}; "
          f"vs the run's 4-bit model: {_diff(run_logits, reference16):.2e}")
    assert diff <= F32_ATOL
    # stack mode from a starting adapter: adapter 0 began as its copy, so the start is not merged twice
    assert json.loads((out / "spin_lite_export.json").read_text())["merged_adapters"] == [
        str(Path(adapter).resolve())]
    # the adapter export on the 4-bit base is exactly the run's model
    exported = PeftModel.from_pretrained(_base(qlora_run, load_in_4bit=True),
                                         export_adapter(qlora_run.run_dir, 0, tmp_path / "adapter"))
    assert _diff(_logits(exported, export_tokenizer), run_logits) <= 1e-6


# -- command line, replacing, the Hub --------------------------------------------------------------------------
def test_cli_export(stack_run, tmp_path, capsys):
    from spin_lite.cli import main

    out = tmp_path / "exported"
    assert main(["export", stack_run.run_dir, "--out", str(out)]) == 0  # default: the last trained iteration
    assert json.loads((out / "spin_lite_export.json").read_text())["iteration"] == 1
    assert main(["export", stack_run.run_dir, "--iteration", "0", "--out", str(out), "--merged",
                 "--dtype", "float32"]) == 0  # an earlier export is replaced
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", stack_run.run_dir, "--out", str(tmp_path / "mine")]) == 2
    assert "not an earlier spin-lite export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["export", stack_run.run_dir, "--iteration", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "iteration 5" in err and "iterations with one: 0, 1" in err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def _set_verdicts(run: Path, accepted: list[bool]):
    """Write the stop rule's verdicts into a run's summaries by hand (the stack run has no validation rows)."""
    best = "the starting model"
    for t, ok in enumerate(accepted):
        path = run / f"iter-{t:02d}" / "summary.json"
        reasons = [] if ok else ["val repetitive got worse (0.00 -> 0.50)"]
        path.write_text(json.dumps({**json.loads(path.read_text()), "selection": {
            "compared_with": best, "accepted": ok, "reasons": reasons, "rejected_in_a_row": int(not ok), "stop": False}}))
        best = f"iteration {t}" if ok else best


def test_cli_export_takes_the_chosen_model_and_warns_of_a_rejected_one(stack_run, merge_run, tmp_path, capsys):
    from spin_lite.cli import main
    from spin_lite.export import MARKER, export_adapter

    run = tmp_path / "run"
    shutil.copytree(stack_run.run_dir, run)
    _set_verdicts(run, [True, False])  # iteration 0 chosen, iteration 1 rejected
    assert main(["export", str(run), "--out", str(tmp_path / "chosen")]) == 0
    said = capsys.readouterr()
    assert "export: iteration 0, the model the stop rule chose on the validation rows" in said.out
    assert "warning" not in said.err
    assert json.loads((tmp_path / "chosen" / MARKER).read_text())["iteration"] == 0
    card = (tmp_path / "chosen" / "README.md").read_text()
    assert "the model the stop rule chose on the validation rows" in card and "Warning" not in card

    assert main(["export", str(run), "--iteration", "1", "--out", str(tmp_path / "rejected")]) == 0
    warning = ("the stop rule rejected iteration 1: not better than iteration 0 on the validation rows (val "
               "repetitive got worse (0.00 -> 0.50)); the model it chose is iteration 0")
    assert f"warning: {warning} (`spin-lite export {run} --out DIR` exports that one)" in capsys.readouterr().err
    card = (tmp_path / "rejected" / "README.md").read_text()
    assert f"**Warning: {warning}.** Export that one with `spin-lite export RUN_DIR --out DIR`." in card

    _set_verdicts(run, [False, False])  # the starting model chosen: said plainly, nothing trained to export
    assert main(["export", str(run), "--out", str(tmp_path / "start")]) == 2
    err = capsys.readouterr().err
    assert ("the model the stop rule chose on the validation rows is the starting model: no iteration of run "
            f"{run} was better, and the starting model is the base {stack_run.model.name} with no adapter, so there "
            "is nothing trained to export") in err
    assert "--iteration N (iter 0 (rejected by the stop rule), iter 1 (rejected by the stop rule))" in err
    assert not (tmp_path / "start").exists()
    # a run with a starting adapter: "start" is that adapter, and the card says what it is
    out = export_adapter(merge_run.run_dir, "start", tmp_path / "start-adapter")
    assert json.loads((out / MARKER).read_text())["iteration"] == -1
    start = Path(merge_run.model.adapter)
    assert (out / "adapter_model.safetensors").read_bytes() == (start / "adapter_model.safetensors").read_bytes()
    assert "# The starting model of a SPIN run" in (out / "README.md").read_text()


def test_push_to_hub_needs_a_token(stack_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from spin_lite.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["export", stack_run.run_dir, "--out", str(tmp_path / "x"), "--push-to-hub", "me/spin"]) == 2
    err = capsys.readouterr().err
    assert "needs a token" in err and "HF_TOKEN" in err
    assert not (tmp_path / "x").exists(), "a push without a token should fail before exporting"


def test_push_to_hub_failure_is_reported(stack_run, tmp_path, monkeypatch):
    """No network here: the upload fails, and the message says so and that the export itself is complete."""
    import huggingface_hub.constants

    from spin_lite.export import ExportError, export_adapter, push_to_hub

    out = export_adapter(stack_run.run_dir, 1, tmp_path / "a")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match="could not push .* export itself is complete"):
        push_to_hub(out, "me/spin", token="hf_not_a_real_token")


# -- whatever backend a run trained on, export and chat load through transformers + peft ---------------------------
def test_export_and_chat_of_an_unsloth_run_load_through_hf(stack_run, export_tokenizer, tmp_path_factory, tmp_path,
                                                           monkeypatch):
    """A run trained on Unsloth (model.backend unsloth, or auto on a machine with Unsloth and CUDA) exports and chats
    with transformers + peft: an Unsloth model carries one adapter (build_model refuses more), and merging needs
    plain weights. Here the run's config says unsloth and resolve_backend answers unsloth, as on such a machine;
    any load through Unsloth fails the test. The merged export is the hf run's, to the bit."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from spin_lite import model as model_module
    from spin_lite.app import chat
    from spin_lite.export import export_merged

    quiet = lambda *a: None
    reference = export_merged(stack_run.run_dir, 1, tmp_path / "reference", dtype="float32", log=quiet)
    run = tmp_path / "unsloth-run"
    shutil.copytree(stack_run.run_dir, run)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    settings["model"]["backend"] = "unsloth"
    # the app refuses files outside its workspace (below: the tests' temporary folder)
    settings["data"]["path"] = shutil.copy(REPO / "examples" / "data" / "demo_sft.jsonl", tmp_path)
    (run / "config.yaml").write_text(yaml.safe_dump(settings))

    def no_unsloth(*args, **kwargs):
        raise AssertionError("loaded through Unsloth")

    monkeypatch.setattr(model_module, "resolve_backend", lambda cfg: "unsloth")
    monkeypatch.setattr(model_module, "_load_unsloth", no_unsloth)

    merged = export_merged(run, 1, tmp_path / "merged", dtype="float32", log=quiet)
    expected, got = load_file(reference / "model.safetensors"), load_file(merged / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    workspace = tmp_path_factory.getbasetemp()  # holds the run's model and the copied run
    chat._load_chat_model.cache_clear()
    try:
        model, _ = chat.chat_model(workspace, str(run.relative_to(workspace)), "iter 1")
    finally:
        chat._load_chat_model.cache_clear()
    assert type(model).__name__ == "PeftModelForCausalLM"
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert _diff(_logits(model, export_tokenizer), _logits(merged_model, export_tokenizer)) <= F32_ATOL
