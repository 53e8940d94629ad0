"""Peak GPU memory of one SPIN iteration of an 8B-shape model in 4 bits, phase by phase, with the defaults.

    .venv/bin/python bench/memory_8b.py                  # as a 24 GiB card: the process is capped at 24 GiB
    .venv/bin/python bench/memory_8b.py --card-gib 0     # no cap (the card's own memory)
    .venv/bin/python bench/memory_8b.py --size 1b        # the same on the 1B shape, quicker
    .venv/bin/python bench/memory_8b.py --size tiny --out /tmp/m.json   # seconds: a rehearsal of the code

The model is a random-init Llama-3.1-8B shape (made once under $SPIN_BENCH_DIR, 16 GB of bf16 on disk),
loaded in nf4 as spin_lite loads it. The data are word-level texts at the default limits: 512-token prompts,
512-token responses (data.max_length 1024), 256 new tokens. Every other setting is spin_lite's default
(generation.batch_size 16, train.micro_batch_size 4, gradient checkpointing, LoRA r 16 on all linear layers).
Phases: load (base + adapter), generate (merged copy if it fits, else the 4-bit model), score, train.
Writes bench/results/memory-<size>-<machine>.json (or --out). Needs CUDA, except --size tiny, which runs the
same phases on a CPU (memory there: growth of the resident set, not comparable) to rehearse the code.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="8b", choices=["8b", "1b", "tiny"])
    parser.add_argument("--out", help="where to write the JSON (default: bench/results/memory-<size>-<machine>.json)")
    parser.add_argument("--card-gib", type=float, default=24.0, help="cap the process at this much (0: no cap)")
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.size != "tiny":
        sys.exit("memory_8b.py measures GPU memory: it needs CUDA (--size tiny rehearses it on a CPU)")
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    if args.card_gib and cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib * 2**30 / total))

    from spin_lite.config import SpinConfig
    from spin_lite.generate import engine_for, generate_all
    from spin_lite.run import SpinRun
    from spin_lite.train import train_adapter

    size = args.size
    if size not in C.SHAPES:
        raise SystemExit(f"unknown size {size}")
    out = C.WORK / f"memory-{size}-{int(time.time())}"
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    vocab = C.SHAPES[size]["vocab_size"]
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": C.text(C.words(512, vocab, g)),
                                        "response": C.text(C.words(511, vocab, g))}) + "\n"
                            for _ in range(args.prompts)))
    # the default generation settings, except a few new tokens on a CPU (a rehearsal)
    generation = {} if cuda else {"max_new_tokens": 4}
    cfg = SpinConfig.from_dict({"run_dir": str(out / "run"), "iterations": 1,
                                "model": {"name": str(C.model_dir(size)), "load_in_4bit": True},
                                "data": {"path": str(data), "eval_size": 0, "val_size": 0}, "generation": generation,
                                "train": {"stop_when": "never"}, "eval": {"enabled": False}})
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    report = {"machine": C.machine(), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "bench/memory_8b.py", *sys.argv[1:]]), "size": size,
              "cap_gib": (args.card_gib or round(total / 2**30, 1)) if cuda else None, "settings": cfg.to_dict(),
              "phases": {}}

    def phase(name, fn):
        if not cuda:  # a rehearsal: the resident set's growth
            with C.Meter() as m:
                value = fn()
            report["phases"][name] = {"peak_allocated_gib": round(m.added_gib, 2),
                                      "peak_reserved_gib": round(m.added_gib, 2), "seconds": round(m.seconds, 1)}
            print(name, report["phases"][name], flush=True)
            return value
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        report["phases"][name] = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                  "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                                  "seconds": round(time.perf_counter() - began, 1)}
        print(name, report["phases"][name], flush=True)
        return value

    from spin_lite import generate as gen
    choices = {}
    merged = gen.merged_copy

    def merged_copy(model, reserve=0):
        copy = merged(model, reserve)
        choices["generated_from"] = "merged 16-bit copy" if copy is not None else "the 4-bit model + adapter"
        choices["engine"] = engine_for(cfg.generation.engine, copy if copy is not None else model)
        return copy

    gen.merged_copy = merged_copy
    folder = run.dir.iteration(0)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = phase("load", lambda: run.model_for(0))
        generations = phase("generate", lambda: generate_all(model, run.tokenizer, run.prompts(), cfg.generation,
                                                             folder / "generations.jsonl", seed=0))
        pairs = phase("score", lambda: run.score(0, model, generations))
        phase("train", lambda: train_adapter(model, [p for p in pairs if p["split"] == "train"], cfg, 0, folder,
                                             run.tokenizer.pad_token_id))
    except torch.OutOfMemoryError as e:
        report["out_of_memory"] = str(e)[:500]
    report.update(choices)
    report["fits"] = None if not cuda else "out_of_memory" not in report and all(
        p["peak_reserved_gib"] <= report["cap_gib"] for p in report["phases"].values())
    path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"memory-{size}-{C.machine()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
