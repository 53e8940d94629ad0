"""Round 4 of docs/RESULTS.md: self-play objectives (logistic+anchor, apo_zero, tspin, space) against "SFT continued"
at the SFT rate and at SPIN's own rate, from SFT models at their plateau. Protocol: docs/RESULTS.md "Round 4: protocol".

    OMP_NUM_THREADS=1 .venv/bin/python examples/experiment_round4.py --data weekdays --phase plateau
    OMP_NUM_THREADS=1 .venv/bin/python examples/experiment_round4.py --data weekdays --phase select [--seeds 10]
    OMP_NUM_THREADS=1 .venv/bin/python examples/experiment_round4.py --data weekdays --phase report [--seeds 1]
    .venv/bin/python examples/experiment_round4.py --data weekdays --phase report --tables-only

Phases (each reads only what the protocol allows it to):
  plateau  SFT alone at 4, 8 and 12 epochs on selection seed 10's rows, evaluated on VALIDATION rows; the plateau
           rule (PLATEAU_*) picks the epochs of every later SFT stage of the data set -> OUT/DATA/plateau.json
  select   every point of SELECT_GRID (amendment 3: arith all 8, the others the quarter-rate 4) on seed 10; each
           run is the product's pipeline without the control arm; a point's score is its SPIN choice's mean VALIDATION task metric, then val
           logp/token -> OUT/DATA/selection.json
  report   the chosen point on seeds 1, 2, 3 with both control arms (sft.control_rates [sft, spin]); the test rows
           are read here only, for the tables -> OUT/DATA/report.md and report.json
Runs continue where they stopped (the run directory is the checkpoint); finished ones are kept light in
docs/results/round4/runs/ (committed) and restored from there by a new checkout. Runs of one data set and seed share
their SFT stage (the first point's sft/, eval-base.json, eval-start.json are copied before a run starts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spin_lite.config import load_config  # noqa: E402
from spin_lite.state import RunDir, atomic_write_json, atomic_write_text, read_json  # noqa: E402

sys.path.insert(0, str(REPO / "examples"))
from experiment_round3 import light_copy, split_once  # noqa: E402  (the same split and light copies as round 3)

CONFIG = REPO / "examples" / "configs" / "round4.yaml"
KEPT = REPO / "docs" / "results" / "round4" / "runs"
DATASETS = {  # name: (file, test rows, training rows, settings, task metric's per-row flag)
    "weekdays": ("examples/data/weekdays_sft.jsonl", 32, 48,
                 ["generation.max_new_tokens=40", "eval.max_new_tokens=40", "data.max_prompt_length=96",
                  "data.max_length=160", "eval.answer_regex='will be ([A-Z][a-z]+day)'"], "task"),
    "arith": ("examples/data/arithmetic_sft.jsonl", 32, 48,
              ["generation.max_new_tokens=16", "eval.max_new_tokens=16", "data.max_prompt_length=96",
               "data.max_length=128", "eval.answer_regex='= *(-?[0-9]+)'"], "task"),
    "units": ("examples/data/units_sft.jsonl", 32, 48,
              ["generation.max_new_tokens=48", "eval.max_new_tokens=48", "data.max_prompt_length=96",
               "data.max_length=160", "eval.answer_regex='= *([0-9]+)'"], "task"),
    "style": ("examples/data/demo_sft.jsonl", 24, 32,
              ["generation.max_new_tokens=40", "eval.max_new_tokens=40",
               "eval.match_regex='^In short: .* Hope that helps!$'"], "match"),
}
OBJECTIVES = {  # each at its paper's reward scale: SPIN's beta 0.1; T-SPIN's alpha 1; SPACE's unscaled log-ratio
    "logistic+anchor": ["train.loss_type=logistic", "train.sft_weight=1.0", "train.beta=0.1"],
    "apo_zero": ["train.loss_type=apo_zero", "train.sft_weight=0.0", "train.beta=0.1"],
    "tspin": ["train.loss_type=tspin", "train.sft_weight=0.0", "train.beta=1.0", "train.history_weight=0.1"],
    "space": ["train.loss_type=space", "train.sft_weight=0.0", "train.beta=1.0", "train.space_mu=1.0"],
}
RATES = {"sftrate": ["train.lr_ratio_to_sft=1.0"], "quarter": ["train.lr_ratio_to_sft=0.25"]}
GRID = {f"{o}@{r}": OBJECTIVES[o] + RATES[r] for o in OBJECTIVES for r in RATES}
# Amendment 3 (docs/RESULTS.md): the data sets selected after arith run the quarter-rate points only.
SELECT_GRID = {"arith": list(GRID)}
SELECT_GRID.update({name: [p for p in GRID if p.endswith("@quarter")] for name in ("weekdays", "units", "style")})
# Seed 11 is dropped this session (docs/RESULTS.md, round 4, amendment 2: the CPU time): selection on seed 10 alone.
SELECTION_SEEDS, REPORT_SEEDS, SELECT_TOP = (10,), (1, 2, 3), 2
PLATEAU_EPOCHS, PLATEAU_LOGP, PLATEAU_ROWS = (4, 8, 12), 0.01, 2


def data_files(out: Path, name: str) -> tuple[Path, Path]:
    """The data set split once: a fixed test file and the pool the seeds draw validation and training rows from."""
    return split_once(out, name, DATASETS[name][0], DATASETS[name][1])


def base_settings(out: Path, name: str, seed: int) -> list[str]:
    test, pool = data_files(out, name)
    _, n_test, n_train, extra, _ = DATASETS[name]
    return [f"seed={seed}", f"data.path={pool}", f"data.eval_path={test}", f"data.eval_size={n_test}",
            f"data.max_examples={n_train}", *extra]


def sft_epochs(out: Path, name: str) -> int:
    found = read_json(out / name / "plateau.json") or read_json(KEPT.parent / f"{name}-plateau.json")
    if not found:
        raise SystemExit(f"no plateau for {name}: run --phase plateau first")
    return found["epochs"]


def run_dir(out: Path, name: str, phase: str, point: str, seed: int) -> Path:
    return out / name / phase / point.replace("+", "_").replace("@", "-") / f"seed-{seed}"


def finished(folder: Path, controls: bool) -> bool:
    rd = RunDir(folder)
    return rd.completed() >= 2 and (not controls or min(rd.completed_controls(a) for a in ("sft", "spin")) >= 2)


def keep(out: Path, name: str):
    """Light copies of a data set's finished runs (JSON, YAML, train logs, greedy samples; no adapters, generations or
    pairs)."""
    for folder in out.glob(f"{name}/*/*/seed-*"):
        target = KEPT / folder.relative_to(out)
        controls = folder.parts[-3] == "report"
        if finished(folder, controls) and not finished(target, controls):
            light_copy(folder, target)


def run(out: Path, name: str, phase: str, point: str, seed: int):
    folder, controls = run_dir(out, name, phase, point, seed), phase == "report"
    kept = KEPT / folder.relative_to(out)
    if not finished(folder, controls) and finished(kept, controls):
        shutil.copytree(kept, folder, dirs_exist_ok=True)
    if finished(folder, controls):
        return
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / "experiment.claim"  # two workers on one phase: each run is taken by one of them
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"== {name} {phase} {point} seed {seed}: another worker has it", flush=True)
        return
    try:
        _run(out, name, phase, point, seed, folder, controls)
    finally:
        claim.unlink(missing_ok=True)


def _run(out: Path, name: str, phase: str, point: str, seed: int, folder: Path, controls: bool):
    shared = ("sft/summary.json", "eval-base.json", "eval-start.json")  # the SFT stage of this data set and seed
    for other in sorted((out / name).glob(f"*/*/seed-{seed}")):
        # (a light copy restored from docs/results has no adapter: it cannot be a source)
        if (other != folder and all((other / f).exists() for f in shared) and (other / "sft" / "adapter").is_dir()
                and not (folder / "sft").exists()):
            # the evaluations first, the stage folder last and whole (a rename): a run being set up never looks
            # like a source to another worker (two of them set up at once copied half a folder: 2026-12-07)
            for f in shared[1:]:
                shutil.copy(other / f, folder / f)
            shutil.rmtree(folder / "sft.copy", ignore_errors=True)
            shutil.copytree(other / "sft", folder / "sft.copy", ignore=shutil.ignore_patterns("checkpoint"))
            (folder / "sft.copy").rename(folder / "sft")
            break
    settings = [f"run_dir={folder}", *base_settings(out, name, seed), f"sft.epochs={sft_epochs(out, name)}",
                *GRID[point], f"sft.control={'true' if controls else 'false'}", "sft.control_rates=[sft, spin]"]
    began = time.time()
    print(f"== {name} {phase} {point} seed {seed}", flush=True)
    log = folder / "experiment.log"
    with open(log, "a", encoding="utf-8") as f:  # (a file, not a pipe: the run outlives a killed driver)
        proc = subprocess.run([sys.executable, "-m", "spin_lite", "run", str(CONFIG), *settings], cwd=REPO, text=True,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{name} {phase} {point} seed {seed} failed:\n{log.read_text()[-3000:]}")
    print(f"   done in {time.time() - began:.0f} s: {log.read_text().strip().splitlines()[-1]}", flush=True)
    keep(out, name)


# -- the plateau, on validation rows ---------------------------------------------------------------------------
def plateau(out: Path, name: str) -> dict:
    """SFT at each of PLATEAU_EPOCHS on seed 10's training rows (the SFT stage's own recipe, each from scratch),
    evaluated on seed 10's validation rows. The plateau: the fewest epochs E after which the next count raises val
    logp/token by at most PLATEAU_LOGP nats and the val task metric by at most PLATEAU_ROWS rows; the largest count
    when none is."""
    import torch

    from spin_lite.data import load_splits
    from spin_lite.evaluate import evaluate
    from spin_lite.generate import stop_token_ids
    from spin_lite.model import load_base, load_tokenizer, with_adapter
    from spin_lite.sft import train_sft

    path = out / name / "plateau.json"
    if path.exists():
        return read_json(path)
    seed = SELECTION_SEEDS[0]
    cfg = load_config(CONFIG, [f"run_dir={out / name / 'plateau'}", *base_settings(out, name, seed)])
    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, seed)
    flag = DATASETS[name][4]
    items = [{"key": f"val:{e.row}", "prompt_ids": e.prompt_ids, "real_ids": e.response_ids} for e in splits.val]
    found, chosen = {}, PLATEAU_EPOCHS[-1]
    for k, epochs in enumerate(PLATEAU_EPOCHS):
        torch.manual_seed(cfg.seed)  # the SFT stage's initialisation of a fresh adapter
        model = with_adapter(load_base(cfg.model), cfg.lora, None, print)
        steps = epochs * cfg.train.steps_per_epoch(len(splits.train))
        (out / name / "plateau" / f"sft-{epochs}").mkdir(parents=True, exist_ok=True)
        train_sft(model, splits.train, cfg, tokenizer.pad_token_id, out / name / "plateau" / f"sft-{epochs}", steps,
                  lr=cfg.sft.learning_rate, desc=f"sft {epochs} epochs")
        metrics, samples = evaluate(model, tokenizer, items, cfg, None, stop_token_ids(tokenizer, model))
        task = sum(bool(s["scores"].get(flag)) for s in samples)
        found[epochs] = {"val_logp_per_token": metrics["logp_per_token"], "val_task_rows": task, "val_rows": len(items),
                         "steps": steps}
        print(f"   {name}: {epochs} SFT epochs: val logp/token {metrics['logp_per_token']:.3f}, task {task}/{len(items)}",
              flush=True)
        if k and (found[epochs]["val_logp_per_token"] - found[PLATEAU_EPOCHS[k - 1]]["val_logp_per_token"]
                  <= PLATEAU_LOGP and found[epochs]["val_task_rows"] - found[PLATEAU_EPOCHS[k - 1]]["val_task_rows"]
                  <= PLATEAU_ROWS):
            chosen = PLATEAU_EPOCHS[k - 1]  # the rule has fired: the larger counts are not needed
            break
    result = {"data": name, "seed": seed, "by_epochs": found, "epochs": chosen,
              "rule": f"fewest epochs after which {PLATEAU_EPOCHS} next count gains <= {PLATEAU_LOGP} val logp/token "
                      f"and <= {PLATEAU_ROWS} val task rows; else the largest"}
    atomic_write_json(path, result)
    atomic_write_json(KEPT.parent / f"{name}-plateau.json", result)
    return result


# -- selection, on validation rows -----------------------------------------------------------------------------
def spin_choice(folder: Path) -> str:
    best = RunDir(folder).best_iteration()
    return "start" if best is None or best < 0 else f"iter {best}"


def val_score(folder: Path, model: str, flag: str) -> tuple[float, float]:
    """(val task metric, val logp/token) of `model` in the run, from its per-row validation scores."""
    rows = RunDir(folder).evaluation(model)["val_rows"]
    return (sum(bool(r.get(flag)) for r in rows.values()) / len(rows),
            sum(r["logp"] for r in rows.values()) / sum(r["tokens"] for r in rows.values()))


def select(out: Path, name: str, first_only: bool = False) -> dict:
    flag = DATASETS[name][4]
    scores = {}
    for point in SELECT_GRID[name]:
        seeds = [s for s in SELECTION_SEEDS if finished(run_dir(out, name, "select", point, s), False)]
        if not seeds:
            continue
        picked = [val_score(run_dir(out, name, "select", point, s), spin_choice(run_dir(out, name, "select", point, s)),
                            flag) for s in seeds]
        scores[point] = {"seeds": seeds, "val_task": statistics.mean(p[0] for p in picked),
                         "val_logp_per_token": statistics.mean(p[1] for p in picked),
                         "spin_choices": [spin_choice(run_dir(out, name, "select", point, s)) for s in seeds]}
    key = lambda p: (round(scores[p]["val_task"], 6), scores[p]["val_logp_per_token"])
    first = sorted((p for p in scores if SELECTION_SEEDS[0] in scores[p]["seeds"]), key=lambda p: (
        round(val_score(run_dir(out, name, "select", p, SELECTION_SEEDS[0]),
                        spin_choice(run_dir(out, name, "select", p, SELECTION_SEEDS[0])), flag)[0], 6),
        val_score(run_dir(out, name, "select", p, SELECTION_SEEDS[0]),
                  spin_choice(run_dir(out, name, "select", p, SELECTION_SEEDS[0])), flag)[1]), reverse=True)
    top = first[:SELECT_TOP]
    if len(SELECTION_SEEDS) == 1:  # amendment 2: every point on seed 10, the best chosen once all have run
        chosen = first[0] if len(first) == len(SELECT_GRID[name]) else None
        rule = f"every point on seed {SELECTION_SEEDS[0]}; chosen: the best val task, then val logp/token, of its SPIN choice"
    else:
        both = [p for p in top if set(SELECTION_SEEDS) <= set(scores[p]["seeds"])]
        chosen = max(both, key=key) if len(both) == len(top) and top else None
        rule = (f"all points on seed {SELECTION_SEEDS[0]}; its top {SELECT_TOP} (val task, then val logp/token of the "
                f"SPIN choice) on seed {SELECTION_SEEDS[1]} too; chosen: the best mean of those")
    result = {"data": name, "scores": scores, "top_on_first_seed": top, "chosen": chosen, "rule": rule}
    atomic_write_json(out / name / "selection.json", result)
    if result["chosen"]:
        atomic_write_json(KEPT.parent / f"{name}-selection.json", result)
    return result


def selection_table(out: Path, name: str) -> str:
    """The selection runs on validation rows, a markdown table: each model's val task metric / logp/token, the SPIN
    choice, the stop rule's verdicts and the training's margin accuracy over informative pairs and tie share."""
    flag = DATASETS[name][4]
    lines = ["| point | SFT model | iter 0 | iter 1 | SPIN's choice | verdicts (iter 0; iter 1) | train (iter 0; iter 1) |",
             "|---|---|---|---|---|---|---|"]
    for point in SELECT_GRID[name]:
        folder = run_dir(out, name, "select", point, SELECTION_SEEDS[0])
        if not finished(folder, False):
            lines.append(f"| {point} | not finished | | | | | |")
            continue
        cell = lambda model: "{:.3f} / {:.3f}".format(*val_score(folder, model, flag))  # noqa: E731
        summaries = RunDir(folder).summaries()
        verdict = lambda v: ("better" if v.get("better") else "not clearly better" if v.get("accepted")  # noqa: E731
                             else "**rejected**")
        train = lambda t: (f"acc {t['accuracy']:.2f}, ties {t['tie_share']:.2f}"  # noqa: E731
                           + (f", history {t['history']:+.2f}" if "history" in t else ""))
        lines.append(f"| {point} | {cell('start')} | {cell('iter 0')} | {cell('iter 1')} | {spin_choice(folder)} | "
                     + "; ".join(verdict(x["selection"]) for x in summaries) + " | "
                     + "; ".join(train(x["train"]) for x in summaries) + " |")
    return "\n".join(lines) + "\n"


# -- the report, on test rows ----------------------------------------------------------------------------------
def choices(folder: Path) -> dict[str, str]:
    """The models each arm chose on validation rows, and the run's own choice."""
    rd = RunDir(folder)
    arm = lambda a: (lambda b: "start" if b is None or b < 0 else ("control " if a == "sft" else "control-spin ")
                     + str(b))(rd.best_control(a))
    return {"SFT model": "start", "self-play": spin_choice(folder), "control@sft": arm("sft"),
            "control@spin": arm("spin"), "run's choice": rd.chosen_model() or "start"}


