"""Round 3 of docs/RESULTS.md: SPIN against "SFT continued", from SFT models, on three data sets, in the product.

Every run is one `spin-lite run` of the paper's pipeline (examples/configs/round3.yaml: the SFT stage, 2 SPIN
iterations, the control arm beside each, the paired stop rule's verdicts recorded). The protocol, written down
before the numbers (docs/RESULTS.md "Round 3: protocol"):
  1. select: for each data set, every grid point (GRID: objective and anchor) on the selection seeds (10, 11);
     a grid point's score is its SPIN choice (the stop rule's, among the SFT model and the iterations) on the
     VALIDATION rows: first the task metric, then val logp/token, averaged over the selection seeds. The best
     grid point is written to OUT/DATA/selection.json. Nothing in this phase reads a test row: the test rows are a
     fixed file per data set (OUT/data/DATA-test.jsonl) that no run reads for anything but its test metrics.
  2. report: the chosen grid point on the report seeds (1, 2, 3): every iteration, SPIN's choice, the control
     arm's choice (each made on validation rows), the product's final choice, all on the test rows; paired
     differences per seed (SPIN's choice minus the control's) with their mean and spread.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python examples/experiment_round3.py --data style --phase select
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python examples/experiment_round3.py --data style --phase report
    .venv/bin/python examples/experiment_round3.py --data style --phase report --tables-only

Each run folder (OUT/DATA/POINT/seed-S) continues where it stopped when the command is run again; a finished run
is also kept, light (no adapters), in docs/results/round3/runs/ (committed), from which a new checkout restores it
instead of running it again. Runs of one data
set and seed share their SFT stage: the first grid point's sft/, eval-base.json and eval-start.json are copied
into the others before they start (the SFT stage does not depend on the grid's settings).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spin_lite.config import load_config  # noqa: E402
from spin_lite.state import RunDir, atomic_write_json, atomic_write_text, read_json  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "round3.yaml"
KEPT = REPO / "docs" / "results" / "round3" / "runs"  # light copies of the finished runs (keep())
DATASETS = {  # name: (file, test rows, training rows, settings, task metric)
    "style": ("examples/data/demo_sft.jsonl", 24, 32,
              ["generation.max_new_tokens=40", "eval.max_new_tokens=40",
               "eval.match_regex='^In short: .* Hope that helps!$'"], "match_rate"),
    "arith": ("examples/data/arithmetic_sft.jsonl", 32, 48,
              ["generation.max_new_tokens=16", "eval.max_new_tokens=16", "data.max_prompt_length=96",
               "data.max_length=128", "eval.answer_regex='= *(-?[0-9]+)'"], "task_accuracy"),
    "units": ("examples/data/units_sft.jsonl", 32, 48,
              ["generation.max_new_tokens=48", "eval.max_new_tokens=48", "data.max_prompt_length=96",
               "data.max_length=160", "eval.answer_regex='= *([0-9]+)'"], "task_accuracy"),
}
GRID = {  # objective and anchor, at a quarter of the SFT rate (the README's recommendation to start from)
    "logistic+anchor": ["train.loss_type=logistic", "train.sft_weight=1.0"],
    "apo_zero": ["train.loss_type=apo_zero", "train.sft_weight=0.0"],
    "dpop": ["train.loss_type=dpop", "train.sft_weight=0.0"],
}
SELECTION_SEEDS, REPORT_SEEDS = (10, 11), (1, 2, 3)
CONVERGED = ["sft.epochs=8"]  # round 3b: the SFT model at round 2's plateau (docs/RESULTS.md "Round 3b: protocol")
TEST_SPLIT_SEED = 1234


def data_files(out: Path, name: str) -> tuple[Path, Path]:
    """The data set split once: a fixed test file and the pool the seeds draw validation and training rows from."""
    return split_once(out, name, DATASETS[name][0], DATASETS[name][1])


def split_once(out: Path, name: str, path: str, n_test: int) -> tuple[Path, Path]:
    """(test file, pool file) of the data file `path`: its rows shuffled with TEST_SPLIT_SEED, the first n_test the
    test rows, written once under OUT/data/ (round 3 and round 4 alike)."""
    test, pool = out / "data" / f"{name}-test.jsonl", out / "data" / f"{name}-pool.jsonl"
    if not test.exists():
        rows = (REPO / path).read_text().splitlines()
        random.Random(TEST_SPLIT_SEED).shuffle(rows)
        test.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(pool, "".join(r + "\n" for r in rows[n_test:]))
        atomic_write_text(test, "".join(r + "\n" for r in rows[:n_test]))
    return test, pool


def settings(out: Path, name: str, point: str, seed: int, converged: bool = False) -> list[str]:
    test, pool = data_files(out, name)
    _, n_test, n_train, extra, _ = DATASETS[name]
    return [f"run_dir={run_dir(out, name, point, seed, converged)}", f"seed={seed}", f"data.path={pool}",
            f"data.eval_path={test}", f"data.eval_size={n_test}", f"data.max_examples={n_train}", *extra,
            *GRID[point], *(CONVERGED if converged else [])]


def run_dir(out: Path, name: str, point: str, seed: int, converged: bool = False) -> Path:
    """OUT/DATA/POINT/seed-S; round 3b's runs (from the converged SFT model) under OUT/DATA/converged/."""
    return out / name / ("converged" if converged else "") / point.replace("+", "_") / f"seed-{seed}"


