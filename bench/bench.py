"""spin_lite against its peers, on the same model, data and settings: generation, a training step, an iteration.

    make bench                                   # what this machine runs: SmolLM2-135M on a CPU,
                                                 # the Llama-3.2-1B shape in bf16 and nf4 on a GPU
    .venv/bin/python bench/bench.py --size smollm2 --quant fp32
    .venv/bin/python bench/bench.py --size 1b --quant bf16 nf4
    .venv/bin/python bench/bench.py --size tiny --only gen --out /tmp/b.json   # seconds: a rehearsal of the code
    .venv/bin/python bench/bench.py --lengths equal spread                      # also prompts/answers of many lengths

Peers: transformers `generate` on the PEFT model (generation), TRL's DPOTrainer with the sigmoid loss and
precompute_ref_log_probs (training: the SPIN loss is DPO's with the opponent as reference), and the two in
sequence (a whole iteration). Same LoRA (r 16, alpha 32, all linear layers), batch sizes, lengths and
gradient checkpointing on both sides. Every case runs in a fresh process (its own peak memory: CUDA peak
allocated on a GPU, peak RSS on a CPU). Prints a table and writes bench/results/<machine>.json (or --out).
Fair both ways: a training step is timed whole on both sides (common.StepClock: from one optimizer step's end to
the next, the device synchronised), with the real tokens each step took; every figure is the median of at least 3
(generation: 3 alternated runs in one process; training: the measured steps of a run; the driver's --repeats
runs of a case), with its spread (least, most); generation warms up at the batch it measures; the iteration
reports the time and peak memory of each phase on both sides; `--lengths spread` draws prompt and answer lengths
from [full / 4, full] (padding, as real data have). Numerics: the peer's bf16 runs under autocast (TRL's bf16=True),
and so does spin_lite's (train.autocast auto); each result names its setting.
Generation runs both engines of spin_lite (generation.engine): the one `auto` picks on this machine (static on
a GPU, eager on a CPU) in the cases compared with the peer, the other as `gen.ours_<engine>_*`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
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


def prompts(size: str, n: int, length: int, seed: int = 0, spread: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [C.words(k, vocab(size), g) for k in C.lengths(n, length, spread, g)]


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
    """The peer and spin_lite on the same loaded PEFT model, alternated `repeats` times (the median of each, and
    its spread): transformers generate at `gen_batch`, generate_all at the same batch, generate_all at its own.
    Each configuration is first run once, untimed, at the rows it is measured at (8 new tokens): the first call at a
    shape pays for allocations and library set-up that later calls do not."""
    from spin_lite import generate as gen
    from spin_lite.config import GenerationSettings
    model = with_lora(load(size, quant)).eval()
    chosen, default_rows = {}, gen.rows_per_pass
    other = "eager" if torch.cuda.is_available() else "static"  # the engine auto does not pick here
    no_eos = types.SimpleNamespace(eos_token_id=-1, pad_token_id=C.PAD)  # full length, as the peer's min_new_tokens
    out = C.WORK / f"gen-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    batch = prompts(size, s.gen_batch, s.prompt_len, spread=s.spread)
    many = batch + prompts(size, max(0, s.gen_prompts - s.gen_batch), s.prompt_len, seed=1, spread=s.spread)

    def ours(todo: list[list[int]], auto: bool, name: str, engine: str = "auto", new_tokens: int = s.new_tokens):
        def rows(*args):
            chosen[auto] = default_rows(*args) if auto else s.gen_batch
            return chosen[auto]
        gen.rows_per_pass = rows
        settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                      batch_size=s.gen_batch, engine=engine)
        path = out / f"{name}.jsonl"
        path.unlink(missing_ok=True)
        records = gen.generate_all(model, no_eos, {f"p{i}": p for i, p in enumerate(todo)}, settings, path, seed=1,
                                   stop_ids=[])
        assert all(len(r["ids"]) == new_tokens for r in records.values())

    runs = {"gen.peer": (lambda n: hf_generate(model, batch, n, True), batch, lambda: s.gen_batch),
            "gen.ours_same_batch": (lambda n: ours(batch, False, "same", new_tokens=n), batch, lambda: chosen[False]),
            "gen.ours_auto_batch": (lambda n: ours(many, True, "auto", new_tokens=n), many, lambda: chosen[True]),
            f"gen.ours_{other}_same_batch": (lambda n: ours(batch, False, "same", other, n), batch,
                                            lambda: chosen[False]),
            f"gen.ours_{other}_auto_batch": (lambda n: ours(many, True, "auto", other, n), many, lambda: chosen[True])}
    for fn, _, _ in runs.values():  # warm-up at the measured rows
        fn(8)
    measured: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name, (fn, todo, rows) in runs.items():
            with C.Meter() as m:  # spin_lite's merged copy is made and freed inside: counted
                fn(s.new_tokens)
            measured.setdefault(name, []).append(
                {"tokens_per_s": len(todo) * s.new_tokens / m.seconds, "seconds": m.seconds, "peak_gib": m.peak_gib,
                 "added_gib": m.added_gib, "batch": rows(), "prompts": len(todo),
                 "prompt_tokens_mean": sum(map(len, todo)) / len(todo)})
    t0 = time.perf_counter()
    gen.merged_copy(model)
    C.sync()
    merge_s = time.perf_counter() - t0  # paid once per generate_all call, inside its figures
    C.result(**{name: median_of(runs_) | {"merged_copy_s": merge_s} for name, runs_ in measured.items()})


def median_of(runs: list[dict], key: str = "tokens_per_s") -> dict:
    """The run with the median `key` (the lower middle one of an even count), with every run's value and the spread
    (least, most)."""
    values = sorted(r[key] for r in runs)
    middle = sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]
    return middle | {"values": values, "spread": [values[0], values[-1]], "repeats": len(runs)}


def case_gen_hf_merged(size, quant, s: C.Sizes, static: bool):
    """Levers: transformers generate on the merged weights, dynamic or static (compiled) cache."""
    from spin_lite.generate import merged_copy
    model = merged_copy(with_lora(load(size, quant)).eval())
    if static:
        model.generation_config.cache_implementation = "static"
    todo = prompts(size, s.gen_batch, s.prompt_len, spread=s.spread)
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


def train_pairs(size, s: C.Sizes, n: int) -> list[dict]:
    """n pairs of word ids (prompt, real and generated response), the same on both sides; with s.spread every
    length is drawn from [full / 4, full] (common.lengths)."""
    g = torch.Generator().manual_seed(1)
    v = vocab(size)
    sizes = zip(C.lengths(n, s.train_prompt, s.spread, g), C.lengths(n, s.train_response, s.spread, g),
                C.lengths(n, s.train_response, s.spread, g))
    return [{"prompt_ids": C.words(p, v, g), "real_ids": C.words(r, v, g), "gen_ids": C.words(q, v, g),
             "opponent_real": -900.0, "opponent_gen": -900.0} for p, r, q in sizes]


def body_of(model):
    """The decoder body (what both sides' forward passes through once a micro batch), for common.StepClock."""
    return model.get_base_model().get_decoder()


def case_train_ours(size, quant, s: C.Sizes, autocast: str = "auto"):
    from spin_lite.train import train_adapter
    model = with_lora(load(size, quant))
    pairs = train_pairs(size, s, s.train_pairs * (2 + s.train_steps))
    out = C.WORK / f"train-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config(size, quant, s, out, train={"autocast": autocast})
    clock = C.StepClock(body_of(model))
    with C.Meter() as m:
        train_adapter(model, pairs, cfg, 0, out, C.PAD, progress=clock.tick)
    name = "train.ours" if autocast == "auto" else f"lever.train.autocast_{autocast}"
    from spin_lite.logprobs import autocasts
    C.result(**{name: clock.summary(warmup=2) | dict(
        peak_gib=m.peak_gib, added_gib=m.added_gib, seconds=m.seconds, steps=len(clock.stamps),
        autocast=f"{autocast} ({'on' if autocasts(model, autocast) else 'off'})")})


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
    steps = 2 + s.train_steps
    # TRL closes chosen and rejected with the EOS: responses of as many tokens as spin_lite's
    rows = [{"prompt": C.text(p["prompt_ids"]), "chosen": C.text(p["real_ids"][:-1]),
             "rejected": C.text(p["gen_ids"][:-1])} for p in train_pairs(size, s, s.train_pairs * steps)]
    trainer = trl_trainer(size, quant, s, rows, steps, C.WORK / f"trl-{os.getpid()}")
    first = trainer.train_dataset[0]
    lengths = {k: len(v) for k, v in first.items() if k.endswith("input_ids") or k.endswith("_ids")}
    clock = C.StepClock(body_of(trainer.model))

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):  # after the optimizer step, as spin_lite's progress callback
            clock.tick()

    trainer.add_callback(StepEnd())
    with C.Meter() as m:
        trainer.train()
    C.result(**{"train.trl": clock.summary(warmup=2) | dict(
        peak_gib=m.peak_gib, added_gib=m.added_gib, seconds=m.seconds, steps=len(clock.stamps),
        token_lengths=lengths, autocast="bf16=True (accelerate autocast)" if trainer.args.bf16 else "none")})


