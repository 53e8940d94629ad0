"""SPIN vs "SFT continued" from the same SFT model, with settings chosen on validation rows only.

The protocol (written down before the numbers, docs/RESULTS.md "Protocol"):
  1. select: on the selection seed (0) alone, from the SFT model, one SPIN run per grid point (GRID: learning
     rate x likelihood-anchor weight); each run's chosen iteration is the one its stop rule picks on the
     validation rows; the grid point whose chosen model is best on the validation rows wins (first the task
     metric, the data's match rate or task accuracy, then validation log-likelihood per token). Nothing in this
     phase reads a test row. Writes OUT/DATA/selection.json.
  2. report: for the report seeds (1 2 3), with the chosen setting, from each SFT setting: SFT -> SPIN (every
     iteration, and the one the stop rule chose) and SFT continued for SPIN's cumulative step counts, all
     evaluated on the test rows.

Run (2 CPU cores; each command continues where it stopped when run again):
    nice -n 10 .venv/bin/python examples/experiment_spin_vs_sft.py --data style --phase select
    nice -n 10 .venv/bin/python examples/experiment_spin_vs_sft.py --data style --phase report --sft sft3 --seeds 1 2 3
    nice -n 10 .venv/bin/python examples/experiment_spin_vs_sft.py --data arith --phase select   # the second data set
    .venv/bin/python examples/experiment_spin_vs_sft.py --data style --phase report --sft sft3 --report-only

Data sets (DATASETS): style, the demo's house style (examples/data/demo_sft.jsonl, metric: the house-style
regex); arith, short arithmetic answers (examples/make_arithmetic_data.py, metric: the answer after "=").
SFT settings (SFT_SETTINGS): sft3, 3 epochs; converged, 8 epochs (to the plateau, as the paper's SFT model was).

Metrics (test rows; spin_lite.evaluate plus two here): match_rate / task_accuracy, logp_per_token, ended_rate,
repetition_rate, margin_acc_vs_sft (the model's preference for the real response over the SFT model's sampled one,
relative to the SFT model: the same yardstick for every model), word_f1 (word overlap with the real response),
sample_tokens. Writes OUT/DATA/SFT/seed-S/{sft,spin,sft-continued}/ (ordinary run folders), seed-S/results.json,
then OUT/DATA/SFT/summary.json, results.md and spin_vs_sft.png.
"""
from __future__ import annotations

import argparse
import itertools
import re
import statistics
import time
from collections import Counter
from pathlib import Path

from spin_lite.config import load_config
from spin_lite.evaluate import evaluate, score
from spin_lite.model import build_model, load_base
from spin_lite.run import SpinRun
from spin_lite.sft import run_sft
from spin_lite.state import RunDir, atomic_write_json, atomic_write_text, read_json, read_jsonl

CONFIGS = Path(__file__).parent / "configs"
DATASETS = {  # name: (SFT config, SPIN config, task metric)
    "style": (CONFIGS / "experiment_sft.yaml", CONFIGS / "experiment_spin.yaml", "match_rate"),
    "arith": (CONFIGS / "experiment_arith_sft.yaml", CONFIGS / "experiment_arith_spin.yaml", "task_accuracy"),
}
SFT_SETTINGS = {"sft3": [], "converged": ["train.epochs=8"]}
# The selection grid, two points to fit the CPU budget: a 4x smaller step than round 1's without the anchor, and
# round 1's step (5e-4) held back by the likelihood anchor.
GRID = [{"train.learning_rate": 1.25e-4, "train.sft_weight": 0.0}, {"train.learning_rate": 5e-4, "train.sft_weight": 1.0}]
SELECTION_SEED = 0

METRICS = [  # (key, column title, format)
    ("task", "task metric", "{:.2f}"),
    ("logp_per_token", "logp/token", "{:.3f}"),
    ("ended_rate", "answers that end", "{:.2f}"),
    ("repetition_rate", "repetitive answers", "{:.2f}"),
    ("margin_acc_vs_sft", "margin acc vs SFT", "{:.2f}"),
    ("word_f1", "word F1", "{:.3f}"),
    ("sample_tokens", "answer tokens", "{:.1f}"),
]