def pooled(folders: list[Path], new: str, old: str, flag: str, resamples: int = 2000) -> dict:
    """new - old on the test rows over all seeds: each seed's difference (logp/token weighted by tokens, the task
    metric as a share), averaged over seeds, with a 90% interval from a paired bootstrap over the shared test rows.
    `new`, `old`: an arm ("self-play", ...: its choice in each run) or a model of the run ("start", "control 1")."""
    model = lambda f, key: choices(f).get(key, key)  # noqa: E731
    pairs = [(RunDir(f).evaluation(model(f, new))["test_rows"], RunDir(f).evaluation(model(f, old))["test_rows"])
             for f in folders]
    keys = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
    draws = np.random.default_rng(0).integers(0, len(keys), size=(resamples, len(keys)))
    result = {}
    for metric, field in (("task", flag), ("logp/token", "logp")):
        def value(rows, idx=None):
            v = np.array([float(rows[k].get(field) or 0) for k in keys])
            w = np.array([float(rows[k]["tokens"]) if field == "logp" else 1.0 for k in keys])
            return v[idx].sum(-1) / w[idx].sum(-1) if idx is not None else v.sum() / w.sum()
        point = float(np.mean([value(a) - value(b) for a, b in pairs]))
        boot = np.mean([value(a, draws) - value(b, draws) for a, b in pairs], axis=0)
        low, high = np.quantile(boot, [0.05, 0.95])
        result[metric] = [point, float(low), float(high)]
    return result


