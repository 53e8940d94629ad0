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


def test_4bit_merge_opponent_is_the_model_evaluated_before(tiny_config, tiny_model_dir, tmp_path):
    """Merge mode on a 4-bit base: the opponent of iteration 1 is exactly the model evaluated after iteration 0,
    Q(W) + delta_0, not the re-quantized Q(W + delta_0) (which a merge-then-quantize opponent would be)."""
    import torch
    from peft import PeftModel
    from spin_lite.config import ModelConfig
    from spin_lite.evaluate import score
    from spin_lite.model import load_base, merged_base

    cfg = tiny_config(mode="merge", iterations=2, **{"model.load_in_4bit": "true", "eval.enabled": "false"})
    SpinRun(cfg, log=lambda *a: None).run()
    from pathlib import Path
    root, pad = Path(cfg.run_dir), 2
    pairs = read_jsonl(root / "iter-01" / "pairs.jsonl")[:8]
    stored = torch.tensor([p["opponent_real"] for p in pairs] + [p["opponent_gen"] for p in pairs])

    def logps(model):
        prompts = [p["prompt_ids"] for p in pairs]
        real, _ = score(model, prompts, [p["real_ids"] for p in pairs], pad, 4)
        gen, _ = score(model, prompts, [p["gen_ids"] for p in pairs], pad, 4)
        return torch.tensor(real + gen)

    four_bit = ModelConfig(name=str(tiny_model_dir), load_in_4bit=True)
    evaluated = PeftModel.from_pretrained(load_base(four_bit), root / "iter-00" / "adapter")  # Q(W) + delta_0
    torch.testing.assert_close(stored, logps(evaluated), atol=1e-4, rtol=0)
    requantized = merged_base(four_bit, [str(root / "iter-00" / "adapter")], tmp_path / "merged")  # Q(W + delta_0)
    assert (logps(requantized) - stored).abs().max() > 1e-2, "the check could not tell the two opponents apart"
