"""Round 3's goal over all report seeds at once: SPIN's choice minus the control's choice on the test rows, with a
90% interval from a paired bootstrap over the test rows (docs/RESULTS.md, "The goal, measured").

    .venv/bin/python examples/pooled_gap.py [--converged]

The test file is the same in every seed, so a row is drawn once for all seeds (its difficulty is shared): each draw
takes rows with replacement, computes each seed's difference on them as the table does (logp/token weighted by
tokens, rates as shares), and averages the seeds. Reads the kept runs in docs/results/round3/runs; chooses nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import experiment_round3 as e  # noqa: E402
from spin_lite.state import RunDir  # noqa: E402

TASK = {"style": "match", "units": "task", "arith": "task"}


def test_rows(rd: RunDir, model: str) -> dict:
    """The per-row test scores of `model` as experiment_round3 names it ("sft", "iter N", "control N")."""
    return rd.evaluation("start" if model == "sft" else model)["test_rows"]


def gap(name: str, converged: bool, resamples: int = 2000, confidence: float = 0.9) -> dict:
    pairs = []
    for seed in e.REPORT_SEEDS:
        folder = e.run_dir(e.KEPT, name, "logistic+anchor", seed, converged)
        rd = RunDir(folder)
        pairs.append((test_rows(rd, e.spin_choice(folder)), test_rows(rd, e.control_choice(folder))))
    keys = sorted(set.intersection(*(set(s) & set(c) for s, c in pairs)))
    draws = np.random.default_rng(0).integers(0, len(keys), size=(resamples, len(keys)))
    out = {"rows": len(keys), "seeds": len(pairs)}
    for metric, field in (("task", TASK[name]), ("logp/token", "logp")):
        def per_token(rows, idx=None):
            v = np.array([float(rows[k][field]) for k in keys])
            w = np.array([float(rows[k]["tokens"]) if field == "logp" else 1.0 for k in keys])
            return (v[idx].sum(-1) / w[idx].sum(-1)) if idx is not None else v.sum() / w.sum()
        point = np.mean([per_token(s) - per_token(c) for s, c in pairs])
        boot = np.mean([per_token(s, draws) - per_token(c, draws) for s, c in pairs], axis=0)
        low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        out[metric] = (float(point), float(low), float(high))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--converged", action="store_true", help="round 3b: from the 8-epoch SFT models")
    args = parser.parse_args()
    print("| data | test rows x seeds | task metric: mean [90% interval] | logp/token: mean [90% interval] |")
    print("|---|---|---|---|")
    for name in ("style", "units", "arith"):
        g = gap(name, args.converged)
        cells = [f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]" for p, lo, hi in (g["task"], g["logp/token"])]
        print(f"| *{name}* | {g['rows']} x {g['seeds']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
