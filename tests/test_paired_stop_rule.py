"""The stop rule's paired test over validation rows (spin_lite.evaluate.paired_compare / judge): one row of 16
neither vetoes a clear gain nor passes a gain inside the noise; the verdict is deterministic and says its numbers;
the run's stop rule uses it, and falls back to the aggregate rule for runs without per-row scores.

The bootstrap's tail shares used below, by hand: a row is left out of one draw of 16 rows with probability
(15/16)^16 = 0.356, so a rate that differs on one row alone has 0 inside its interval in 36% of draws, far above
the 5% a 90% interval leaves on each side; 2 rows: (14/16)^16 = 0.118, still above 5% (but below the 15% of an
70% interval); 3 rows: (13/16)^16 = 0.036, below 5%."""
import json
import random
import sys
from pathlib import Path

import pytest

from spin_lite.config import ConfigError, load_config
from spin_lite.evaluate import compare, holm, judge, paired_compare
from spin_lite.report import format_table
from spin_lite.run import SpinRun
from spin_lite.state import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from stop_rule_replay import replay  # noqa: E402

N = 16


def start_rows() -> dict:
    """16 validation rows of 10..25 response tokens, log-likelihood per token -2.0 to -2.4, every answer ends."""
    return {f"val:{k}": {"logp": (-2.0 - 0.1 * (k % 5)) * (10 + k), "tokens": 10 + k, "ended": True,
                         "repetitive": False} for k in range(N)}


def shifted(rows: dict, per_token, **flags) -> dict:
    """`rows` with each row's log-likelihood per token moved by per_token(k), and flags set on some rows
    ({"repetitive": [3, 7]}: those rows loop)."""
    out = {}
    for k, (key, r) in enumerate(rows.items()):
        out[key] = r | {"logp": r["logp"] + per_token(k) * r["tokens"]}
        for flag, which in flags.items():
            if k in which:
                out[key][flag] = not r[flag]
    return out


def aggregate(rows: dict) -> dict:
    """The metrics as evaluate() computes them from the same rows."""
    return {"logp_per_token": sum(r["logp"] for r in rows.values()) / sum(r["tokens"] for r in rows.values()),
            "ended_rate": sum(r["ended"] for r in rows.values()) / len(rows),
            "repetition_rate": sum(r["repetitive"] for r in rows.values()) / len(rows)}


def clear_gain(k: int) -> float:
    return 0.3 + 0.05 * (k % 3 - 1)  # +0.25 to +0.35 nats a token on every row


def test_one_bad_row_of_16_does_not_veto_a_clear_gain():
    old = start_rows()
    new = shifted(old, clear_gain, repetitive=[7], ended=[7])  # row 7 starts looping and runs to the cap
    assert compare(aggregate(new), aggregate(old))  # the aggregate rule rejected it: 0.00 -> 0.06 repetitive
    v = paired_compare(new, old)
    assert v.better and not v.worse and v.reasons == [] and v.rows == 16
    d = {x.metric: x for x in v.differences}
    assert d["logp_per_token"].low > 0.2
    assert d["repetition_rate"].new == 1 / 16 and d["repetition_rate"].low == 0.0  # row 7 absent from 36% of draws
    assert d["ended_rate"].high == 0.0


def test_a_small_mean_gain_inside_the_noise_does_not_pass_as_a_gain():
    """Rows alternate +0.52 and -0.48 nats a token: over 136 tokens of even rows and 144 of odd ones the mean
    moves (0.52 x 136 - 0.48 x 144) / 280 = +0.0057, which the aggregate rule took for a gain."""
    old = start_rows()
    new = shifted(old, lambda k: 0.52 if k % 2 == 0 else -0.48)
    assert compare(aggregate(new), aggregate(old)) == []  # the aggregate rule accepted it as better
    v = paired_compare(new, old)
    assert not v.better and not v.worse
    logp = v.differences[0]
    assert logp.new - logp.old == pytest.approx(1.6 / 280) and logp.low < 0 < logp.high
    assert v.reasons == [f"val logp/tok did not rise clearly: {logp.old:.3f} -> {logp.new:.3f}, difference +0.006, "
                         f"90% interval [{logp.low:+.3f}, {logp.high:+.3f}] over 16 rows"]
    assert judge(aggregate(new), aggregate(old), new, old).better is False


