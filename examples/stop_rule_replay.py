"""Replay the stop rule's verdicts of finished runs under the paired rule, from the per-row scores they stored.

    .venv/bin/python examples/stop_rule_replay.py runs/a runs/b ... [--confidence 0.9]

For each run directory, every judged iteration in order: the verdict recorded when it ran (accepted: the run went
on; chosen: it became the best model) and the verdict spin_lite.evaluate.judge gives now from eval-start.json's and
the iterations' eval.json `val_rows`. The replay keeps its own best model, so an iteration may be compared with
another model than it was then. Each line also gives the iteration against the starting model on the *test* rows,
paired the same way (`test_rows`), to say whether a changed verdict was right; nothing that chooses reads these.
Runs made before per-row scores were stored fall back to the aggregate rule and replay unchanged (said so).
Only the iterations a run made are replayed: a run the old rule stopped early has no later ones to judge.
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
        test_rows = (read_json(rd.iteration(t) / "eval.json") or {}).get("test_rows")
        test = (judge(s["eval"], start["metrics"], test_rows, start.get("test_rows"), confidence)
                if test_rows and start.get("test_rows") else None)
        entry = {"iteration": t,
                 "recorded": {"accepted": recorded["accepted"], "chosen": found_better(recorded),
                              "compared_with": recorded["compared_with"], "reasons": recorded["reasons"]},
                 "replayed": {"accepted": not verdict.worse, "chosen": verdict.better, "compared_with": best[2],
                              "reasons": verdict.reasons, "rule": verdict.rule},
                 "test_vs_start": test.to_dict() if test else None}
        entry["changed"] = any(entry["recorded"][k] != entry["replayed"][k] for k in ("accepted", "chosen"))
        entries.append(entry)
        if verdict.better:
            best = (s["val"], rows, f"iteration {t}")
    return entries


def word(v: dict) -> str:
    return "chosen" if v["chosen"] else "accepted" if v["accepted"] else "rejected"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--confidence", type=float, default=0.9)
    args = parser.parse_args(argv)
    changed = total = 0
    print("| run | iteration | recorded | replayed (paired) | test rows vs start | replayed reasons |")
    print("|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        for e in replay(run_dir, args.confidence):
            total, changed = total + 1, changed + e["changed"]
            test = e["test_vs_start"]
            test_word = ("-" if test is None else "better" if test["better"] else "worse" if test["worse"]
                         else "no clear difference")
            rule = "" if e["replayed"]["rule"] == "paired" else " (no per-row scores: aggregate rule)"
            print(f"| {run_dir} | {e['iteration']} | {word(e['recorded'])} | {word(e['replayed'])}{rule}"
                  f"{' (changed)' if e['changed'] else ''} | {test_word} | {'; '.join(e['replayed']['reasons'])} |")
    print(f"\n{changed} of {total} verdicts change under the paired rule (confidence {args.confidence})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
