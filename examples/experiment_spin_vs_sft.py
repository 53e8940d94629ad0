"""SPIN vs "SFT continued" from the same SFT model: the shape of the SPIN paper's central result, small.

Run (2 CPU cores, about 40 minutes for 2 seeds; running it again continues where it stopped):
    nice -n 5 .venv/bin/python examples/experiment_spin_vs_sft.py --seeds 1 2
    .venv/bin/python examples/experiment_spin_vs_sft.py --seeds 1 2 --report-only   # table and plot again
On a GPU with a real model (docs/RESULTS.md, "The same experiment on a GPU"):
    python examples/experiment_spin_vs_sft.py --seeds 1 2 --out runs/experiment-gpu \
        --sft-config examples/configs/experiment_gpu_sft.yaml --spin-config examples/configs/experiment_gpu_spin.yaml

For each seed, from a model that has not seen the data (model.name with no adapter):
  base         that model as it is
  sft          LoRA SFT on the training rows (--sft-config, spin_lite.sft)
  spin iter t  SPIN iterations 0, 1, 2 started from the SFT adapter (--spin-config, spin_lite.run)
  sft +N       the SFT adapter trained on by SFT for N more optimizer steps, where N is the number of SPIN
               optimizer steps after each iteration (one run of N_total steps, snapshots at the others)
All are evaluated on the same held-out rows (drawn by the seed, never trained on), with the same settings
(spin_lite.evaluate.evaluate with the SPIN config), by metrics that need no judge model:
  match_rate         share of greedy answers matching eval.match_regex (the data's house style)
  logp_per_token     log-likelihood per token of the real held-out responses (nats)
  margin_acc_vs_sft  share of held-out prompts where the model prefers the real response to the SFT model's
                     sampled one, relative to the SFT model: log p(y)/p_sft(y) > log p(y')/p_sft(y').
                     The same yardstick for every model (for SPIN iteration 0 it is its own margin accuracy).
  word_f1            word-overlap F1 of the greedy answer with the real response (SQuAD-style)
  repetition_rate    share of greedy answers in which some word trigram occurs 3 or more times (degeneration)
  sample_tokens      mean length of the greedy answers (tokens)
Writes OUT/seed-S/{sft,spin,sft-continued}/ (ordinary run folders) and OUT/seed-S/results.json, then
OUT/summary.json, OUT/results.md (the table) and OUT/spin_vs_sft.png (the plot).
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
from spin_lite.model import load_base, with_adapter
from spin_lite.run import SpinRun
from spin_lite.sft import run_sft
from spin_lite.state import RunDir, atomic_write_json, atomic_write_text, read_json, read_jsonl

METRICS = [  # (key, column title, format)
    ("match_rate", "held-out match rate", "{:.2f}"),
    ("logp_per_token", "held-out logp/token", "{:.3f}"),
    ("margin_acc_vs_sft", "margin acc vs SFT", "{:.2f}"),
    ("word_f1", "word F1", "{:.3f}"),
    ("repetition_rate", "repetitive answers", "{:.2f}"),
    ("sample_tokens", "answer tokens", "{:.1f}"),
]


def run_seed(seed: int, args) -> dict:
    """Train and evaluate every model of one seed; returns (and writes) OUT/seed-S/results.json."""
    out = Path(args.out) / f"seed-{seed}"
    if (out / "results.json").exists():
        return read_json(out / "results.json")
    began = time.time()
    sft_adapter = out / "sft" / "adapter"
    common = args.set + [f"seed={seed}"]
    sft_cfg = load_config(args.sft_config, common + [f"run_dir={out / 'sft'}"])
    spin_cfg = load_config(args.spin_config, common + [f"run_dir={out / 'spin'}", f"model.adapter={sft_adapter}"])
    more_cfg = load_config(args.sft_config, common + [f"run_dir={out / 'sft-continued'}", f"model.adapter={sft_adapter}"])
    if sft_cfg.data != spin_cfg.data or sft_cfg.model.name != spin_cfg.model.name or sft_cfg.model.adapter:
        raise SystemExit("the SFT and SPIN configs must share model.name and the data section (the same held-out "
                         "rows), and the SFT config must start from the bare model (no model.adapter)")

    run_sft(sft_cfg)
    spin = SpinRun(spin_cfg)
    spin.run()
    tokenizer = spin.tokenizer
    del spin
    summaries = RunDir(spin_cfg.run_dir).summaries()
    cumulative = list(itertools.accumulate(s["train"]["steps"] for s in summaries))
    run_sft(more_cfg, steps=cumulative[-1], save_at=tuple(cumulative[:-1]))

    rows = evaluate_models(spin_cfg, tokenizer, summaries, cumulative, out)
    result = {"seed": seed, "rows": rows, "wall_s": round(time.time() - began, 1),
              "sft": read_json(out / "sft" / "metrics.json"), "sft_continued": read_json(out / "sft-continued" / "metrics.json"),
              "spin_train": [s["train"] for s in summaries]}
    atomic_write_json(out / "results.json", result)
    return result


def evaluate_models(cfg, tokenizer, summaries: list[dict], cumulative: list[int], out: Path) -> list[dict]:
    """One row per model, all on the held-out rows of SPIN iteration 0 (whose opponent is the SFT model)."""
    spin_dir = out / "spin"
    # The held-out prompts with the SFT model's sampled answers and its log-probs of both answers.
    sft_pairs = [p for p in read_jsonl(spin_dir / "iter-00" / "pairs.jsonl") if p["split"] == "eval"]
    plain = [{k: p[k] for k in ("key", "prompt_ids", "real_ids")} for p in sft_pairs]
    base = load_base(cfg.model)
    rows = []

    metrics, samples = evaluate(base, tokenizer, plain, cfg)
    rows.append(row("base", "start", None, metrics | {"margin_acc_vs_sft": None}, samples))
    start = read_json(spin_dir / "eval-start.json")  # the SPIN run's evaluation of its starting (SFT) model
    rows.append(row("sft", "start", 0, start["metrics"] | {"margin_acc_vs_sft": None}, start["samples"]))

    for t, summary in enumerate(summaries):
        iteration = spin_dir / f"iter-{t:02d}"
        model = with_adapter(base, cfg.lora, str(iteration / "adapter"))
        vs_sft = margin_accuracy(model, sft_pairs, tokenizer.pad_token_id, cfg.train.micro_batch_size * 2)
        base = model.unload()
        own = summary["eval"]["margin_accuracy"]  # against this iteration's own opponent
        rows.append(row(f"spin iter {t}", "spin", cumulative[t],
                        summary["eval"] | {"margin_acc_vs_sft": vs_sft, "margin_acc_own_opponent": own},
                        read_jsonl(iteration / "samples.jsonl")))

    for steps in cumulative:
        more = out / "sft-continued"
        adapter = more / "adapter" if steps == cumulative[-1] else more / f"step-{steps:06d}"
        model = with_adapter(base, cfg.lora, str(adapter))
        metrics, samples = evaluate(model, tokenizer, sft_pairs, cfg)
        base = model.unload()
        rows.append(row(f"sft +{steps}", "sft-continued", steps,
                        metrics | {"margin_acc_vs_sft": metrics["margin_accuracy"]}, samples))
    return rows


def margin_accuracy(model, pairs: list[dict], pad_id: int, batch_size: int) -> float:
    """Share of pairs with log p(real)/p_opp(real) > log p(gen)/p_opp(gen), against the pairs' opponent."""
    prompts = [p["prompt_ids"] for p in pairs]
    real, _ = score(model, prompts, [p["real_ids"] for p in pairs], pad_id, batch_size)
    gen, _ = score(model, prompts, [p["gen_ids"] for p in pairs], pad_id, batch_size)
    wins = [(r - p["opponent_real"]) - (g - p["opponent_gen"]) > 0 for p, r, g in zip(pairs, real, gen)]
    return sum(wins) / len(wins)