# -- a whole iteration ---------------------------------------------------------------------------------------
def iteration_rows(size, s: C.Sizes) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    v = vocab(size)
    sizes = zip(C.lengths(s.iter_prompts, s.prompt_len, s.spread, g),
                C.lengths(s.iter_prompts, s.iter_new_tokens - 1, s.spread, g))
    return [{"prompt": C.text(C.words(p, v, g)), "response": C.text(C.words(r, v, g))} for p, r in sizes]


def phase(phases: dict, name: str, fn):
    """fn() timed and its peak memory measured as phase `name`; returns fn's result."""
    with C.Meter() as m:
        value = fn()
    phases[name] = {"seconds": round(m.seconds, 2), "peak_gib": round(m.peak_gib, 3),
                    "added_gib": round(m.added_gib, 3)}
    return value


def case_iter_ours(size, quant, s: C.Sizes):
    """SpinRun's iteration 0 stage by stage (as `spin-lite generate|train|evaluate` runs them): load, generate (the
    opponent's answers and its log-probs of the pairs), train, evaluate (evaluation off: the summary)."""
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
    phases = {}
    with C.Meter() as m:
        phase(phases, "prepare", run.prepare)
        phase(phases, "load", run.loaded_base)
        for stage in ("generate", "train", "evaluate"):
            phase(phases, stage, lambda: run.iteration(0, only=stage))
    run.close()
    summary = json.loads((out / "run" / "iter-00" / "summary.json").read_text())
    C.result(**{"iter.ours": dict(seconds=time.perf_counter() - began, peak_gib=m.peak_gib, added_gib=m.added_gib,
                                  phases=phases, pairs=summary["pairs"]["current"],
                                  generated_mean_tokens=summary["pairs"]["generated_mean_tokens"])})


