"""QLoRA on CUDA: one small 4-bit run with the invariants of the CPU tests (skipped where there is no CUDA).

Run on a GPU machine: pytest -q -m gpu tests/test_gpu.py
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, tiny_settings, tree_digest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_iterations_on_cuda(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from spin_lite.config import load_config
    from spin_lite.run import SpinRun
    from spin_lite.state import read_jsonl

    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run", **{"model.load_in_4bit": "true"}))
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    model = run.model_for(0)
    assert next(model.parameters()).device.type == "cuda"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    run._release(model)
    run.iteration(0)
    digest0 = tree_digest(run.dir.iteration(0) / "adapter")
    run.iteration(1)
    assert tree_digest(run.dir.iteration(0) / "adapter") == digest0  # the opponent stays frozen
    for t in (0, 1):
        log = read_jsonl(run.dir.iteration(t) / "train_log.jsonl")
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=5e-3)  # starts equal to the opponent
    a0 = load_file(run.dir.iteration(0) / "adapter" / "adapter_model.safetensors")
    a1 = load_file(run.dir.iteration(1) / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)


def test_resume_on_cuda(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", *tiny_settings(tiny_model_dir, run_dir, iterations=1, **{"model.load_in_4bit": "true"})]
    assert cli(*args, env={"SPIN_LITE_KILL_AT": "train_step:1"}).returncode == -9
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already on disk, generating 0" in out.stdout and "resumed from the checkpoint at step 1" in out.stdout
    steps = [json.loads(l)["step"] for l in (run_dir / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