def finished(folder: Path) -> bool:
    return RunDir(folder).completed() >= 2 and RunDir(folder).completed_controls() >= 2


def keep(out: Path):
    """A light copy of every finished run (its JSON, YAML, train logs and greedy samples; no adapters, generations
    or pairs) into docs/results/round3/runs/, committed: what the tables read, and what the next session restores."""
    for folder in [*out.glob("*/*/seed-*"), *out.glob("*/converged/*/seed-*")]:
        target = KEPT / folder.relative_to(out)
        if finished(folder) and not finished(target):
            light_copy(folder, target)


def light_copy(folder: Path, target: Path):
    """A finished run's JSON, YAML, train logs and greedy samples copied to `target` (no adapters, generations or
    pairs): what the tables read."""
    shutil.copytree(folder, target, dirs_exist_ok=True, ignore=lambda d, names: [
        n for n in names if (Path(d) / n).is_file() and not (n.endswith((".json", ".yaml"))
                                                             or n in ("train_log.jsonl", "samples.jsonl"))
        or n in ("adapter", "checkpoint") or n.startswith(("progress", "state"))])


def restore(out: Path, name: str, point: str, seed: int, converged: bool = False) -> Path:
    """The run's folder, with the committed light copy of it put back when the run finished in an earlier session."""
    folder = run_dir(out, name, point, seed, converged)
    kept = KEPT / folder.relative_to(out)
    if not finished(folder) and finished(kept):
        shutil.copytree(kept, folder, dirs_exist_ok=True)
    return folder