def case_iter_peer(size, quant, s: C.Sizes):
    """generate on the PEFT model, then DPOTrainer (its reference log-probs precomputed inside train())."""
    began = time.perf_counter()
    rows = iteration_rows(size, s)
    tok = C.word_tokenizer(vocab(size))
    phases = {}
    with C.Meter() as m:
        model = phase(phases, "load", lambda: with_lora(load(size, quant)).eval())
        todo = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]

        def generate():
            done = []
            for i in range(0, len(todo), s.gen_batch):
                done += hf_generate(model, todo[i:i + s.gen_batch], s.iter_new_tokens, False)
            return done
        generated = phase(phases, "generate", generate)
        del model
        pairs = []
        for r, ids in zip(rows, generated):
            ids = ids[:ids.index(C.EOS)] if C.EOS in ids else ids
            pairs.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": C.text(ids)})
        folder = C.WORK / f"trl-iter-{os.getpid()}"
        trainer = phase(phases, "load trainer", lambda: trl_trainer(size, quant, s, pairs, None, folder))
        phase(phases, "score + train", trainer.train)
        phase(phases, "save", lambda: trainer.save_model(str(folder / "adapter")))
    C.result(**{"iter.peer": dict(seconds=time.perf_counter() - began, peak_gib=m.peak_gib, added_gib=m.added_gib,
                                  phases=phases, pairs=len(pairs), generated_mean_tokens=sum(
                                      g.index(C.EOS) + 1 if C.EOS in g else len(g) for g in generated) / len(generated))})


CASES = {  # name -> (function, repeated by the driver?)
    "gen": (lambda *a: case_gen(*a, repeats=3), False),
    "train.ours": (case_train_ours, True),
    "train.trl": (case_train_trl, True),
    "iter.ours": (case_iter_ours, True),
    "iter.peer": (case_iter_peer, True),
}
GPU_LEVERS = {
    "lever.gen.hf_merged_dynamic": (lambda *a: case_gen_hf_merged(*a, static=False), False),
    "lever.gen.hf_merged_static": (lambda *a: case_gen_hf_merged(*a, static=True), False),
    "lever.train.autocast_never": (lambda *a: case_train_ours(*a, autocast="never"), True),  # (train.autocast)
}


# -- the driver ----------------------------------------------------------------------------------------------
def run_case(name: str, size: str, quant: str, timeout: int, threads: int | None, lengths: str = "equal") -> dict:
    """Run one case in a fresh process; {result name: measurements} (or {name: {"error": ...}})."""
    began = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--size", size, "--quant", quant,
                               "--lengths", lengths],
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