def configs(args, seed: int, out: Path, spin_set: list[str]):
    sft_path, spin_path, _ = DATASETS[args.data]
    common = args.set + [f"seed={seed}"]
    sft_adapter = out / "sft" / "adapter"
    sft_cfg = load_config(sft_path, common + SFT_SETTINGS[args.sft] + [f"run_dir={out / 'sft'}"])
    spin_cfg = load_config(spin_path, common + spin_set + [f"run_dir={out / 'spin'}", f"model.adapter={sft_adapter}"])
    if sft_cfg.data != spin_cfg.data or sft_cfg.model.name != spin_cfg.model.name or sft_cfg.model.adapter:
        raise SystemExit("the SFT and SPIN configs must share model.name and the data section (the same held-out "
                         "rows), and the SFT config must start from the bare model (no model.adapter)")
    return sft_cfg, spin_cfg


# -- phase 1: choose the setting on the validation rows of the selection seed ---------------------------------
def select(args) -> dict:
    root = Path(args.out) / args.data
    if (root / "selection.json").exists():
        return read_json(root / "selection.json")
    task = DATASETS[args.data][2]
    candidates = []
    for k, point in enumerate(GRID):
        spin_set = [f"{key}={value}" for key, value in point.items()]
        out = root / "select" / f"grid-{k}"
        sft_cfg, spin_cfg = configs(args, SELECTION_SEED, out, spin_set)
        sft_cfg.run_dir = str(root / "select" / "sft")  # one SFT model for every grid point
        spin_cfg.model.adapter = str(Path(sft_cfg.run_dir) / "adapter")
        run_sft(sft_cfg)
        SpinRun(spin_cfg).run()
        rd = RunDir(spin_cfg.run_dir)
        best = rd.best_iteration()
        val = (read_json(rd.root / "eval-start.json")["val"] if best is None or best < 0
               else rd.summaries()[best]["val"])
        candidates.append({"grid_point": point, "chosen_iteration": best, "val": val,
                           "key": [val.get(task) or 0.0, val["logp_per_token"]]})
        print(f"grid {point}: chosen iteration {best}, validation {task} {val.get(task)}, "
              f"logp/token {val['logp_per_token']:.3f}", flush=True)
    winner = max(candidates, key=lambda c: c["key"])
    selection = {"seed": SELECTION_SEED, "rule": f"max ({task}, logp_per_token) of the chosen model on validation rows",
                 "candidates": candidates, "chosen": winner["grid_point"]}
    atomic_write_json(root / "selection.json", selection)
    return selection


# -- phase 2: report on the test rows ------------------------------------------------------------------------
def run_seed(seed: int, args, spin_set: list[str]) -> dict:
    """Train and evaluate every model of one seed; returns (and writes) OUT/DATA/SFT/seed-S/results.json."""
    out = Path(args.out) / args.data / args.sft / f"seed-{seed}"
    if (out / "results.json").exists():
        return read_json(out / "results.json")
    began = time.time()
    sft_cfg, spin_cfg = configs(args, seed, out, spin_set)
    more_cfg = load_config(DATASETS[args.data][0], args.set + [f"seed={seed}"] + SFT_SETTINGS[args.sft] + [
        f"run_dir={out / 'sft-continued'}", f"model.adapter={out / 'sft' / 'adapter'}"])
    run_sft(sft_cfg)
    spin = SpinRun(spin_cfg)
    spin.run()
    tokenizer = spin.tokenizer
    del spin
    rd = RunDir(spin_cfg.run_dir)
    summaries = rd.summaries()
    cumulative = list(itertools.accumulate(s["train"]["steps"] for s in summaries))
    run_sft(more_cfg, steps=cumulative[-1], save_at=tuple(cumulative[:-1]))

    rows = evaluate_models(spin_cfg, tokenizer, summaries, cumulative, out, rd.best_iteration())
    result = {"seed": seed, "rows": rows, "wall_s": round(time.time() - began, 1), "spin_settings": spin_set,
              "sft": read_json(out / "sft" / "metrics.json"), "sft_continued": read_json(out / "sft-continued" / "metrics.json"),
              "spin_train": [s["train"] for s in summaries], "chosen_iteration": rd.best_iteration()}
    atomic_write_json(out / "results.json", result)
    return result


