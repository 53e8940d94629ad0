"""The opponent's identity: from iteration 1 on it is the previous iteration's adapter (stack) or the base
with that adapter merged in (merge); it stays frozen, and training changes only the new adapter."""
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spin_lite.evaluate import score
from spin_lite.run import SpinRun
from spin_lite.state import read_jsonl

from conftest import tree_digest


def opponent_scores(model, pairs, pad_id):
    prompts = [p["prompt_ids"] for p in pairs]
    real, _ = score(model, prompts, [p["real_ids"] for p in pairs], pad_id, 4)
    gen, _ = score(model, prompts, [p["gen_ids"] for p in pairs], pad_id, 4)
    return torch.tensor(real), torch.tensor(gen)


def first_step(run_dir, t):
    return json.loads((run_dir / f"iter-{t:02d}" / "train_log.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("mode", ["stack", "merge"])
def test_opponent_is_previous_iteration(tiny_config, tiny_model_dir, mode):
    cfg = tiny_config(mode=mode, **{"eval.enabled": "false"})
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    root = run.dir.root
    run.iteration(0)
    adapter0 = root / "iter-00" / "adapter"
    digest0 = tree_digest(adapter0)
    run.iteration(1)
    assert tree_digest(adapter0) == digest0, "the opponent's adapter was modified"

    pad = run.tokenizer.pad_token_id
    pairs1 = read_jsonl(root / "iter-01" / "pairs.jsonl")
    stored_real = torch.tensor([p["opponent_real"] for p in pairs1])
    stored_gen = torch.tensor([p["opponent_gen"] for p in pairs1])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if mode == "merge":
        expected = PeftModel.from_pretrained(base, adapter0).merge_and_unload()
    else:
        expected = PeftModel.from_pretrained(base, adapter0)
    real, gen = opponent_scores(expected, pairs1, pad)
    torch.testing.assert_close(stored_real, real, atol=1e-4, rtol=0)
    torch.testing.assert_close(stored_gen, gen, atol=1e-4, rtol=0)

    # The check can fail: adapter 0 moved the log-probs far from the base's, so a base opponent is detectable.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_real, _ = opponent_scores(plain, pairs1, pad)
    assert (base_real - real).abs().mean() > 0.5

    # The new adapter starts equal to the opponent: the first step's loss is log 2 and its margin 0.
    for t in (0, 1):
        step = first_step(root, t)
        assert step["loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert abs(step["margin"]) < 1e-3
    # ... and training moved it.
    assert first_step(root, 1)["loss"] != read_jsonl(root / "iter-01" / "train_log.jsonl")[-1]["loss"]
    a0 = load_file(adapter0 / "adapter_model.safetensors")
    a1 = load_file(root / "iter-01" / "adapter" / "adapter_model.safetensors")
    assert a0.keys() == a1.keys()
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    # iteration 1 trained on its own pairs and the previous iteration's (the paper's mixing)
    assert sum(p["split"] == "train_prev" for p in pairs1) == sum(p["split"] == "train" for p in pairs1) == 8


def test_training_changes_only_the_adapter(tiny_config, tiny_model_dir):
    cfg = tiny_config(iterations=1, **{"eval.enabled": "false"})
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    model = run.model_for(0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run._release(model)
    run.iteration(0)
    base_after = dict(run.base.named_parameters())
    fresh = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert base_after.keys() == fresh.keys()
    for name, p in fresh.items():
        assert torch.equal(base_after[name].detach(), p.detach()), f"base weight {name} changed"
    for name, p in frozen_before.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, base_after[key].detach()), f"frozen weight {name} changed"
    trained = load_file(run.dir.iteration(0) / "adapter" / "adapter_model.safetensors")
    changed = [k for k in trained if not torch.equal(trained[k], lora_before[_peft_name(k, lora_before)])]
    assert changed, "training did not change the adapter"


def _peft_name(saved_key: str, names) -> str:
    """adapter_model.safetensors drops the adapter name ('.default') from parameter names."""
    return next(n for n in names if n.replace(".default", "") == saved_key)