def run_cases(names: list[str], size: str, quant: str, args, threads, lengths: str = "equal") -> dict:
    """Each case once; the repeated ones `args.repeats` times, alternating with each other. A figure repeated by the
    driver is the median run, with every run's value and their spread; one run keeps its own spread (over its
    measured steps, or its alternated generation runs)."""
    table = CASES | GPU_LEVERS
    runs: dict[str, list[dict]] = {}
    rounds = [[n for n in names if table[n][1] or r == 0] for r in range(args.repeats)]
    for round_names in rounds:
        for name in round_names:
            for k, v in run_case(name, size, quant, args.timeout, threads, lengths).items():
                runs.setdefault(k, []).append(v)
    out = {}
    for k, vs in runs.items():
        good = [v for v in vs if "error" not in v]
        key = "tokens_per_s" if good and "tokens_per_s" in good[0] else "seconds"
        out[k] = vs[-1] if not good else good[0] if len(good) == 1 else median_of(good, key) | {"runs": len(vs)}
    return out


def compare(cases: dict, size: str, quant: str, kind: str, where: str, lengths: str = "equal") -> list[dict]:
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
                "ours_spread": o.get("spread"), "peer_spread": p.get("spread"),
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
    rows = [r | {"lengths": lengths} for r in rows if r is not None]
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
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the training and iteration cases, alternated; the median run is kept, with the "
                             "spread (each training run also measures several steps, generation alternates 3 runs)")
    parser.add_argument("--lengths", nargs="*", choices=["equal", "spread"],
                        help="prompt and answer lengths: all equal to the size's, or drawn from [full / 4, full] "
                             "(default: both on a GPU, equal on a CPU)")
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
        spread = (args.lengths or ["equal"])[0] == "spread"
        (CASES | GPU_LEVERS)[args.case][0](size, quants[0], dataclasses.replace(C.SIZES[size], spread=spread))
        return
    where, kind = C.machine(), "gpu" if cuda else "cpu"
    threads = args.threads or (None if cuda else 1)
    C.model_dir(size)  # made once, before the cases time anything
    report = {"machine": where, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "bench/bench.py", *sys.argv[1:]]), "versions": versions(),
              "cpu_count": os.cpu_count(), "threads_per_case": threads, "load_average_at_start": os.getloadavg(),
              "sizes": {size: C.settings_dict(C.SIZES[size])}, "comparisons": [], "cases": {}}
    for quant in quants:
        for lengths in args.lengths or (["equal", "spread"] if cuda else ["equal"]):
            print(f"== {size} {quant} on {where}, {lengths} lengths", flush=True)
            names = [n for n in list(CASES) + (list(GPU_LEVERS) if cuda else []) if not args.only or n in args.only]
            cases = run_cases(names, size, quant, args, threads, lengths)
            report["cases"][f"{size}.{quant}" + (".spread" if lengths == "spread" else "")] = cases
            report["comparisons"] += compare(cases, size, quant, kind, where, lengths)
    report["load_average_at_end"] = os.getloadavg()
    print_table(report)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{where}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def print_table(report: dict):
    head = ["comparison", "size", "quant", "ours (spread)", "peer (spread)", "ratio", "target", "ours GiB", "peer GiB"]
    rows = [head]
    for c in report["comparisons"]:
        quant = c["quant"] + (" spread" if c.get("lengths") == "spread" else "")
        if "error" in c:
            rows.append([c["comparison"], c["size"], quant, "error", "", "", "", "", ""])
            continue
        unit = " tok/s" if c["metric"] == "tokens_per_s" else " s"
        target = f">= {c['target_ratio']}x" if c.get("target_ratio") else ""
        if c.get("target_tokens_per_s"):
            target = (target + " " if target else "") + f">= {c['target_tokens_per_s']:,} tok/s"
        figure = lambda v, spread: f"{v:,.1f}{unit}" + (f" ({spread[0]:,.0f}-{spread[1]:,.0f})" if spread else "")
        rows.append([c["comparison"], c["size"], quant, figure(c["ours"], c.get("ours_spread")),
                     figure(c["peer"], c.get("peer_spread")), f"{c['ratio']:.2f}x", target,
                     f"{c['ours_peak_gib']:.2f}", f"{c['peer_peak_gib']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print(f"\nspin_lite vs peers on {report['machine']} ({report['date']}); ratio > 1: spin_lite faster; medians, "
          "(least-most) over the repeats (GiB: CUDA peak allocated on a GPU; on a CPU the peak growth of the "
          "process's RSS during the case)")
    for n, r in enumerate(rows):
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