def test_a_real_loss_is_worse_with_its_numbers_and_the_confidence_is_a_setting():
    old = start_rows()
    # Holm over the 3 metrics compared (logp, ended, repetitive): the smallest p must be <= 0.05 / 3 = 0.0167.
    # A row set with k of 16 rows repetitive draws none of them with probability (1 - k/16)^16: 4 rows 0.010,
    # 3 rows 0.036 (worse at one-sided 5% alone, as the uncorrected rule had it; not after the correction).
    four = paired_compare(shifted(old, clear_gain, repetitive=[1, 5, 9, 13]), old)
    assert four.worse and not four.better
    assert four.reasons[0].startswith("val repetitive got worse: 0.00 -> 0.25, difference +0.25, 90% interval [+0.")
    assert four.reasons[0].endswith("] over 16 rows")
    three = shifted(old, clear_gain, repetitive=[1, 5, 9])
    verdict = paired_compare(three, old)
    assert not verdict.worse and verdict.differences[-1].p_worse == pytest.approx(0.036, abs=0.01)
    assert paired_compare(three, old, confidence=0.7).worse  # family 15%: 0.036 <= 0.05
    # a constant loss of 0.5 nats a token on every row: every draw gives exactly -0.5
    lower = paired_compare(shifted(old, lambda k: -0.5), old)
    assert lower.worse and lower.reasons == [f"val logp/tok got worse: {aggregate(old)['logp_per_token']:.3f} -> "
                                             f"{aggregate(old)['logp_per_token'] - 0.5:.3f}, difference -0.500, "
                                             "90% interval [-0.500, -0.500] over 16 rows"]


def test_holm_by_hand():
    """p-values 0.01, 0.04, 0.03 at family alpha 0.05: sorted 0.01 <= 0.05/3 = 0.0167 rejected; then 0.03 > 0.05/2
    = 0.025 stops: only the first. (Bonferroni, 0.05/3 for each, agrees here; the uncorrected rule rejects all 3.)
    p-values 0.01, 0.02, 0.04: 0.01 <= 0.0167, 0.02 <= 0.025, 0.04 <= 0.05: all three."""
    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]
    assert holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]
    assert holm([0.2, 0.5], 0.05) == [False, False] and holm([], 0.05) == []


def test_false_vetoes_on_unchanged_models_fall_with_the_correction():
    """200 pairs of models that differ only by chance (each row's flags and log-likelihoods drawn afresh, 16 rows,
    4 metrics compared: logp, ended, repetitive, task): the uncorrected rule (each metric at one-sided 5%) vetoes
    about 1 - 0.95^4 = 19% of them (21% here); Holm brings it to 8% (the percentile bootstrap on 16 rows is a
    little liberal: 5% is the nominal rate)."""
    rng = random.Random(5)
    def rows():
        return {f"val:{k}": {"logp": -20 + rng.gauss(0, 2), "tokens": 10, "ended": rng.random() < 0.8,
                             "repetitive": rng.random() < 0.2, "task": rng.random() < 0.5} for k in range(16)}
    verdicts = [paired_compare(rows(), rows(), resamples=500) for _ in range(200)]
    corrected = sum(v.worse for v in verdicts) / 200
    uncorrected = sum(any(max(d.sign * d.low, d.sign * d.high) < 0 for d in v.differences) for v in verdicts) / 200
    assert corrected <= 0.10 and uncorrected >= 0.15 and uncorrected >= 2 * corrected


def test_the_verdict_is_deterministic():
    old = start_rows()
    new = shifted(old, lambda k: 0.52 if k % 2 == 0 else -0.48, repetitive=[3])
    first = paired_compare(new, old).to_dict()
    keys = list(new)
    random.Random(1).shuffle(keys)
    assert paired_compare({k: new[k] for k in keys}, old).to_dict() == first  # row order does not matter
    assert json.loads(json.dumps(first)) == first and first["rule"] == "paired"
    assert set(first["differences"]) == {"logp_per_token", "ended_rate", "repetition_rate"}


