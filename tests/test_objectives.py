"""The objectives that keep the real responses' likelihood (train.loss_type apo_zero, dpop) in a real training loop,
what each step logs about the real responses, and the SPIN learning rate set relative to the SFT rate.

Run alone: .venv/bin/python -m pytest -q tests/test_objectives.py
"""
from __future__ import annotations

import pytest
import torch
import yaml

from spin_lite.config import ConfigError, SpinConfig, load_config
from spin_lite.state import read_jsonl
from spin_lite.train import train_adapter

OPPONENT = -60.0  # every pair's stored opponent log-probs (real and generated)


def _model(model_dir, lora):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spin_lite.model import lora_config
    torch.manual_seed(7)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config(lora))


def _pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    words = lambda k: torch.randint(200, 9000, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": words(10), "real_ids": words(6), "gen_ids": words(6),
             "opponent_real": OPPONENT, "opponent_gen": OPPONENT} for _ in range(n)]


@pytest.mark.parametrize("loss_type", ["apo_zero", "dpop", "logistic"])
def test_each_step_logs_the_real_responses_reward_and_log_ratio(tiny_model_dir, tiny_config, tmp_path, loss_type):
    """2 steps of 4 pairs. Each step's line has the real (and generated) responses' mean log-ratio to the opponent
    and their reward = beta x that; the log-ratio is the mean policy log-prob minus the opponent's (-60), which
    the line also has; train_metrics (the last epoch's means) has them too. The adapter moved."""
    cfg = tiny_config(**{"train.loss_type": loss_type, "train.beta": 0.5})
    model = _model(tiny_model_dir, cfg.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert len(log) == 2
    for r in log:
        assert r["logratio_real"] == pytest.approx(r["logp_real"] - OPPONENT, rel=1e-6)
        assert r["logratio_gen"] == pytest.approx(r["logp_gen"] - OPPONENT, rel=1e-6)
        assert r["reward_real"] == pytest.approx(0.5 * r["logratio_real"], rel=1e-6)
        assert r["reward_gen"] == pytest.approx(0.5 * r["logratio_gen"], rel=1e-6)
    for key in ("reward_real", "logratio_real", "reward_gen", "logratio_gen"):
        assert metrics[key] == pytest.approx(sum(r[key] for r in log) / 2)  # 1 epoch of 2 steps
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_loss_types_and_dpop_lambda_are_checked(tiny_config):
    with pytest.raises(ConfigError) as e:
        tiny_config(**{"train.loss_type": "apo", "train.dpop_lambda": -1})
    assert "train.loss_type must be logistic, hinge, apo_zero or dpop, got 'apo'" in str(e.value)
    assert "train.dpop_lambda must be a finite number >= 0, got -1" in str(e.value)
    assert tiny_config(**{"train.loss_type": "dpop", "train.dpop_lambda": 0}).train.dpop_lambda == 0


def test_learning_rate_relative_to_the_sft_rate():
    """The paper's recipe: SPIN at 5e-7 = 1/40 of the 2e-5 its SFT model was trained at."""
    cfg = load_config(None, ["train.lr_ratio_to_sft=0.025", "train.sft_learning_rate=2e-5"])
    assert cfg.train.learning_rate == 5e-7 and cfg.lr_at(0) == 5e-7  # the saved config holds the rate trained at
    per_iteration = load_config(None, ["train.lr_ratio_to_sft=[0.25, 0.05]", "train.sft_learning_rate=2e-4"])
    assert [per_iteration.lr_at(t) for t in range(3)] == [5e-5, 1e-5, 1e-5]
    # the config as saved in a run directory (both set, agreeing) loads again to the same rates
    again = SpinConfig.from_dict(yaml.safe_load(per_iteration.to_yaml()))
    assert again.train.learning_rate == [5e-5, 1e-5] and again.to_dict() == per_iteration.to_dict()
    # without a ratio nothing changes: sft_learning_rate alone is only a record
    assert load_config(None, ["train.sft_learning_rate=2e-4"]).train.learning_rate == 5e-5
    # with the run's own SFT stage, the ratio is of that stage's rate
    staged = load_config(None, ["train.lr_ratio_to_sft=0.25", "sft.enabled=true", "sft.learning_rate=1e-4"])
    assert staged.train.learning_rate == 2.5e-5


@pytest.mark.parametrize("overrides,message", [
    (["train.lr_ratio_to_sft=0.025", "sft.control=true"],  # the control arm is no SFT stage: its rate is not the start's
     "train.lr_ratio_to_sft needs the rate the starting model's SFT was trained at: train.sft_learning_rate"),
    (["train.lr_ratio_to_sft=0.5", "train.sft_learning_rate=2e-4", "train.learning_rate=5e-4"],
     "train.learning_rate (0.0005) disagrees with train.lr_ratio_to_sft x the SFT rate (0.0001): "
     "set one of learning_rate and lr_ratio_to_sft, not both"),
    (["train.lr_ratio_to_sft=[0.5, 0.1]", "train.sft_learning_rate=2e-4", "train.learning_rate=1e-4"],
     "disagrees with train.lr_ratio_to_sft x the SFT rate ([0.0001, 2e-05])"),
    (["train.lr_ratio_to_sft=0", "train.sft_learning_rate=2e-4"],
     "train.lr_ratio_to_sft must be null, a positive number or a non-empty list of them (finite), got 0"),
    (["train.lr_ratio_to_sft=[]", "train.sft_learning_rate=2e-4"], "train.lr_ratio_to_sft must be null"),
    (["train.sft_learning_rate=-2e-4"], "train.sft_learning_rate must be null or a number > 0, got -0.0002"),
])
def test_relative_learning_rate_problems(overrides, message):
    with pytest.raises(ConfigError, match="invalid configuration") as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_a_learning_rate_that_agrees_with_the_ratio_is_accepted():
    cfg = load_config(None, ["train.lr_ratio_to_sft=0.5", "train.sft_learning_rate=2e-4", "train.learning_rate=1e-4"])
    assert cfg.lr_at(0) == 1e-4