def evaluate_models(cfg, tokenizer, summaries: list[dict], cumulative: list[int], out: Path,
                    chosen: int | None) -> list[dict]:
    """One row per model, all on the test rows of SPIN iteration 0 (whose opponent is the SFT model)."""
    spin_dir = out / "spin"
    task = DATASETS_TASK[cfg.data.path]
    # The test prompts with the SFT model's sampled answers and its log-probs of both answers.
    sft_pairs = [p for p in read_jsonl(spin_dir / "iter-00" / "pairs.jsonl") if p["split"] == "eval"]
    plain = [{k: p[k] for k in ("key", "prompt_ids", "real_ids")} for p in sft_pairs]
    base = load_base(cfg.model)
    rows = []

    metrics, samples = evaluate(base, tokenizer, plain, cfg)
    rows.append(row("base", "start", None, metrics | {"margin_acc_vs_sft": None}, samples, task))
    start = read_json(spin_dir / "eval-start.json")  # the SPIN run's evaluation of its starting (SFT) model
    rows.append(row("sft", "start", 0, start["metrics"] | {"margin_acc_vs_sft": None}, start["samples"], task))

    for t, summary in enumerate(summaries):
        iteration = spin_dir / f"iter-{t:02d}"
        model = build_model(base, cfg.lora, [str(iteration / "adapter")], trainable=False)
        vs_sft = margin_accuracy(model, sft_pairs, tokenizer.pad_token_id, cfg.train.micro_batch_size * 2)
        base = model.unload()
        own = summary["eval"]["margin_accuracy"]  # against this iteration's own opponent
        rows.append(row(f"spin iter {t}", "spin", cumulative[t],
                        summary["eval"] | {"margin_acc_vs_sft": vs_sft, "margin_acc_own_opponent": own},
                        read_jsonl(iteration / "samples.jsonl"), task))
    picked = rows[1] if chosen is None or chosen < 0 else rows[2 + chosen]
    rows.append(picked | {"model": "spin chosen", "family": "spin-chosen",
                          "chosen_iteration": -1 if chosen is None else chosen})

    for steps in cumulative:
        more = out / "sft-continued"
        adapter = more / "adapter" if steps == cumulative[-1] else more / f"step-{steps:06d}"
        model = build_model(base, cfg.lora, [str(adapter)], trainable=False)
        metrics, samples = evaluate(model, tokenizer, sft_pairs, cfg)
        base = model.unload()
        rows.append(row(f"sft +{steps}", "sft-continued", steps,
                        metrics | {"margin_acc_vs_sft": metrics["margin_accuracy"]}, samples, task))
    return rows


DATASETS_TASK = {str(load_config(spin).data.path): task for _, spin, task in DATASETS.values()}


def margin_accuracy(model, pairs: list[dict], pad_id: int, batch_size: int) -> float:
    """Share of pairs with log p(real)/p_opp(real) > log p(gen)/p_opp(gen), against the pairs' opponent."""
    prompts = [p["prompt_ids"] for p in pairs]
    real, _ = score(model, prompts, [p["real_ids"] for p in pairs], pad_id, batch_size)
    gen, _ = score(model, prompts, [p["gen_ids"] for p in pairs], pad_id, batch_size)
    wins = [(r - p["opponent_real"]) - (g - p["opponent_gen"]) > 0 for p, r, g in zip(pairs, real, gen)]
    return sum(wins) / len(wins)


def row(name: str, family: str, steps: int | None, metrics: dict, samples: list[dict], task: str) -> dict:
    samples = [{"key": s["key"], "real": s["real"], "model": s["model"]} for s in samples]
    f1 = [word_f1(s["model"], s["real"]) for s in samples]
    return {"model": name, "family": family, "steps_after_sft": steps,
            **{k: v for k, v in metrics.items() if k != "margin_accuracy"}, "task": metrics.get(task),
            "word_f1": sum(f1) / len(f1), "samples": samples}


