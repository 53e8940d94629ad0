"""bfloat16 autocast for training (train.autocast) and the step's host reads, on the CPU.

Autocast: the tiny model with a bfloat16 base under torch.autocast(bfloat16) gives the loss and LoRA gradients of the
same model in float32 within bfloat16's rounding, its LoRA layers read their bfloat16 inputs as they are (no float32
copy), and the LoRA weights, their gradients and AdamW's state stay float32.

Run alone: .venv/bin/python -m pytest -q tests/test_precision.py
"""
from __future__ import annotations

import pytest
import torch

from spin_lite.logprobs import autocasts, collate, mixed_precision, sequence_logprobs
from spin_lite.loss import spin_loss
from spin_lite.train import train_adapter

from test_fp16 import _log, _model, _pairs, _trainable


def _lora_b_nonzero(model):
    """LoRA B matrices made non-zero (a fresh adapter's are 0, which would hide the LoRA branch's precision)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _loss_and_grads(model, setting: str, pairs: list[dict]):
    """The SPIN loss of `pairs` (real and generated in one batch, as train.spin_objective builds it) and the LoRA
    gradients, the forward and loss in mixed_precision(model, setting); also the dtypes the LoRA A layers saw."""
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    prompts = [p["prompt_ids"] for p in pairs]
    batch = collate(prompts + prompts, [p["real_ids"] for p in pairs] + [p["gen_ids"] for p in pairs], 0)
    model.zero_grad(set_to_none=True)
    n = len(pairs)
    with mixed_precision(model, setting):
        logps, counts = sequence_logprobs(model, batch)
        opponent = torch.full((n,), -60.0)
        loss = spin_loss(logps[:n], logps[n:], opponent, opponent, 0.1, "logistic", 0.5, counts[:n]).losses.mean()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), logps.detach(), grads, seen


def test_bfloat16_autocast_matches_float32_without_copying_lora_inputs(tiny_model_dir, tiny_config):
    """Measured on the tiny model (torch 2.13 CPU): summed log-probs 7.7e-5 apart (relative), loss 6.12381 against
    6.12377, the LoRA gradients' difference 1.0% of their norm (bfloat16 keeps 8 bits of mantissa: 0.4% a
    rounding). Tolerances: 1e-3, 1e-3 and 3%."""
    cfg = tiny_config()
    pairs = _pairs(4)
    fp32 = _lora_b_nonzero(_model(tiny_model_dir, torch.float32, cfg.lora))
    bf16 = _lora_b_nonzero(_model(tiny_model_dir, torch.bfloat16, cfg.lora))
    assert not autocasts(bf16, "auto") and autocasts(bf16, "always")  # auto: on CUDA only
    assert not autocasts(fp32, "always") and not autocasts(bf16, "never")
    loss32, logps32, grads32, seen32 = _loss_and_grads(fp32, "always", pairs)  # float32: "always" changes nothing
    loss16, logps16, grads16, seen16 = _loss_and_grads(bf16, "always", pairs)
    _, _, _, seen_off = _loss_and_grads(bf16, "never", pairs)
    assert seen32 == {torch.float32} and seen_off == {torch.float32}  # never: PEFT copies each input to float32
    assert seen16 == {torch.bfloat16}  # autocast: the LoRA layers take the bfloat16 activations as they are
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert {g.dtype for g in grads16.values()} == {torch.float32}
    torch.testing.assert_close(logps16, logps32, rtol=1e-3, atol=0.0)
    assert abs(loss16 - loss32) <= 1e-3 * abs(loss32)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[k].flatten() for k in grads32])
    relative = float((flat16 - flat32).norm() / flat32.norm())
    gap = float(((logps16 - logps32).abs() / logps32.abs()).max())
    print(f"bf16 autocast vs fp32: log-probs {gap:.1e} apart, loss {loss16:.5f} vs {loss32:.5f}, gradient difference "
          f"{relative:.2e} of its norm")
    assert relative < 3e-2


def test_training_under_autocast_keeps_lora_and_adamw_in_float32(tiny_model_dir, tiny_config, tmp_path):
    """train.autocast=always over a bfloat16 base: two steps train, the LoRA weights and AdamW's moments stay float32,
    and no loss scaler (bfloat16 has float32's range)."""
    cfg = tiny_config(**{"train.autocast": "always"})
    model = _model(tiny_model_dir, torch.bfloat16, cfg.lora)
    before = _trainable(model)
    train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)
    after = _trainable(model)
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert state["scaler"] is None and len(_log(tmp_path)) == 2


def test_a_training_step_reads_the_device_once(tiny_model_dir, tiny_config, tmp_path, monkeypatch):
    """Every read of a tensor's values by spin_lite's code during training (on a GPU each one waits for the device
    to finish its queued work) is listed by the function that makes it: one a step (`_read_step`: the metrics, the
    gradient norm and the weights check of the step before, together), and the weights check before the end
    (`fit`). Before: a float() per metric per micro batch, the token count, a read per trainable parameter, the
    boolean indexing of the log-prob path."""
    import sys
    from pathlib import Path

    import spin_lite
    package = str(Path(spin_lite.__file__).parent)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package):
                reads.append(caller.co_name)
            return original(self, *args, **kwargs)
        return read

    cfg = tiny_config(**{"train.save_every": 100})
    model = _model(tiny_model_dir, torch.float32, cfg.lora)
    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    train_adapter(model, _pairs(12), cfg, 0, tmp_path, pad_id=0)  # 3 steps of 2 micro batches
    monkeypatch.undo()
    device_reads = [r for r in reads if r != "epoch_order"]  # (the data order: a CPU generator's numbers)
    assert device_reads == ["_read_step"] * 3 + ["fit"], reads
    assert len(_log(tmp_path)) == 3


