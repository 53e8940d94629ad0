"""The time estimate shown before a run (spin_lite.estimate, `spin-lite estimate`, the Setup tab): its counts of
each stage's work equal what a real run of the same config then does, and its times are measured, positive
numbers. (How close the seconds come is a measurement, not a test: timings depend on the machine's load.)"""
from __future__ import annotations

import math

from conftest import cli, tiny_settings
from spin_lite.config import load_config
from spin_lite.estimate import StageEstimate, Throughput, estimate, estimate_run, stage_work, total_s
from spin_lite.run import SpinRun
from spin_lite.state import RunDir, read_jsonl


def test_work_counts_equal_a_real_runs(tiny_config):
    cfg = tiny_config()  # 8 training, 4 validation, 4 test rows; 2 iterations; previous pairs mixed in
    SpinRun(cfg, log=lambda *_: None).run()
    rd = RunDir(cfg.run_dir)
    work = stage_work(cfg, 8, 4, 4)
    for t, which in ((0, "first"), (1, "later")):
        pairs = read_jsonl(rd.iteration(t) / "pairs.jsonl")
        assert work["score"][which] == 2 * len(pairs)  # the real and the generated response of every pair
        assert work["train"][which] == len(read_jsonl(rd.iteration(t) / "train_log.jsonl"))
    generated = read_jsonl(rd.iteration(0) / "generations.jsonl")
    assert work["generate"]["batches"] == math.ceil(len(generated) / cfg.generation.batch_size) == 4
    assert work["evaluate"]["sequences"] == 2 * (4 + 4)


def test_times_are_work_times_measured_throughput():
    cfg = load_config(None, ["generation.batch_size=4", "generation.max_new_tokens=10", "train.micro_batch_size=2",
                             "train.gradient_accumulation_steps=2", "train.epochs=1", "iterations=3"])
    speed = Throughput(prefill_s=2.0, decode_step_s=0.5, score_batch_s=4.0, train_micro_s=3.0, device="cpu")
    stages = {s.stage: s for s in estimate(cfg, n_train=8, n_val=4, n_test=4, speed=speed)}
    assert stages["generate"].first_s == 4 * (2.0 + 9 * 0.5)  # 16 prompts in batches of 4, 10 tokens each
    assert stages["score"].first_s == 32 * 1.0 and stages["score"].later_s == 48 * 1.0  # 4 s / 4 sequences
    assert stages["train"].first_s == 2 * 2 * 3.0 and stages["train"].later_s == 4 * 2 * 3.0  # 2 micro a step
    answers = 2 * (2.0 + 9 * 0.5)  # 4 validation + 4 test prompts, one batch each
    assert stages["evaluate"].later_s == answers + 16 * 1.0
    assert stages["evaluate"].first_s == 2 * answers + 24 * 1.0  # and the starting model, once
    assert total_s(list(stages.values()), 3) == sum(s.first_s + 2 * s.later_s for s in stages.values())


def test_estimate_probes_the_model_and_the_cli_prints_it(tiny_model_dir, tmp_path):
    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run"))
    stages, line = estimate_run(cfg, log=lambda *_: None)
    assert [s.stage for s in stages] == ["generate", "score", "train", "evaluate"]
    assert all(isinstance(s, StageEstimate) and 0 < s.first_s < 600 and 0 < s.later_s < 600 for s in stages)
    assert "2 iteration(s)" in line and "8 training, 4 validation, 4 test rows" in line
    assert not (tmp_path / "run").exists()  # an estimate writes nothing
    done = cli("estimate", *tiny_settings(tiny_model_dir, tmp_path / "run"), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "2 iteration(s)" in done.stdout and not done.stderr.strip(), done.stderr


def test_the_sft_stage_and_the_control_are_counted():
    """With sft.enabled and sft.control, the estimate has an SFT stage (once) and a control per iteration: SFT steps
    at half a SPIN step's time (one sequence a row, not two), and an evaluation of each model they make."""
    cfg = load_config(None, ["generation.batch_size=4", "generation.max_new_tokens=10", "train.micro_batch_size=2",
                             "train.gradient_accumulation_steps=2", "train.epochs=1", "iterations=3",
                             "sft.enabled=true", "sft.epochs=2", "sft.control=true"])
    speed = Throughput(prefill_s=2.0, decode_step_s=0.5, score_batch_s=4.0, train_micro_s=3.0, device="cpu")
    stages = {s.stage: s for s in estimate(cfg, n_train=8, n_val=4, n_test=4, speed=speed)}
    evaluation = 2 * (2.0 + 9 * 0.5) + 8 * 1.0  # greedy answers to 8 held-out prompts, their real responses scored
    assert stages["sft"].first_s == 4 * 2 * 1.5 + evaluation and stages["sft"].later_s == 0  # 2 epochs of 2 steps
    assert stages["control"].first_s == 2 * 2 * 1.5 + evaluation  # as many steps as SPIN's iteration 0
    assert stages["control"].later_s == 4 * 2 * 1.5 + evaluation
    plain = {s.stage for s in estimate(load_config(None, []), n_train=8, n_val=4, n_test=4, speed=speed)}
    assert "sft" not in plain and "control" not in plain