def run(out: Path, name: str, point: str, seed: int, converged: bool = False):
    folder = restore(out, name, point, seed, converged)
    if finished(folder):
        return
    first = run_dir(out, name, next(iter(GRID)), seed, converged)
    if folder != first and (first / "sft" / "adapter").exists() and not (folder / "sft").exists():
        folder.mkdir(parents=True, exist_ok=True)  # the shared SFT stage
        shutil.copytree(first / "sft", folder / "sft")
        for f in ("eval-base.json", "eval-start.json"):
            shutil.copy(first / f, folder / f)
    began = time.time()
    print(f"== {name} {point} seed {seed}{' (converged SFT)' if converged else ''}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "spin_lite", "run", str(CONFIG),
                           *settings(out, name, point, seed, converged)],
                          cwd=REPO, text=True, capture_output=True)
    (folder / "experiment.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{name} {point} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"   done in {time.time() - began:.0f} s: {proc.stdout.strip().splitlines()[-1]}", flush=True)
    keep(out)


def rows_of(folder: Path) -> dict[str, dict]:
    """The run's results table by model name ("base", "sft", "iter N", "control N")."""
    rd = RunDir(folder)
    return {r["model"]: r for r in rd.results_table(load_config(rd.config_path))}


def spin_choice(folder: Path) -> str:
    best = RunDir(folder).best_iteration()
    return "sft" if best is None or best < 0 else f"iter {best}"


def control_choice(folder: Path) -> str:
    best = RunDir(folder).best_control()
    return "sft" if best is None or best < 0 else f"control {best}"


def select(out: Path, name: str) -> dict:
    task = DATASETS[name][4]
    scores = {}
    for point in GRID:
        picked = [rows_of(run_dir(out, name, point, s))[spin_choice(run_dir(out, name, point, s))]
                  for s in SELECTION_SEEDS]
        scores[point] = {"val_" + task: statistics.mean(r.get("val_" + task) or 0 for r in picked),
                         "val_logp_per_token": statistics.mean(r["val_logp_per_token"] for r in picked),
                         "spin_choices": [spin_choice(run_dir(out, name, point, s)) for s in SELECTION_SEEDS]}
    best = max(scores, key=lambda p: (round(scores[p]["val_" + task], 6), scores[p]["val_logp_per_token"]))
    result = {"data": name, "seeds": SELECTION_SEEDS, "scores": scores, "chosen": best,
              "rule": f"highest mean val {task}, then val logp/token, of each point's SPIN choice"}
    atomic_write_json(out / name / "selection.json", result)
    return result


def report(out: Path, name: str, point: str, converged: bool = False) -> str:
    """The report table of the chosen point: test metrics of every model, and SPIN's choice minus the control's."""
    task = DATASETS[name][4]
    title = f"{name}, from the converged SFT model ({' '.join(CONVERGED)})" if converged else name
    keys = [(task, "task"), ("logp_per_token", "logp/tok"), ("ended_rate", "ended"), ("repetition_rate", "repetitive")]
    lines = [f"#### {title}: grid point {point}, seeds {', '.join(map(str, REPORT_SEEDS))} (test rows)", "",
             "| seed | model | " + " | ".join(t for _, t in keys) + " | val " + keys[0][1] + " | val logp/tok | chosen |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    diffs = {k: [] for k, _ in keys}
    finals = []
    for seed in REPORT_SEEDS:
        folder = run_dir(out, name, point, seed, converged)
        table = rows_of(folder)
        spin, control = spin_choice(folder), control_choice(folder)
        final = RunDir(folder).chosen_model() or "?"
        finals.append(final)
        for model, r in table.items():
            marks = [m for m, on in (("SPIN's", model == spin), ("control's", model == control),
                                     ("final", model == final.replace("start", "sft"))) if on]
            cells = [f"{r.get(k):.3f}" if r.get(k) is not None else "-" for k, _ in keys]
            val = [f"{r.get('val_' + task):.3f}" if r.get("val_" + task) is not None else "-",
                   f"{r['val_logp_per_token']:.3f}" if r.get("val_logp_per_token") is not None else "-"]
            lines.append(f"| {seed} | {model} | " + " | ".join(cells + val) + f" | {', '.join(marks)} |")
        for k, _ in keys:
            if table[spin].get(k) is not None and table[control].get(k) is not None:
                diffs[k].append(table[spin][k] - table[control][k])
    lines += ["", "SPIN's choice minus the control arm's choice (each made on validation rows), per seed, test rows:", ""]
    for k, title in keys:
        d = diffs[k]
        if d:
            spread = statistics.stdev(d) if len(d) > 1 else 0.0
            lines.append(f"- {title}: " + ", ".join(f"{x:+.3f}" for x in d) + f" (mean {statistics.mean(d):+.3f}, "
                         f"sd {spread:.3f})")
    lines.append(f"- the product's final choice per seed: {', '.join(finals)}")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / name / ("report-converged.md" if converged else "report.md"), text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, choices=list(DATASETS))
    parser.add_argument("--phase", required=True, choices=["select", "report", "converged"],
                        help="converged: round 3b, the report's runs from the SFT model at its plateau")
    parser.add_argument("--out", default=str(REPO / "runs" / "round3"))
    parser.add_argument("--points", nargs="*", choices=list(GRID), help="select: only these grid points")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--tables-only", action="store_true", help="write the tables from the runs on disk")
    args = parser.parse_args()
    out = Path(args.out)
    if args.phase == "select":
        for seed in args.seeds or SELECTION_SEEDS:
            for point in args.points or GRID:
                (restore if args.tables_only else run)(out, args.data, point, seed)
        print(json.dumps(select(out, args.data), indent=1))
    else:
        chosen = read_json(out / args.data / "selection.json") or read_json(KEPT.parent / f"{args.data}-selection.json")
        if not chosen:
            raise SystemExit(f"no {out / args.data / 'selection.json'}: run --phase select first")
        converged = args.phase == "converged"
        for seed in args.seeds or REPORT_SEEDS:
            (restore if args.tables_only else run)(out, args.data, chosen["chosen"], seed, converged)
        print(report(out, args.data, chosen["chosen"], converged))


if __name__ == "__main__":
    main()
