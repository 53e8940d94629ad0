"""The 4-bit (QLoRA, bitsandbytes nf4) path on the CPU, on a tiny model: same code path as 16/32-bit LoRA."""
import math

import pytest

from spin_lite.run import SpinRun
from spin_lite.state import read_jsonl

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("mode,iterations", [("stack", 1), ("merge", 2)])
def test_qlora_iterations(tiny_config, mode, iterations):
    cfg = tiny_config(mode=mode, iterations=iterations, **{"model.load_in_4bit": "true"})
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    model = run.model_for(0)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the base was not quantized"
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    run._release(model)
    run.run()
    for t in range(iterations):
        out = run.dir.iteration(t)
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        log = read_jsonl(out / "train_log.jsonl")
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)  # the new adapter starts as the opponent
        assert log[-1]["loss"] < log[0]["loss"]
    assert (run.dir.root / "eval-start.json").exists() and run.dir.summaries()[-1]["eval"]["logp_per_token"] < 0
    assert not (run.dir.root / "merged-base").exists()  # the re-quantized merge's 16-bit copy is cleaned up


def test_gradients_flow_through_4bit_layers_after_an_eval_forward(tiny_model_dir, tokenizer):
    """Generation and scoring (eval mode) come right before training; the gradients must be those of a model
    that never ran in eval mode (bitsandbytes' CPU repacking has no backward:
    spin_lite.model.disable_cpu_4bit_repacking)."""
    import torch
    from spin_lite.config import LoraSettings, ModelConfig
    from spin_lite.data import encode_prompt, encode_response
    from spin_lite.logprobs import collate, sequence_logprobs
    from spin_lite.model import load_base, with_adapter

    model = with_adapter(load_base(ModelConfig(name=str(tiny_model_dir), load_in_4bit=True)), LoraSettings(), None)
    for name, p in model.named_parameters():  # non-zero B so that every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = collate([encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])],
                    [encode_response(tokenizer, "Hello there, friend.")], tokenizer.pad_token_id)

    def grads():
        model.train()
        model.zero_grad()
        sequence_logprobs(model, batch)[0].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch.input_ids)
    after = grads()
    first_layer = [n for n in before if ".layers.0." in n]
    assert first_layer and all(before[n].abs().sum() > 0 for n in first_layer)
    for n in before:
        assert torch.equal(after[n], before[n]), n
