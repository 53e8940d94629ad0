"""Replay the stop rule's verdicts of finished runs under the paired rule, from the per-row scores they stored.

    .venv/bin/python examples/stop_rule_replay.py runs/a runs/b ... [--confidence 0.9]

For each run directory, every judged iteration in order: the verdict recorded when it ran (accepted: the run went
on; chosen: it became the best model) and the verdict spin_lite.evaluate.judge gives now from eval-start.json's and
the iterations' eval.json `val_rows`. The replay keeps its own best model, so an iteration may be compared with
another model than it was then. Each line also gives the iteration against the starting model on the *test* rows,
paired the same way (`test_rows`), to say whether a changed verdict was right; nothing that chooses reads these.
Runs made before per-row scores were stored fall back to the aggregate rule and replay unchanged (said so).
Only the iterations a run made are replayed: a run the old rule stopped early has no later ones to judge.
Beside each, the old rule (round 2's: the aggregates, any worse metric vetoes) on the same pair, and, where the two
rules differ, whether the paired verdict agrees with the test rows (`right`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spin_lite.evaluate import judge
from spin_lite.state import RunDir, found_better, read_json


def replay(run_dir: str | Path, confidence: float = 0.9) -> list[dict]:
    """One entry per iteration with a recorded verdict: {iteration, recorded: {accepted, chosen, compared_with,
    reasons}, replayed: the same under the paired rule (with its `rule`), changed: whether accepted or chosen
    differ, test_vs_start: the paired verdict on the test rows against the starting model (None without them)}."""
    rd = RunDir(run_dir)
    start = read_json(rd.root / "eval-start.json") or {}
    best = (start.get("val"), start.get("val_rows"), "the starting model")
    entries = []
    for s in rd.summaries():
        recorded = s.get("selection")
        if recorded is None or not s.get("val") or not best[0]:
            continue  # no validation rows: nothing was judged
        t, rows = s["iteration"], rd.val_rows(s["iteration"])
        verdict = judge(s["val"], best[0], rows, best[1], confidence)
        aggregate = judge(s["val"], best[0])  # the round-2 rule on the same pair: the aggregates, any reason vetoes
        test_rows = (read_json(rd.iteration(t) / "eval.json") or {}).get("test_rows")
        test = (judge(s["eval"], start["metrics"], test_rows, start.get("test_rows"), confidence)
                if test_rows and start.get("test_rows") else None)
        entry = {"iteration": t,
                 "recorded": {"accepted": recorded["accepted"], "chosen": found_better(recorded),
                              "compared_with": recorded["compared_with"], "reasons": recorded["reasons"]},
                 "replayed": {"accepted": not verdict.worse, "chosen": verdict.better, "compared_with": best[2],
                              "reasons": verdict.reasons, "rule": verdict.rule},
                 "old_rule": {"accepted": not aggregate.worse, "chosen": aggregate.better,
                              "reasons": aggregate.reasons},
                 "test_vs_start": test.to_dict() if test else None}
        entry["changed"] = any(entry["recorded"][k] != entry["replayed"][k] for k in ("accepted", "chosen"))
        entry["changed_from_old_rule"] = word(entry["old_rule"]) != word(entry["replayed"])
        entry["right"] = right(entry["replayed"], test.to_dict() if test else None) if entry["changed_from_old_rule"] \
            else None
        entries.append(entry)
        if verdict.better:
            best = (s["val"], rows, f"iteration {t}")
    return entries


def word(v: dict) -> str:
    return "chosen" if v["chosen"] else "accepted" if v["accepted"] else "rejected"


def right(paired: dict, test: dict | None) -> bool | None:
    """Whether the paired rule's verdict agrees with the test rows (the iteration against the starting model):
    chosen -> better there; accepted, not chosen -> not worse; rejected -> worse. None without test rows."""
    if test is None:
        return None
    if paired["chosen"]:
        return test["better"]
    return not test["worse"] if paired["accepted"] else test["worse"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--confidence", type=float, default=0.9)
    args = parser.parse_args(argv)
    changed = total = from_old = were_right = 0
    print("| run | iteration | recorded | replayed (paired) | old rule (aggregate) | test rows vs start | replayed reasons |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        for e in replay(run_dir, args.confidence):
            total, changed = total + 1, changed + e["changed"]
            from_old, were_right = from_old + e["changed_from_old_rule"], were_right + bool(e["right"])
            test = e["test_vs_start"]
            test_word = ("-" if test is None else "better" if test["better"] else "worse" if test["worse"]
                         else "no clear difference")
            rule = "" if e["replayed"]["rule"] == "paired" else " (no per-row scores: aggregate rule)"
            print(f"| {run_dir} | {e['iteration']} | {word(e['recorded'])} | {word(e['replayed'])}{rule}"
                  f"{' (changed)' if e['changed'] else ''} | {word(e['old_rule'])} | {test_word} | "
                  f"{'; '.join(e['replayed']['reasons'])} |")
    print(f"\n{changed} of {total} verdicts change on replay under the paired rule (confidence {args.confidence}); "
          f"the paired rule differs from the old aggregate rule in {from_old} of {total}, and agrees with the test "
          f"rows in {were_right} of those {from_old}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