# -- the shared prompt processed once ---------------------------------------------------------------------------------
def test_packed_rows_give_each_response_its_own_logprobs_and_gradients(tiny_model_dir, tiny_config):
    """Three prompts of different lengths, each with a real and a generated response of different lengths, packed
    as [prompt | real | generated] with a document mask: the same summed log-probs and LoRA gradients as the two
    sequences prompt + real and prompt + generated scored apart (float32; measured: the log-probs equal, the
    gradients 1e-6 apart; tolerances 1e-5 and 1e-4)."""
    from spin_lite.logprobs import pack, packed_logprobs
    cfg = tiny_config()
    model = _lora_b_nonzero(_model(tiny_model_dir, torch.float32, cfg.lora))
    g = torch.Generator().manual_seed(5)
    words = lambda k: torch.randint(200, 9000, (k,), generator=g).tolist()  # noqa: E731
    prompts = [words(n) for n in (7, 12, 3)]
    real, gen = [words(n) for n in (5, 2, 9)], [words(n) for n in (6, 8, 1)]
    apart = {}
    for name, score in (("apart", lambda: sequence_logprobs(model, collate(prompts + prompts, real + gen, 0))),
                        ("packed", lambda: packed_logprobs(model, pack(prompts, [list(r) for r in zip(real, gen)], 0)))):
        model.zero_grad(set_to_none=True)
        logps, counts = score()
        if name == "packed":
            logps, counts = logps.T.reshape(-1), counts.T.reshape(-1)  # [B, 2] -> real of every row, then generated
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # a different weight a sequence
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        apart[name] = (logps.detach(), counts, grads)
    (l1, c1, g1), (l2, c2, g2) = apart["apart"], apart["packed"]
    assert torch.equal(c1, c2)
    print(f"packed vs apart: log-probs {float((l2 - l1).abs().max()):.1e} apart, gradients "
          f"{max(float((g2[k] - g1[k]).abs().max()) for k in g1):.1e}")
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6)


def test_the_document_mask_as_a_flex_block_mask_equals_the_dense_one():
    """The flex_attention path (a BlockMask; on a GPU the fused kernel) attends as the dense mask does: flex_attention
    run eagerly on the CPU against sdpa with the dense mask, 4 query heads over 2 key/value heads."""
    from torch.nn.attention.flex_attention import flex_attention

    from spin_lite.logprobs import document_mask, pack
    packed = pack([[5, 6, 7], [8]], [[[9, 10], [11, 12, 13]], [[14], [15, 16]]], 0)
    torch.manual_seed(0)
    length = packed.input_ids.shape[1]
    q, k, v = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    dense = document_mask(packed.document, "sdpa")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                v.repeat_interleave(2, 1), attn_mask=dense)
    got = flex_attention(q, k, v, block_mask=document_mask(packed.document, "flex_attention"), enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the second response of row 0 (positions 5-7) sees the prompt (0-2) and itself, not the first response (3-4)
    assert dense[0, 0, 6].tolist()[:8] == [True, True, True, False, False, True, True, False]


def test_compiled_decoder_layers_train_as_the_layers_do_and_are_undone_after(tiny_model_dir, tiny_config, tmp_path,
                                                                               monkeypatch):
    """train.fused_kernels: compile, on the CPU with torch.compile's aot_eager backend (the graphs inductor would
    fuse on a GPU, run without generating code): during training every decoder layer runs compiled (gradient
    checkpointing on, as by default), the step losses and trained LoRA weights equal the uncompiled model's, and
    after the training phase the layers are uncompiled again (scoring and generation run transformers' model)."""
    from spin_lite import kernels
    monkeypatch.setattr(kernels, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    runs = {}
    for setting in ("none", "compile"):
        cfg = tiny_config(**{"train.fused_kernels": setting, "train.learning_rate": 1e-3,
                             "train.gradient_checkpointing": "true"})
        model = _model(tiny_model_dir, torch.float32, cfg.lora)
        layers = kernels.decoder_layers(model)
        during = []
        (tmp_path / setting).mkdir()
        train_adapter(model, _pairs(8), cfg, 0, tmp_path / setting, pad_id=0,
                      progress=lambda *a: during.append([layer._compiled_call_impl is not None for layer in layers]))
        runs[setting] = (_log(tmp_path / setting), _trainable(model), during,
                         [layer._compiled_call_impl for layer in layers])
    (log, weights, during, after), (plain_log, plain_weights, plain_during, _) = runs["compile"], runs["none"]
    assert len(layers) == 2 and during == [[True, True]] * 2 and plain_during == [[False, False]] * 2
    assert after == [None, None]
    for step, plain in zip(log, plain_log):
        assert step["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for name, w in plain_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-6)


def test_fused_kernels_are_refused_by_name_where_they_cannot_run(tiny_model_dir, tiny_config, tmp_path):
    """liger needs CUDA (Triton kernels): on the CPU a named refusal before any step, nothing left patched."""
    from spin_lite.config import ConfigError
    cfg = tiny_config(**{"train.fused_kernels": "liger"})
    model = _model(tiny_model_dir, torch.float32, cfg.lora)
    with pytest.raises(ConfigError, match=r"train.fused_kernels: liger needs a CUDA GPU .* Set train.fused_kernels"):
        train_adapter(model, _pairs(4), cfg, 0, tmp_path, pad_id=0)
    assert not (tmp_path / "train_log.jsonl").read_text().strip()  # no step ran
    assert all("forward" not in m.__dict__ for m in model.modules())