def row(name: str, family: str, steps: int | None, metrics: dict, samples: list[dict]) -> dict:
    samples = [{"key": s["key"], "real": s["real"], "model": s["model"]} for s in samples]
    return {"model": name, "family": family, "steps_after_sft": steps,
            **{k: v for k, v in metrics.items() if k != "margin_accuracy"}, **text_metrics(samples),
            "samples": samples}


def text_metrics(samples: list[dict]) -> dict:
    """word_f1 and repetition_rate of the greedy answers (means over the held-out prompts)."""
    f1 = [word_f1(s["model"], s["real"]) for s in samples]
    repetitive = [is_repetitive(s["model"]) for s in samples]
    return {"word_f1": sum(f1) / len(f1), "repetition_rate": sum(repetitive) / len(repetitive)}


def is_repetitive(text: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return bool(trigrams) and max(trigrams.values()) >= 3


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
        per_seed = [r | text_metrics(r["samples"]) for r in per_seed]  # also for results written before a metric
        entry = {"model": name, "family": per_seed[0]["family"], "steps_after_sft": per_seed[0]["steps_after_sft"]}
        for key in [m[0] for m in METRICS] + ["margin_acc_own_opponent"]:
            values = [r[key] for r in per_seed if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                              "min": min(values), "max": max(values), "values": values}
        out.append(entry)
    return out


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
        for family, label, color in (("spin", "SPIN iterations 0, 1, 2", "tab:red"),
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
        if key in ("match_rate", "margin_acc_vs_sft", "repetition_rate"):
            ax.set_ylim(-0.03, 1.03)  # shares: the full scale, so that a saturated metric looks saturated
        ax.set_title(title)
        ax.set_xlabel("optimizer steps after SFT")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SPIN vs SFT continued from the same SFT model (mean, min-max band, dots: seeds {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args) -> str:
    out = Path(args.out)
    results = [read_json(out / f"seed-{s}" / "results.json") for s in args.seeds]
    results = [r for r in results if r is not None]
    if not results:
        raise SystemExit(f"no results in {out} for seeds {args.seeds}")
    seeds = [r["seed"] for r in results]
    summary = summarize(results)
    atomic_write_json(out / "summary.json", {"seeds": seeds, "wall_s": {r["seed"]: r["wall_s"] for r in results},
                                             "models": summary})
    table = markdown_table(summary, seeds)
    atomic_write_text(out / "results.md", table)
    plot(summary, seeds, out / "spin_vs_sft.png")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/experiment")
    parser.add_argument("--sft-config", default="examples/configs/experiment_sft.yaml")
    parser.add_argument("--spin-config", default="examples/configs/experiment_spin.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both configs, e.g. model.name=HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args(argv)
    began = time.time()
    if not args.report_only:
        for seed in args.seeds:
            result = run_seed(seed, args)
            print(f"seed {seed}: done in {result['wall_s'] / 60:.1f} min", flush=True)
    print(report(args))
    print(f"total wall time of this invocation: {(time.time() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
