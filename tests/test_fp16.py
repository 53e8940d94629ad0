"""float16 training (a T4 has no bfloat16): LoRA weights and AdamW state in float32, dynamic loss scaling, and a
step whose gradients overflow skipped and counted. On the CPU, with the tiny model's base weights in float16
(torch's CPU float16 matmuls work, slowly; the scaler is torch.amp.GradScaler("cpu"), the same class as on CUDA).

Run alone: .venv/bin/python -m pytest -q tests/test_fp16.py
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from spin_lite import train as train_module
from spin_lite.train import train_adapter


def _model(model_dir, dtype, lora):
    """The tiny model in `dtype` with a fresh LoRA adapter (the same A matrices for every dtype)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spin_lite.model import lora_config
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(7)
    return get_peft_model(base, lora_config(lora))


def _pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    words = lambda k: torch.randint(200, 9000, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": words(10), "real_ids": words(6), "gen_ids": words(6),
             "opponent_real": -60.0, "opponent_gen": -60.0} for _ in range(n)]


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _log(folder) -> list[dict]:
    return [json.loads(l) for l in (folder / "train_log.jsonl").read_text().splitlines()]


def test_float16_keeps_lora_and_optimizer_in_float32(tiny_model_dir, tiny_config, tmp_path):
    cfg = tiny_config()
    model = _model(tiny_model_dir, torch.float16, cfg.lora)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert state["scaler"]["scale"] == train_module.LOSS_SCALE_INIT  # clean steps: the scale stays (for 2,000)
    log = _log(tmp_path)
    assert [r["skipped"] for r in log] == [False, False] and all(r["loss_scale"] == 2.0**16 for r in log)


def test_overflow_skips_the_step_and_lowers_the_scale(tiny_model_dir, tiny_config, tmp_path):
    """An inf in one LoRA gradient at step 1 (as an overflow in the float16 backward gives): the step is skipped
    (no weight moves, AdamW takes no step), counted in the log, and the scale is halved; step 2 trains."""
    cfg = tiny_config()
    model = _model(tiny_model_dir, torch.float16, cfg.lora)
    before = _trainable(model)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    calls = []
    param.register_hook(lambda grad: grad * float("inf") if len(calls) < 2 and not calls.append(1) else grad)
    metrics = train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)  # 2 steps of 2 micro batches
    log = _log(tmp_path)
    assert [r["skipped"] for r in log] == [True, False]
    assert [r["loss_scale"] for r in log] == [2.0**16, 2.0**15]
    assert metrics["skipped_steps"] == 1
    # the checkpoint after step 1 holds the weights as they were, and an optimizer that has not stepped
    saved = load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and state["optimizer"]["state"] == {}
    assert state["scaler"]["scale"] == 2.0**15
    initial = {k.replace(".default", ""): v for k, v in before.items()}
    for key, value in saved.items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0)
    after = _trainable(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 2 did train


def test_a_real_overflow_is_skipped_not_called_divergence(tiny_model_dir, tiny_config, tmp_path, monkeypatch):
    """With a loss scale far past float16's range (65,504) every gradient overflows in the float16 backward:
    each step is skipped and the scale halved, and the divergence guard does not stop the run."""
    monkeypatch.setattr(train_module, "LOSS_SCALE_INIT", 2.0**60)
    cfg = tiny_config()
    model = _model(tiny_model_dir, torch.float16, cfg.lora)
    before = _trainable(model)
    train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)
    log = _log(tmp_path)
    assert [r["skipped"] for r in log] == [True, True] and [r["loss_scale"] for r in log] == [2.0**60, 2.0**59]
    after = _trainable(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float16_run_matches_float32(tiny_model_dir, tiny_config, tmp_path):
    """The same 4 steps from the same weights, base in float16 (loss-scaled) and in float32. Measured on this
    tiny model (torch 2.13 CPU): per-step losses 1.5e-5 apart at most, and the LoRA weights' difference 3.7% of
    their change in training (AdamW's first steps move each weight by about the learning rate whatever the
    gradient's size, so small gradients' rounding shows). Tolerances: 1e-4 and 10%."""
    cfg = tiny_config(**{"train.learning_rate": 1e-3})
    runs = {}
    for dtype in (torch.float32, torch.float16):
        model = _model(tiny_model_dir, dtype, cfg.lora)
        start = _trainable(model)
        folder = tmp_path / str(dtype)
        folder.mkdir()
        train_adapter(model, _pairs(16), cfg, 0, folder, pad_id=0)
        runs[dtype] = (start, _trainable(model), _log(folder))
    (start, w32, log32), (_, w16, log16) = runs[torch.float32], runs[torch.float16]
    assert len(log16) == 4 and not any(r["skipped"] for r in log16) and "loss_scale" not in log32[0]
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(log32, log16))
    change = torch.cat([(w32[k] - start[k]).flatten() for k in start])
    gap = torch.cat([(w16[k] - w32[k]).flatten() for k in start])
    relative = float(gap.norm() / change.norm())
    print(f"fp16 vs fp32: largest per-step loss gap {loss_gap:.2e}, LoRA weight gap / change {relative:.2e}")
    assert loss_gap < 1e-4
    assert relative < 0.1
