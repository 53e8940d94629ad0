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
from spin_lite.train import spin_objective, train_adapter

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
    assert "train.loss_type must be logistic, hinge, apo_zero, dpop, tspin or space, got 'apo'" in str(e.value)
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


def test_tspin_keeps_the_starting_models_responses_and_scores_them_at_every_iteration(tiny_config):
    """A 2-iteration tspin run: iteration 0's generated responses are stored once (proto.jsonl) and are the
    proto-synthetic responses of iteration 1's pairs, train and previous-iteration pairs alike; iteration 1's steps
    log the historical advantage beta x (log p(y') - log p(y0)), iteration 0's have none (y0 is y' there)."""
    from spin_lite.run import SpinRun

    cfg = tiny_config(**{"train.loss_type": "tspin", "train.beta": 1.0, "train.learning_rate": 1e-3})
    run = SpinRun(cfg, log=lambda *a: None)
    run.run()
    rd = run.dir
    proto = {r["key"]: r["ids"] for r in read_jsonl(rd.proto_path)}
    first = read_jsonl(rd.iteration(0) / "pairs.jsonl")
    assert proto == {p["key"]: p["gen_ids"] for p in first} and len(proto) == 16  # 8 train, 4 val, 4 test rows
    second = read_jsonl(rd.iteration(1) / "pairs.jsonl")
    assert {p["split"] for p in second} == {"train", "train_prev", "val", "eval"}
    assert all(p["proto_ids"] == proto[p["key"]] for p in second)
    assert any(p["proto_ids"] != p["gen_ids"] for p in second if p["split"] == "train")  # a new opponent's answers
    log0, log1 = read_jsonl(rd.iteration(0) / "train_log.jsonl"), read_jsonl(rd.iteration(1) / "train_log.jsonl")
    assert all("history" not in r for r in log0) and all("history" in r for r in log1)
    for r in log1:  # reference-free: the rewards are the policy's own log-probs (beta 1)
        assert r["history"] == pytest.approx(r["logp_gen"] - r["logp_proto"], rel=1e-5, abs=1e-5)
        assert r["reward_real"] == pytest.approx(r["logp_real"], rel=1e-6)
    assert rd.summaries()[1]["train"]["history"] == pytest.approx(sum(r["history"] for r in log1) / len(log1))


def test_space_trains_and_logs_its_two_rewards(tiny_config, tiny_model_dir, tmp_path):
    """SPACE on 8 pairs: the rewards are beta x the log-ratios to the opponent, as logged, and the adapter moves."""
    cfg = tiny_config(**{"train.loss_type": "space", "train.beta": 1.0})
    model = _model(tiny_model_dir, cfg.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_adapter(model, _pairs(8), cfg, 0, tmp_path, pad_id=0)
    for r in read_jsonl(tmp_path / "train_log.jsonl"):
        assert r["reward_real"] == pytest.approx(r["logp_real"] - OPPONENT, rel=1e-6)
        assert r["reward_gen"] == pytest.approx(r["logp_gen"] - OPPONENT, rel=1e-6)
        assert 0 <= r["tie_share"] <= 1
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def _uneven_pairs(n: int, proto: bool) -> list[dict]:
    """Pairs of uneven lengths (prompts 2-13 tokens, responses 1-9), with proto-synthetic responses for tspin."""
    g = torch.Generator().manual_seed(11)
    words = lambda: torch.randint(200, 9000, (int(torch.randint(1, 10, (1,), generator=g)),),  # noqa: E731
                                  generator=g).tolist()
    return [{"prompt_ids": words() + words(), "real_ids": words(), "gen_ids": words(), "opponent_real": OPPONENT,
             "opponent_gen": OPPONENT, **({"proto_ids": words()} if proto else {})} for _ in range(n)]


@pytest.mark.parametrize("loss_type", ["logistic", "tspin"])
def test_packed_pairs_train_as_the_pairs_scored_apart(tiny_model_dir, tiny_config, tmp_path, loss_type):
    """train.pack_pairs: each pair as one row [prompt | real | generated (| proto: tspin)] gives the same step
    losses, logged log-probs, token counts and trained LoRA weights as the sequences scored apart (2 steps of 4
    pairs of uneven lengths, the anchor on; float32)."""
    logs, weights = {}, {}
    for packed in (False, True):
        cfg = tiny_config(**{"train.loss_type": loss_type, "train.beta": 0.5, "train.sft_weight": 1.0,
                             "train.learning_rate": 1e-3, "train.pack_pairs": str(packed).lower()})
        model = _model(tiny_model_dir, cfg.lora)
        (tmp_path / str(packed)).mkdir()
        train_adapter(model, _uneven_pairs(8, loss_type == "tspin"), cfg, 0, tmp_path / str(packed), pad_id=0)
        logs[packed] = read_jsonl(tmp_path / str(packed) / "train_log.jsonl")
        weights[packed] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(logs[True]) == len(logs[False]) == 2
    for apart, packed in zip(logs[False], logs[True]):
        for key in ("loss", "logp_real", "logp_gen", "nll_real") + (("logp_proto", "history") if loss_type == "tspin"
                                                                     else ()):
            assert packed[key] == pytest.approx(apart[key], rel=1e-5, abs=1e-5), key
    for name, w in weights[False].items():
        # (AdamW divides by the gradient's running size: where that is near 0 a float-rounding difference of the
        # gradient moves the weight by up to 1% of the two steps' change, 2e-3; measured 1.1e-5 at most)
        torch.testing.assert_close(weights[True][name], w, rtol=1e-4, atol=5e-5)
    objective = lambda packed: spin_objective(0.5, cfg.train, 0, packed=packed)  # noqa: E731
    pairs = _uneven_pairs(4, loss_type == "tspin")
    assert objective(True).batch(pairs).tokens == objective(False).batch(pairs).tokens  # tokens/s: like for like
    empty = [dict(pairs[0], prompt_ids=[])] + pairs[1:]  # nothing to share: the micro batch is scored apart
    assert type(objective(True).batch(empty)) is type(objective(False).batch(empty))


def test_packed_pairs_refuse_a_model_that_cannot_take_a_document_mask(tiny_model_dir, tiny_config, tmp_path):
    cfg = tiny_config(**{"train.pack_pairs": "true"})
    model = _model(tiny_model_dir, cfg.lora)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"train.pack_pairs: true needs .* its attention is flash_attention_2"):
        train_adapter(model, _pairs(4), cfg, 0, tmp_path, pad_id=0)