def word_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 of the lower-cased words of `answer` against those of `reference`."""
    a, r = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


# -- report ----------------------------------------------------------------------------------------------
def summarize(results: list[dict]) -> list[dict]:
    """Per model: mean, sample standard deviation, min and max of every metric over the seeds."""
    out = []
    for name in [r["model"] for r in results[0]["rows"]]:
        per_seed = [next(r for r in res["rows"] if r["model"] == name) for res in results]
        steps = {r["steps_after_sft"] for r in per_seed}  # the chosen models' differ between seeds: "-"
        entry = {"model": name, "family": per_seed[0]["family"], "steps_after_sft": steps.pop() if len(steps) == 1 else None}
        for key in [m[0] for m in METRICS] + ["margin_acc_own_opponent"]:
            values = [r[key] for r in per_seed if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                              "min": min(values), "max": max(values), "values": values}
        out.append(entry)
    return out


def stop_rule_audit(out: Path, results: list[dict]) -> list[dict]:
    """Every SPIN iteration of every seed: is it below the SFT model on the test rows (a lower task metric or a
    lower logp/token), and did the stop rule (which read only the validation rows) accept it? An iteration below
    the start that was accepted is a miss; one that is not below but was rejected, a false alarm."""
    rows = []
    for res in results:
        test = {r["model"]: r for r in res["rows"]}
        for s in RunDir(out / f"seed-{res['seed']}" / "spin").summaries():
            if s.get("selection") is None:  # no validation rows: no verdict to audit
                continue
            it, sft = test[f"spin iter {s['iteration']}"], test["sft"]
            below = it["task"] < sft["task"] or it["logp_per_token"] < sft["logp_per_token"]
            accepted = bool((s.get("selection") or {}).get("accepted"))
            verdict = {(True, False): "caught", (True, True): "MISSED", (False, True): "kept",
                       (False, False): "false alarm"}[(below, accepted)]
            rows.append({"seed": res["seed"], "iteration": s["iteration"], "below_start_on_test": below,
                         "accepted": accepted, "verdict": verdict, "task": it["task"], "sft_task": sft["task"],
                         "logp_per_token": it["logp_per_token"], "sft_logp_per_token": sft["logp_per_token"],
                         "reasons": (s.get("selection") or {}).get("reasons", [])})
    return rows


def with_first_rejection_stop(out: Path, res: dict) -> dict:
    """`res` with a row "spin chosen, patience 1": the model the default stop rule (stop_when: no_gain,
    stop_patience: 1) would have returned, read off the recorded verdicts: the latest iteration accepted before the
    first rejected one (the SFT model when iteration 0 was rejected). The runs themselves run every iteration."""
    chosen = -1
    for s in RunDir(out / f"seed-{res['seed']}" / "spin").summaries():
        if not (s.get("selection") or {}).get("accepted"):
            break
        chosen = s["iteration"]
    rows = {r["model"]: r for r in res["rows"]}
    picked = rows["sft"] if chosen < 0 else rows[f"spin iter {chosen}"]
    extra = picked | {"model": "spin chosen, patience 1", "family": "spin-chosen", "chosen_iteration": chosen,
                      "steps_after_sft": None}  # differs between seeds: "-" in the table
    at = [r["model"] for r in res["rows"]].index("spin chosen") + 1
    return res | {"rows": res["rows"][:at] + [extra] + res["rows"][at:]}


def audit_table(audit: list[dict]) -> str:
    lines = ["| seed | iteration | test task metric (SFT model) | test logp/token (SFT model) | below the SFT model | "
             "stop rule (validation rows) | verdict |", "|---|---|---|---|---|---|---|"]
    for a in audit:
        rule = "accepted" if a["accepted"] else "rejected: " + "; ".join(a["reasons"])
        lines.append(f"| {a['seed']} | {a['iteration']} | {a['task']:.2f} ({a['sft_task']:.2f}) | "
                     f"{a['logp_per_token']:.3f} ({a['sft_logp_per_token']:.3f}) | "
                     f"{'yes' if a['below_start_on_test'] else 'no'} | {rule} | {a['verdict']} |")
    counts = Counter(a["verdict"] for a in audit)
    below = counts["caught"] + counts["MISSED"]
    return ("\n".join(lines) + f"\n\nIterations below the SFT model on the test rows: {below} of {len(audit)}; "
            f"the stop rule caught {counts['caught']} of them and missed {counts['MISSED']}; it rejected "
            f"{counts['false alarm']} iteration(s) that were not below.\n")


def markdown_table(summary: list[dict], seeds: list[int]) -> str:
    head = ["model", "steps after SFT"] + [m[1] for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["model"], "-" if entry["steps_after_sft"] is None else str(entry["steps_after_sft"])]
        for key, _, fmt in METRICS:
            m = entry.get(key)
            cells.append("-" if m is None else f"{fmt.format(m['mean'])} ± {fmt.format(m['sd'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMean ± sample standard deviation over seeds {', '.join(map(str, seeds))}.\n"


def plot(summary: list[dict], seeds: list[int], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [m for m in METRICS if m[0] != "sample_tokens"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.6))
    by_name = {e["model"]: e for e in summary}
    for ax, (key, title, _) in zip(axes, keys):
        for family, label, color in (("spin", "SPIN iterations", "tab:red"),
                                     ("sft-continued", "SFT continued", "tab:blue")):
            points = [by_name["sft"]] + [e for e in summary if e["family"] == family]
            points = [e for e in points if key in e]
            x = [e["steps_after_sft"] for e in points]
            mean = [e[key]["mean"] for e in points]
            ax.plot(x, mean, "o-", color=color, label=label)
            ax.fill_between(x, [e[key]["min"] for e in points], [e[key]["max"] for e in points], color=color, alpha=0.15)
            for seed_index in range(len(seeds)):
                ax.plot(x, [e[key]["values"][seed_index] if len(e[key]["values"]) > seed_index else float("nan")
                            for e in points], ".", color=color, alpha=0.5)
        if key in by_name["base"]:
            ax.axhline(by_name["base"][key]["mean"], color="gray", linestyle="--", label="model before SFT")
        if key in ("task", "ended_rate", "margin_acc_vs_sft", "repetition_rate"):
            ax.set_ylim(-0.03, 1.03)  # shares: the full scale, so that a saturated metric looks saturated
        ax.set_title(title)
        ax.set_xlabel("optimizer steps after SFT")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SPIN vs SFT continued from the same SFT model (mean, min-max band, dots: seeds {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args) -> str:
    out = Path(args.out) / args.data / args.sft
    results = [read_json(out / f"seed-{s}" / "results.json") for s in args.seeds]
    results = [r for r in results if r is not None]
    if not results:
        raise SystemExit(f"no results in {out} for seeds {args.seeds}")
    seeds = [r["seed"] for r in results]
    results = [with_first_rejection_stop(out, r) for r in results]
    summary = summarize(results)
    audit = stop_rule_audit(out, results)
    atomic_write_json(out / "summary.json", {"seeds": seeds, "wall_s": {r["seed"]: r["wall_s"] for r in results},
                                             "spin_settings": results[0]["spin_settings"],
                                             "chosen_iterations": {r["seed"]: r["chosen_iteration"] for r in results},
                                             "chosen_iterations_patience_1": {
                                                 r["seed"]: next(x["chosen_iteration"] for x in r["rows"]
                                                                 if x["model"] == "spin chosen, patience 1")
                                                 for r in results},
                                             "models": summary, "stop_rule_audit": audit})
    table = markdown_table(summary, seeds) + "\nThe stop rule, iteration by iteration:\n\n" + audit_table(audit)
    atomic_write_text(out / "results.md", table)
    plot(summary, seeds, out / "spin_vs_sft.png")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="style")
    parser.add_argument("--phase", choices=["select", "report"], default="report")
    parser.add_argument("--sft", choices=sorted(SFT_SETTINGS), default="sft3", help="the SFT setting (report phase)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="runs/experiment")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both configs, e.g. model.name=HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args(argv)
    began = time.time()
    selection = select(args)
    print(f"{args.data}: chosen on the validation rows of seed {selection['seed']}: {selection['chosen']}", flush=True)
    if args.phase == "report":
        spin_set = [f"{key}={value}" for key, value in selection["chosen"].items()]
        if not args.report_only:
            for seed in args.seeds:
                result = run_seed(seed, args, spin_set)
                print(f"seed {seed}: done in {result['wall_s'] / 60:.1f} min", flush=True)
        print(report(args))
    print(f"total wall time of this invocation: {(time.time() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
