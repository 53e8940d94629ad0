"""Margin accuracy over the informative pairs of round 3's kept runs: the recorded value counted a tie (the
opponent's answer is the real answer itself, margin exactly 0) as wrong; this recomputes it with ties left out.

    .venv/bin/python examples/tie_correction.py [--converged]

A test row is a tie when its opponent's (decoded) answer equals the real answer; the recorded accuracy over all n
rows counted it wrong, so the right ones were acc x n and the informative accuracy is acc x n / (n - ties).
Reads docs/results/round3/runs (kept runs); chooses nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = REPO / "docs" / "results" / "round3" / "runs"


def corrected(iteration: Path) -> tuple[float, float, int, int] | None:
    """(recorded accuracy, informative accuracy, ties, rows) of one iteration's test pairs."""
    metrics = json.loads((iteration / "eval.json").read_text())["test"]
    samples = [json.loads(line) for line in (iteration / "samples.jsonl").read_text().splitlines() if line.strip()]
    if metrics.get("margin_accuracy") is None or not samples:
        return None
    n, ties = len(samples), sum(s["opponent"].strip() == s["real"].strip() for s in samples)
    right = round(metrics["margin_accuracy"] * n)
    return metrics["margin_accuracy"], right / (n - ties) if n > ties else float("nan"), ties, n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--converged", action="store_true", help="round 3b's runs (from the 8-epoch SFT models)")
    args = parser.parse_args()
    print("| data | point | seed | iteration | recorded | ties / rows | informative |")
    print("|---|---|---|---|---|---|---|")
    for data in ("style", "units", "arith"):
        base = KEPT / data / ("converged" if args.converged else "")
        for iteration in sorted(base.glob("*/seed-*/iter-*")):
            if iteration.parts[-4] == "converged" and not args.converged:
                continue
            found = corrected(iteration)
            if found:
                rec, inf, ties, n = found
                print(f"| {data} | {iteration.parts[-3]} | {iteration.parts[-2][5:]} | {iteration.name[5:]} | {rec:.2f} | "
                      f"{ties} / {n} | {inf:.2f} |")


if __name__ == "__main__":
    main()