def write_model(path: Path, rows: dict, start: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"metrics": {}} if start else {"test": {}}
    path.write_text(json.dumps(metrics | {"val": aggregate(rows), "val_rows": rows}))


def test_the_runs_stop_rule_uses_the_paired_test(tmp_path):
    """A run directory made by hand: iteration 0 gains clearly on every row but one answer of 16 starts looping
    (the aggregate rule rejected such an iteration and stopped the run); iteration 1 moves inside the noise."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.stop_when=no_gain"])
    rd = RunDir(cfg.run_dir)
    old = start_rows()
    write_model(rd.root / "eval-start.json", old, start=True)
    it0 = shifted(old, clear_gain, repetitive=[7])
    write_model(rd.iteration(0) / "eval.json", it0)
    run = SpinRun(cfg, log=lambda *a: None)
    s0 = run.selection(0, aggregate(it0))
    assert s0["accepted"] and s0["better"] and s0["reasons"] == [] and not s0["stop"]
    assert s0["rule"] == "paired" and s0["confidence"] == 0.9 and s0["rows"] == 16
    assert s0["differences"]["repetition_rate"]["difference"] == 0.0625
    summary = {"eval": {}, "train": {"loss": 0.6, "accuracy": 1.0}}
    (rd.iteration(0) / "summary.json").write_text(json.dumps(summary | {"iteration": 0, "val": aggregate(it0),
                                                                        "selection": s0}))
    assert rd.best_iteration() == 0

    it1 = shifted(it0, lambda k: 0.52 if k % 2 == 0 else -0.48)
    write_model(rd.iteration(1) / "eval.json", it1)
    s1 = run.selection(1, aggregate(it1))  # judged against iteration 0, the best before it
    assert s1["compared_with"] == "iteration 0" and s1["accepted"] and not s1["better"] and not s1["stop"]
    assert s1["reasons"][0].startswith("val logp/tok did not rise clearly")
    (rd.iteration(1) / "summary.json").write_text(json.dumps(summary | {"iteration": 1, "val": aggregate(it1),
                                                                        "selection": s1}))
    assert rd.best_iteration() == 0 and rd.rejected_in_a_row() == 0  # not chosen, not a rejection either
    table = format_table(rd, cfg)
    assert f"iter 1: not clearly better than iteration 0 on validation ({s1['reasons'][0]})\n" in table
    assert "iter 0: not" not in table and "chosen on the validation rows: iteration 0" in table

    # a run made before per-row scores were stored: the aggregate rule, as it was
    write_model(rd.root / "eval-start.json", old, start=True)
    start = json.loads((rd.root / "eval-start.json").read_text())
    del start["val_rows"]
    (rd.root / "eval-start.json").write_text(json.dumps(start))
    for t in (0, 1):
        (rd.iteration(t) / "summary.json").unlink()
    legacy = run.selection(0, aggregate(it0))
    assert legacy["rule"] == "aggregate" and not legacy["accepted"] and not legacy["better"] and legacy["stop"]
    assert legacy["reasons"] == compare(aggregate(it0), aggregate(old))


def test_stop_confidence_is_checked():
    with pytest.raises(ConfigError, match="train.stop_confidence must be a number between 0 and 1"):
        load_config(None, ["train.stop_confidence=1.5"])
    assert load_config(None, []).train.stop_confidence == 0.9


def test_replay_counts_the_verdicts_the_paired_rule_changes(tmp_path):
    """Verdicts recorded by the aggregate rule on a run with per-row scores: iteration 0 was rejected for one
    looping row; replayed, it is chosen, and iteration 1 (recorded against the start) is judged against it."""
    rd = RunDir(tmp_path / "run")
    old = start_rows()
    write_model(rd.root / "eval-start.json", old, start=True)
    it0 = shifted(old, clear_gain, repetitive=[7])
    it1 = shifted(it0, lambda k: -0.5)
    for t, rows in ((0, it0), (1, it1)):
        write_model(rd.iteration(t) / "eval.json", rows)
        reasons = compare(aggregate(rows), aggregate(old))
        (rd.iteration(t) / "summary.json").write_text(json.dumps({
            "iteration": t, "val": aggregate(rows), "eval": {},
            "selection": {"compared_with": "the starting model", "accepted": not reasons, "reasons": reasons}}))
    first, second = replay(rd.root)
    assert first["recorded"] == {"accepted": False, "chosen": False, "compared_with": "the starting model",
                                 "reasons": compare(aggregate(it0), aggregate(old))}
    assert first["replayed"]["chosen"] and first["changed"] and first["test_vs_start"] is None
    # the old rule on the same pair vetoes for the one looping row; the change is counted, with no test rows to judge it
    assert not first["old_rule"]["accepted"] and first["changed_from_old_rule"] and first["right"] is None
    assert second["replayed"]["compared_with"] == "iteration 0" and not second["replayed"]["accepted"]
    assert second["replayed"]["reasons"][0].startswith("val logp/tok got worse:") and not second["changed"]


def test_answer_flags_are_the_rates_row_by_row():
    """answer_metrics' rates are the shares of answer_flags' flags: what the paired test resamples."""
    from spin_lite.evaluate import answer_flags, answer_metrics
    cfg = load_config(None, [])
    cfg.eval.match_regex, cfg.eval.answer_regex = "^In short: ", "= *(-?[0-9]+)"
    samples = [{"model": "In short: 2 + 2 = 4", "real": "2 + 2 = 4", "model_truncated": False, "model_tokens": 9},
               {"model": "so so so so so so so so so", "real": "1 + 2 = 3", "model_truncated": True, "model_tokens": 9},
               {"model": "In short: 5 - 1 = 3", "real": "5 - 1 = 4", "model_truncated": False, "model_tokens": 9}]
    flags = [answer_flags(s, cfg) for s in samples]
    assert flags == [{"ended": True, "repetitive": False, "match": True, "task": True},
                     {"ended": False, "repetitive": True, "match": False, "task": False},
                     {"ended": True, "repetitive": False, "match": True, "task": False}]
    m = answer_metrics(samples, [6, 6, 6], cfg)
    assert (m["ended_rate"], m["repetition_rate"], m["match_rate"], m["task_accuracy"]) == (2 / 3, 1 / 3, 2 / 3, 1 / 3)


def test_the_task_metric_decides_where_one_is_set():
    """The plateau case of issue 25: a model that answers 8 more of 16 rows right while its likelihood falls 0.1
    nats a token on every row. Deciding by likelihood (the rule before eval.choose_by) it is worse; deciding by the
    task metric (choose_by auto with an answer regex) it is better, and the likelihood is reported, not a veto."""
    old = {k: r | {"task": False} for k, r in start_rows().items()}
    new = shifted(old, lambda k: -0.1, task=list(range(8)))
    by_logp = paired_compare(new, old)
    assert by_logp.worse and not by_logp.better and by_logp.decided_by == "logp_per_token"
    by_task = paired_compare(new, old, decide_by="task_accuracy")
    assert by_task.better and not by_task.worse and by_task.decided_by == "task_accuracy"
    assert by_task.to_dict()["differences"]["logp_per_token"]["difference"] == pytest.approx(-0.1)
    # a task flag the rows lack: likelihood decides, as it says
    assert paired_compare(start_rows(), start_rows(), decide_by="match_rate").decided_by == "logp_per_token"


def test_choose_by_resolves_to_the_metric_it_names():
    assert load_config(None, ["eval.answer_regex='= *(-?[0-9]+)'"]).eval.deciding_metric == "task_accuracy"
    assert load_config(None, ["eval.match_regex='^In short'"]).eval.deciding_metric == "match_rate"
    assert load_config(None, []).eval.deciding_metric == "logp_per_token"
    assert load_config(None, ["eval.answer_regex='= *(-?[0-9]+)'", "eval.choose_by=logp"]).eval.deciding_metric == \
        "logp_per_token"
    with pytest.raises(ConfigError, match="eval.choose_by=task needs a task metric"):
        load_config(None, ["eval.choose_by=task"])