def report(out: Path, name: str, point: str) -> str:
    flag = DATASETS[name][4]
    folders = [run_dir(out, name, "report", point, s) for s in REPORT_SEEDS]
    folders = [f for f in folders if finished(f, True)]
    lines = [f"#### {name}: {point}, seeds {', '.join(f.name[5:] for f in folders)} (test rows; SFT {sft_epochs(out, name)} "
             "epochs)", "", "| seed | SFT model | self-play | control@sft | control@spin | run's choice | plateau check |",
             "|---|---|---|---|---|---|---|"]
    for f in folders:
        c, rd = choices(f), RunDir(f)
        cell = lambda m: (lambda r: f"{m}: {sum(bool(x.get(flag)) for x in r.values())}/{len(r)}, "
                          f"{sum(x['logp'] for x in r.values()) / sum(x['tokens'] for x in r.values()):.3f}")(
            rd.evaluation(m)["test_rows"])
        at_plateau = "at plateau" if c["control@sft"] == "start" else f"still learning ({c['control@sft']} beat it)"
        lines.append(f"| {f.name[5:]} | " + " | ".join(cell(c[k]) for k in ("SFT model", "self-play", "control@sft",
                                                                               "control@spin", "run's choice"))
                     + f" | {at_plateau} |")
    gaps = {}
    if folders:
        lines += ["", "Pooled over the seeds, test rows, paired bootstrap (90%): task metric (share) and logp/token", ""]
        for old in ("SFT model", "control@sft", "control@spin"):
            g = pooled(folders, "self-play", old, flag)
            gaps[f"self-play - {old}"] = g
            lines.append(f"- self-play's choice - {old}'s: task {g['task'][0]:+.3f} [{g['task'][1]:+.3f}, "
                         f"{g['task'][2]:+.3f}], logp/token {g['logp/token'][0]:+.3f} [{g['logp/token'][1]:+.3f}, "
                         f"{g['logp/token'][2]:+.3f}]")
        lines += ["", "The run's own choice (made on validation rows) against the best arm on the test rows (task, then "
                  "logp/token), per seed, paired bootstrap (90%):", ""]
        for f in folders:
            c, rd = choices(f), RunDir(f)
            rows = lambda m: rd.evaluation(m)["test_rows"]  # noqa: E731
            score = lambda m: (sum(bool(x.get(flag)) for x in rows(m).values()),  # noqa: E731
                               sum(x["logp"] for x in rows(m).values()) / sum(x["tokens"] for x in rows(m).values()))
            best = max((c[k] for k in ("SFT model", "self-play", "control@sft", "control@spin")), key=score)
            if c["run's choice"] == best:
                lines.append(f"- seed {f.name[5:]}: the run chose the best arm's model ({best})")
                continue
            g = pooled([f], "run's choice", best, flag)
            within = all(g[m][1] <= 0 <= g[m][2] for m in g)
            gaps[f"{f.name}: run's choice - best"] = g | {"best": best, "within_noise": within}
            chose = c["run's choice"]
            lines.append(f"- seed {f.name[5:]}: {chose} - {best}: task {g['task'][0]:+.3f} "
                         f"[{g['task'][1]:+.3f}, {g['task'][2]:+.3f}], logp/token {g['logp/token'][0]:+.3f} "
                         f"[{g['logp/token'][1]:+.3f}, {g['logp/token'][2]:+.3f}]: "
                         + ("within the noise" if within else "**outside the noise**"))
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / name / "report.md", text)
    atomic_write_json(out / name / "report.json", {"point": point, "gaps": gaps,
                                                    "choices": {f.name: choices(f) for f in folders}})
    shutil.copy(out / name / "report.md", KEPT.parent / f"{name}-report.md")
    return text


