"""spin_lite against its peers, on the same model, data and settings: generation, a training step, an iteration.

    make bench                                   # what this machine runs: SmolLM2-135M on a CPU,
                                                 # the Llama-3.2-1B shape in bf16 and nf4 on a GPU
    .venv/bin/python bench/bench.py --size smollm2 --quant fp32
    .venv/bin/python bench/bench.py --size 1b --quant bf16 nf4
    .venv/bin/python bench/bench.py --size tiny --only gen --out /tmp/b.json   # seconds: a rehearsal of the code

Peers: transformers `generate` on the PEFT model (generation), TRL's DPOTrainer with the sigmoid loss and
precompute_ref_log_probs (training: the SPIN loss is DPO's with the opponent as reference), and the two in
sequence (a whole iteration). Same LoRA (r 16, alpha 32, all linear layers), batch sizes, lengths and
gradient checkpointing on both sides. Every case runs in a fresh process (its own peak memory: CUDA peak
allocated on a GPU, peak RSS on a CPU). Prints a table and writes bench/results/<machine>.json (or --out).
Generation runs both engines of spin_lite (generation.engine): the one `auto` picks on this machine (static on
a GPU, eager on a CPU) in the cases compared with the peer, the other as `gen.ours_<engine>_*`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

LORA = dict(r=16, alpha=32)
TARGETS = {  # (what, minimum) per comparison and machine kind, from the issue
    "cpu": {"gen.same_batch": 1.5, "gen.auto_batch": 1.5, "train.step": 1.2},
    "gpu": {"gen.same_batch": 10.0, "train.step": 1.5, "iteration": 5.0},
}
GPU_GEN_TOKENS_PER_S = 40_000


# -- models ---------------------------------------------------------------------------------------------
def load(size: str, quant: str):
    from spin_lite.config import ModelConfig
    from spin_lite.model import load_base
    cfg = ModelConfig(name=str(C.model_dir(size)), load_in_4bit=quant == "nf4",
                      dtype="float32" if quant == "fp32" else "bfloat16")
    return load_base(cfg)


def with_lora(model):
    from spin_lite.config import LoraSettings
    from spin_lite.model import with_adapter
    return with_adapter(model, LoraSettings(**LORA), None)


def vocab(size: str) -> int:
    return json.loads((C.model_dir(size) / "config.json").read_text())["vocab_size"]


def prompts(size: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [C.words(length, vocab(size), g) for _ in range(n)]


# -- generation -------------------------------------------------------------------------------------------
def hf_generate(model, batch: list[list[int]], new_tokens: int, full_length: bool):
    from transformers import GenerationConfig
    from spin_lite.generate import _left_pad
    ids, mask = _left_pad(batch, C.PAD)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens if full_length else None,
                              do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=C.EOS,
                              pad_token_id=C.PAD)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def case_gen(size, quant, s: C.Sizes, repeats: int):
    """The peer and spin_lite on the same loaded PEFT model, alternated `repeats` times (best of each):
    transformers generate at `gen_batch`, generate_all at the same batch, generate_all at its own."""
    from spin_lite import generate as gen
    from spin_lite.config import GenerationSettings
    model = with_lora(load(size, quant)).eval()
    chosen, default_rows = {}, gen.rows_per_pass
    other = "eager" if torch.cuda.is_available() else "static"  # the engine auto does not pick here
    no_eos = types.SimpleNamespace(eos_token_id=-1, pad_token_id=C.PAD)  # full length, as the peer's min_new_tokens
    out = C.WORK / f"gen-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    batch = prompts(size, s.gen_batch, s.prompt_len)
    many = batch + prompts(size, max(0, s.gen_prompts - s.gen_batch), s.prompt_len, seed=1)

    def ours(todo: list[list[int]], auto: bool, name: str, engine: str = "auto"):
        def rows(*args):
            chosen[auto] = default_rows(*args) if auto else s.gen_batch
            return chosen[auto]
        gen.rows_per_pass = rows
        settings = GenerationSettings(max_new_tokens=s.new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                      batch_size=s.gen_batch, engine=engine)
        path = out / f"{name}.jsonl"
        path.unlink(missing_ok=True)
        records = gen.generate_all(model, no_eos, {f"p{i}": p for i, p in enumerate(todo)}, settings, path, seed=1,
                                   stop_ids=[])
        assert all(len(r["ids"]) == s.new_tokens for r in records.values())

    runs = {"gen.peer": (lambda: hf_generate(model, batch, s.new_tokens, True), batch, lambda: s.gen_batch),
            "gen.ours_same_batch": (lambda: ours(batch, False, "same"), batch, lambda: chosen[False]),
            "gen.ours_auto_batch": (lambda: ours(many, True, "auto"), many, lambda: chosen[True]),
            f"gen.ours_{other}_same_batch": (lambda: ours(batch, False, "same", other), batch, lambda: chosen[False]),
            f"gen.ours_{other}_auto_batch": (lambda: ours(many, True, "auto", other), many, lambda: chosen[True])}
    hf_generate(model, batch[:2], 4, True)  # warm-up
    ours(batch[:2], False, "warm")
    ours(batch[:2], False, "warm", other)
    best = {}
    for _ in range(repeats):
        for name, (fn, todo, rows) in runs.items():
            with C.Meter() as m:  # spin_lite's merged copy is made and freed inside: counted
                fn()
            r = {"tokens_per_s": len(todo) * s.new_tokens / m.seconds, "seconds": m.seconds,
                 "peak_gib": m.peak_gib, "added_gib": m.added_gib, "batch": rows(), "prompts": len(todo)}
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    C.result(**best)


def case_gen_hf_merged(size, quant, s: C.Sizes, static: bool):
    """Levers: transformers generate on the merged weights, dynamic or static (compiled) cache."""
    from spin_lite.generate import merged_copy
    model = merged_copy(with_lora(load(size, quant)).eval())
    if static:
        model.generation_config.cache_implementation = "static"
    todo = prompts(size, s.gen_batch, s.prompt_len)
    hf_generate(model, todo, s.new_tokens, True)  # warm-up at the measured shape (compiles a static cache)
    with C.Meter() as m:
        hf_generate(model, todo, s.new_tokens, True)
    C.result(**{f"lever.gen.hf_merged_{'static' if static else 'dynamic'}": dict(
        tokens_per_s=len(todo) * s.new_tokens / m.seconds, seconds=m.seconds, peak_gib=m.peak_gib,
        added_gib=m.added_gib, batch=s.gen_batch, prompts=len(todo))})


# -- a training step ----------------------------------------------------------------------------------------
def train_config(size, quant, s: C.Sizes, run_dir: Path, **extra):
    from spin_lite.config import SpinConfig
    d = {"run_dir": str(run_dir), "iterations": 1,
         "model": {"name": str(C.model_dir(size)), "load_in_4bit": quant == "nf4",
                   "dtype": "float32" if quant == "fp32" else "bfloat16"},
         "lora": LORA,
         "train": {"micro_batch_size": s.train_pairs, "gradient_accumulation_steps": 1, "epochs": 1,
                   "learning_rate": 1e-5, "gradient_checkpointing": True, "save_every": 10_000,
                   "warmup_ratio": 0.0, "stop_when": "never"}}
    for key, value in extra.items():
        d.setdefault(key, {}).update(value) if isinstance(value, dict) else d.__setitem__(key, value)
    return SpinConfig.from_dict(d)


def case_train_ours(size, quant, s: C.Sizes):
    from spin_lite.train import train_adapter
    model = with_lora(load(size, quant))
    g = torch.Generator().manual_seed(1)
    v = vocab(size)
    pairs = [{"prompt_ids": C.words(s.train_prompt, v, g), "real_ids": C.words(s.train_response, v, g),
              "gen_ids": C.words(s.train_response, v, g), "opponent_real": -900.0, "opponent_gen": -900.0}
             for _ in range(s.train_pairs * (2 + s.train_steps))]
    out = C.WORK / f"train-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config(size, quant, s, out)
    with C.Meter() as m:
        train_adapter(model, pairs, cfg, 0, out, C.PAD)
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in log[2:])
    C.result(**{"train.ours": dict(tokens_per_s=tps, peak_gib=m.peak_gib, added_gib=m.added_gib, seconds=m.seconds,
                                   steps=len(log), tokens_per_step=2 * s.train_pairs * (s.train_prompt + s.train_response))})


def trl_trainer(size, quant, s: C.Sizes, rows: list[dict], steps: int | None, out: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer
    cuda = torch.cuda.is_available()
    kwargs = dict(dtype=torch.float32 if quant == "fp32" else torch.bfloat16, device_map=C.device())
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(C.model_dir(size), **kwargs)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=s.train_pairs, beta=0.1,
                     loss_type=["sigmoid"], learning_rate=1e-5, bf16=cuda and quant != "fp32", logging_steps=1,
                     report_to=[], save_strategy="no", gradient_checkpointing=True, precompute_ref_log_probs=True,
                     max_length=4096, num_train_epochs=1, max_steps=steps or -1, use_cpu=not cuda,
                     dataloader_num_workers=0, warmup_steps=0)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=C.word_tokenizer(vocab(size)),
                      peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))


def case_train_trl(size, quant, s: C.Sizes):
    from transformers import TrainerCallback
    g = torch.Generator().manual_seed(1)
    v = vocab(size)
    steps = 2 + s.train_steps
    # TRL closes chosen and rejected with the EOS: responses of train_response tokens, as spin_lite's
    rows = [{"prompt": C.text(C.words(s.train_prompt, v, g)), "chosen": C.text(C.words(s.train_response - 1, v, g)),
             "rejected": C.text(C.words(s.train_response - 1, v, g))} for _ in range(s.train_pairs * steps)]
    trainer = trl_trainer(size, quant, s, rows, steps, C.WORK / f"trl-{os.getpid()}")
    first = trainer.train_dataset[0]
    lengths = {k: len(v) for k, v in first.items() if k.endswith("input_ids") or k.endswith("_ids")}
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            C.sync()
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            C.sync()
            times.append(time.perf_counter() - self.began)

    trainer.add_callback(StepTimer())
    with C.Meter() as m:
        trainer.train()
    step_s = statistics.median(times[2:])
    C.result(**{"train.trl": dict(tokens_per_s=2 * s.train_pairs * (s.train_prompt + s.train_response) / step_s,
                                  peak_gib=m.peak_gib, added_gib=m.added_gib, seconds=m.seconds, steps=len(times),
                                  token_lengths=lengths,
                                  tokens_per_step=2 * s.train_pairs * (s.train_prompt + s.train_response))})


# -- a whole iteration ---------------------------------------------------------------------------------------
def iteration_rows(size, s: C.Sizes) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    v = vocab(size)
    return [{"prompt": C.text(C.words(s.prompt_len, v, g)), "response": C.text(C.words(s.iter_new_tokens - 1, v, g))}
            for _ in range(s.iter_prompts)]


def case_iter_ours(size, quant, s: C.Sizes):
    from spin_lite.run import SpinRun
    began = time.perf_counter()
    out = C.WORK / f"iter-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in iteration_rows(size, s)))
    cfg = train_config(size, quant, s, out / "run", data={
        "path": str(data), "eval_size": 0, "val_size": 0, "max_prompt_length": s.prompt_len + 8,
        "max_length": s.prompt_len + s.iter_new_tokens + 16},
        generation={"max_new_tokens": s.iter_new_tokens, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                    "batch_size": s.gen_batch}, eval={"enabled": False})
    run = SpinRun(cfg, log=lambda *a: None)
    with C.Meter() as m:
        run.run()
    summary = json.loads((out / "run" / "iter-00" / "summary.json").read_text())
    C.result(**{"iter.ours": dict(seconds=time.perf_counter() - began, peak_gib=m.peak_gib, added_gib=m.added_gib,
                                  pairs=summary["pairs"]["current"],
                                  generated_mean_tokens=summary["pairs"]["generated_mean_tokens"])})


def case_iter_peer(size, quant, s: C.Sizes):
    began = time.perf_counter()
    rows = iteration_rows(size, s)
    tok = C.word_tokenizer(vocab(size))
    with C.Meter() as m:
        model = with_lora(load(size, quant)).eval()
        todo = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        generated = []
        for i in range(0, len(todo), s.gen_batch):
            generated += hf_generate(model, todo[i:i + s.gen_batch], s.iter_new_tokens, False)
        del model
        pairs = []
        for r, ids in zip(rows, generated):
            ids = ids[:ids.index(C.EOS)] if C.EOS in ids else ids
            pairs.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": C.text(ids)})
        trainer = trl_trainer(size, quant, s, pairs, None, C.WORK / f"trl-iter-{os.getpid()}")
        trainer.train()
        trainer.save_model(str(C.WORK / f"trl-iter-{os.getpid()}" / "adapter"))
    C.result(**{"iter.peer": dict(seconds=time.perf_counter() - began, peak_gib=m.peak_gib, added_gib=m.added_gib,
                                  pairs=len(pairs), generated_mean_tokens=sum(
                                      g.index(C.EOS) + 1 if C.EOS in g else len(g) for g in generated) / len(generated))})


CASES = {  # name -> (function, repeated by the driver?)
    "gen": (lambda *a: case_gen(*a, repeats=2), False),
    "train.ours": (case_train_ours, True),
    "train.trl": (case_train_trl, True),
    "iter.ours": (case_iter_ours, True),
    "iter.peer": (case_iter_peer, True),
}
GPU_LEVERS = {
    "lever.gen.hf_merged_dynamic": (lambda *a: case_gen_hf_merged(*a, static=False), False),
    "lever.gen.hf_merged_static": (lambda *a: case_gen_hf_merged(*a, static=True), False),
}


# -- the driver ----------------------------------------------------------------------------------------------
def run_case(name: str, size: str, quant: str, timeout: int, threads: int | None) -> dict:
    """Run one case in a fresh process; {result name: measurements} (or {name: {"error": ...}})."""
    began = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--size", size, "--quant", quant],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out after {timeout} s", file=sys.stderr, flush=True)
        return {name: {"error": f"timed out after {timeout} s"}}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"  {name}: FAILED\n{tail}", file=sys.stderr, flush=True)
        return {name: {"error": tail[-600:]}}
    out = json.loads(lines[-1][len("RESULT "):])
    for k, v in out.items():
        v["case_wall_s"] = round(time.perf_counter() - began, 1)
        print(f"  {k}: {json.dumps(v)}", flush=True)
    return out


def run_cases(names: list[str], size: str, quant: str, args, threads) -> dict:
    """Each case once; the repeated ones `args.repeats` times, alternating with each other (best kept)."""
    table = CASES | GPU_LEVERS
    best: dict[str, dict] = {}
    rounds = [[n for n in names if table[n][1] or r == 0] for r in range(args.repeats)]
    for round_names in rounds:
        for name in round_names:
            for k, v in run_case(name, size, quant, args.timeout, threads).items():
                key = "tokens_per_s" if "tokens_per_s" in v else "seconds"
                better = (lambda a, b: a > b) if key == "tokens_per_s" else (lambda a, b: a < b)
                if k not in best or "error" in best[k] or ("error" not in v and better(v[key], best[k][key])):
                    best[k] = v | {"runs": best.get(k, {}).get("runs", 0) + 1}
                else:
                    best[k]["runs"] = best[k].get("runs", 1) + 1
    return best


def compare(cases: dict, size: str, quant: str, kind: str, where: str) -> list[dict]:
    memory = "peak_gib" if kind == "gpu" else "added_gib"  # RSS includes Python and libraries: its growth

    def row(name, metric, ours, peer, higher_is_better=True, **extra):
        o, p = cases.get(ours, {}), cases.get(peer, {})
        if ours not in cases and peer not in cases:
            return None  # not run (--only)
        if metric not in o or metric not in p:
            return {"comparison": name, "size": size, "quant": quant, "machine": where, "error": "a case failed"}
        ratio = o[metric] / p[metric] if higher_is_better else p[metric] / o[metric]
        target = TARGETS[kind].get(name)
        return {"comparison": name, "size": size, "quant": quant, "machine": where, "metric": metric,
                "ours": round(o[metric], 2), "peer": round(p[metric], 2), "ratio": round(ratio, 2),
                "target_ratio": target, "meets_target": None if target is None else ratio >= target,
                "memory": memory, "ours_peak_gib": round(o.get(memory, float("nan")), 2),
                "peer_peak_gib": round(p.get(memory, float("nan")), 2), **extra}

    rows = [row("gen.same_batch", "tokens_per_s", "gen.ours_same_batch", "gen.peer",
                batch=cases.get("gen.peer", {}).get("batch")),
            row("gen.auto_batch", "tokens_per_s", "gen.ours_auto_batch", "gen.peer",
                ours_batch=cases.get("gen.ours_auto_batch", {}).get("batch")),
            row("train.step", "tokens_per_s", "train.ours", "train.trl"),
            row("iteration", "seconds", "iter.ours", "iter.peer", higher_is_better=False)]
    # the two engines of spin_lite against each other (ratio: static over eager)
    for batch in ("same_batch", "auto_batch"):
        static, eager = (f"gen.ours_{batch}", f"gen.ours_eager_{batch}") if kind == "gpu" else \
            (f"gen.ours_static_{batch}", f"gen.ours_{batch}")
        rows.append(row(f"gen.static_vs_eager.{batch}", "tokens_per_s", static, eager))
    rows = [r for r in rows if r is not None]
    named = {r["comparison"]: r for r in rows}
    if kind == "gpu" and "gen.auto_batch" in named:
        auto = cases.get("gen.ours_auto_batch", {}).get("tokens_per_s")
        named["gen.auto_batch"]["target_tokens_per_s"] = GPU_GEN_TOKENS_PER_S
        named["gen.auto_batch"]["meets_target"] = None if auto is None else auto >= GPU_GEN_TOKENS_PER_S
    if kind == "gpu" and "train.step" in named:
        train = named["train.step"]
        if "ours_peak_gib" in train:
            train["meets_target"] = train.get("meets_target") and train["ours_peak_gib"] <= train["peer_peak_gib"]
    return rows


def versions() -> dict:
    import importlib
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing optional package is reported, not fatal
            out[name] = f"missing ({type(e).__name__})"
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(C.SIZES), help="default: 1b on a GPU, smollm2 on a CPU; tiny: a "
                        "2-layer random model, seconds, to rehearse the code (make gpu-check --tiny)")
    parser.add_argument("--quant", nargs="*", choices=["fp32", "bf16", "nf4"])
    parser.add_argument("--case", help="run one case in this process (used by the driver)")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of the training and iteration cases, alternated, the best kept "
                             "(default: 2 on a CPU, whose neighbours make noise; 1 on a GPU)")
    parser.add_argument("--out", help="where to write the JSON (default: bench/results/<machine>.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per case (default on a CPU: 1, the same for every case: on a shared "
                             "2-core machine, 2 threads a process get descheduled and every number is noise)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    size = args.size or ("1b" if cuda else "smollm2")
    quants = args.quant or (["bf16", "nf4"] if cuda else ["fp32"])
    if args.case:
        torch.manual_seed(0)
        (CASES | GPU_LEVERS)[args.case][0](size, quants[0], C.SIZES[size])
        return
    where, kind = C.machine(), "gpu" if cuda else "cpu"
    threads = args.threads or (None if cuda else 1)
    args.repeats = args.repeats or (1 if cuda else 2)
    C.model_dir(size)  # made once, before the cases time anything
    report = {"machine": where, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "bench/bench.py", *sys.argv[1:]]), "versions": versions(),
              "cpu_count": os.cpu_count(), "threads_per_case": threads, "load_average_at_start": os.getloadavg(),
              "sizes": {size: C.settings_dict(C.SIZES[size])}, "comparisons": [], "cases": {}}
    for quant in quants:
        print(f"== {size} {quant} on {where}", flush=True)
        names = [n for n in list(CASES) + (list(GPU_LEVERS) if cuda else []) if not args.only or n in args.only]
        cases = run_cases(names, size, quant, args, threads)
        report["cases"][f"{size}.{quant}"] = cases
        report["comparisons"] += compare(cases, size, quant, kind, where)
    report["load_average_at_end"] = os.getloadavg()
    print_table(report)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{where}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def print_table(report: dict):
    head = ["comparison", "size", "quant", "ours", "peer", "ratio", "target", "ours GiB", "peer GiB"]
    rows = [head]
    for c in report["comparisons"]:
        if "error" in c:
            rows.append([c["comparison"], c["size"], c["quant"], "error", "", "", "", "", ""])
            continue
        unit = " tok/s" if c["metric"] == "tokens_per_s" else " s"
        target = f">= {c['target_ratio']}x" if c.get("target_ratio") else ""
        if c.get("target_tokens_per_s"):
            target = (target + " " if target else "") + f">= {c['target_tokens_per_s']:,} tok/s"
        rows.append([c["comparison"], c["size"], c["quant"], f"{c['ours']:,.1f}{unit}", f"{c['peer']:,.1f}{unit}",
                     f"{c['ratio']:.2f}x", target, f"{c['ours_peak_gib']:.2f}", f"{c['peer_peak_gib']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print(f"\nspin_lite vs peers on {report['machine']} ({report['date']}); ratio > 1: spin_lite faster "
          "(GiB: CUDA peak allocated on a GPU; on a CPU the peak growth of the process's RSS during the case)")
    for n, r in enumerate(rows):
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