def run_all(out: Path, name: str, phase: str, jobs: list[tuple[str, int]], parallel: int):
    """The runs (point, seed) of a phase, `parallel` at a time (each a process on one core: OMP_NUM_THREADS=1)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(parallel) as pool:
        for done in [pool.submit(run, out, name, phase, point, seed) for point, seed in jobs]:
            done.result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, choices=list(DATASETS))
    parser.add_argument("--phase", required=True, choices=["plateau", "select", "report"])
    parser.add_argument("--out", default=str(REPO / "runs" / "round4"))
    parser.add_argument("--points", nargs="*", choices=list(GRID))
    parser.add_argument("--seeds", nargs="*", type=int)
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (one core each)")
    parser.add_argument("--reverse", action="store_true", help="take the runs in reverse order (a second worker)")
    args = parser.parse_args()
    out = Path(args.out)
    KEPT.mkdir(parents=True, exist_ok=True)
    (out / args.data).mkdir(parents=True, exist_ok=True)
    if args.phase == "plateau":
        print(json.dumps(plateau(out, args.data), indent=1))
    elif args.phase == "select":
        for seed in args.seeds or SELECTION_SEEDS:
            points = args.points or (SELECT_GRID[args.data] if seed == SELECTION_SEEDS[0] else select(out, args.data)["top_on_first_seed"])
            if not args.tables_only:
                run(out, args.data, "select", points[0], seed)  # the SFT stage, shared by the others
                rest = [(p, seed) for p in points[1:]]
                run_all(out, args.data, "select", rest[::-1] if args.reverse else rest, args.parallel)
        print(json.dumps(select(out, args.data), indent=1))
        table = selection_table(out, args.data)
        atomic_write_text(KEPT.parent / f"{args.data}-selection.md", table)
        print(table)
    else:
        chosen = read_json(out / args.data / "selection.json") or read_json(KEPT.parent / f"{args.data}-selection.json")
        if not chosen or not chosen.get("chosen"):
            raise SystemExit(f"{args.data}: no selection yet: run --phase select first")
        if not args.tables_only:
            jobs = [(chosen["chosen"], s) for s in args.seeds or REPORT_SEEDS]
            run_all(out, args.data, "report", jobs[::-1] if args.reverse else jobs, args.parallel)
        print(report(out, args.data, chosen["chosen"]))


if __name__ == "__main__":
    main()
