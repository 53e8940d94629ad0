"""Where a GPU's time goes and what each lever changes: kernel tables (torch.profiler, top kernels by share) of one
SPIN training step and of decoding steps, and A/B timings of the levers, in one process (one model load a part).

    python bench/gpu_profile.py --out $OUT                    # on the device machine (gpu_check's `profile` step)
    python bench/gpu_profile.py --size tiny --out /tmp/prof   # a rehearsal on a CPU: its figures mean nothing

Training, through spin_lite.train.fit itself (bench.py's train.ours: at 1b 8 pairs of 128 + 384 tokens a step, LoRA
r16 on every linear layer, gradient checkpointing), whole optimizer steps timed (common.StepClock), the arms
alternated --repeats times, each run 2 warm-up steps and --steps measured ones:
  autocast      train.autocast auto: bfloat16 autocast, no float32 copy of the LoRA inputs (spin_lite now)
  no_autocast   train.autocast never: the LoRA branch in float32 (spin_lite before)
  packed        autocast auto and train.pack_pairs: each pair one row, the shared prompt computed once
  compiled      autocast auto and train.fused_kernels compile: each decoder layer through torch.compile (inductor;
                its compilation falls in the first run's warm-up steps)
  liger         autocast auto and train.fused_kernels liger: Liger-Kernel's RMSNorm, SwiGLU and RoPE
  and a kernel table of one step of each (kernels_train_<arm>.txt).
Scoring with the shared prompt once (`pack`): forward + backward of the scorer on the same pairs, apart (2B sequences,
what fit does) against packed ([prompt | real | generated], a document mask: sdpa; flex_attention with --flex).
Decoding, from the merged copy, prompts of 32-128 tokens (left padding: the attention mask in play, as with real
prompts), --new tokens sampled to full length, the arms alternated --repeats times after a warm-up at their rows:
  static_gqa_<rows>    the static engine, generation.decode_attention auto (K/V never repeated, the slots written so
                       far rounded up to a bucket of 64)
  static_flat_<rows>   the same without length buckets: every step attends to every cache slot (before)
  static_sdpa_<rows>   the static engine, transformers' sdpa (before)
  eager_<rows>         the eager engine
  at the peer's batch (64) and at spin_lite's own (512): engine_for picks static for a pass of up to 64 rows, and
  before its fix picked by the card's room (512 rows: eager) whatever the pass held; `engine_for` records both.
  and kernel tables of 4 decoding steps of the 512-row arms (the static engine without its CUDA graph: the kernels
  the graph replays).
Writes <out>/profile.json after every arm (a run cut short keeps what finished), and the kernel tables as text.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import bench as B  # noqa: E402
import common as C  # noqa: E402

CUDA = torch.cuda.is_available()
CATEGORIES = [  # kernel name -> kind, first match wins (cuBLAS/CUTLASS GEMMs have many names)
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|Kernel2|splitK|addmm|^aten::mm|^aten::bmm|matmul|linear"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("copy/cast", r"copy|cast|CatArray|index|gather|scatter|fill|to_copy|_to"),
    ("reduce/norm", r"reduce|norm|cumsum|scan|sort|softmax|max|sum"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|silu|neg|rsqrt|pow|exp"),
    ("other", r"."),
]


class Report:
    """profile.json, rewritten after every arm."""

    def __init__(self, out: Path):
        self.out, self.data = out, {"machine": C.machine(), "train": {}, "pack": {}, "gen": {}, "profiles": {},
                                    "notes": []}

    def save(self):
        tmp = self.out / "profile.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.out / "profile.json")

    def arm(self, part: str, name: str, fn):
        """fn() -> the arm's figures, stored under data[part][name]; an error is stored instead, not raised."""
        try:
            self.data[part][name] = fn()
            print(f"{part}.{name}: {json.dumps(self.data[part][name])[:300]}", flush=True)
        except Exception as e:  # noqa: BLE001 - one lever failing must not lose the others
            self.data[part][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            traceback.print_exc()
        self.save()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None


def reset_peak():
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def kernel_table(prof, path: Path, top: int = 40) -> dict:
    """Device kernels by their own time (on a CPU: operators by own CPU time), written as a table to `path`; the
    share of each kind and the top 12 back."""
    rows = []
    for e in prof.key_averages():
        if CUDA:
            t = getattr(e, "self_device_time_total", 0) or 0
            if t and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                rows.append((t, e.count, e.key))
        elif e.self_cpu_time_total:
            rows.append((e.self_cpu_time_total, e.count, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1
    kinds: dict[str, float] = {}
    for t, _, key in rows:
        kind = next(k for k, rx in CATEGORIES if re.search(rx, key, re.I))
        kinds[kind] = kinds.get(kind, 0) + t
    path.write_text("".join(f"{100 * t / total:5.1f}%  {t / 1e3:9.2f} ms  x{n:<6d} {k[:150]}\n"
                            for t, n, k in rows[:top]))
    return {"device_ms" if CUDA else "cpu_ms": round(total / 1e3, 2), "kernels": sum(r[1] for r in rows),
            "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [f"{100 * t / total:.1f}% {k[:100]}" for t, _, k in rows[:12]]}


def profiler(wait: int, active: int):
    """A profiler recording steps wait + 1 .. wait + active (one warm-up step between), advanced by .step()."""
    from torch.profiler import ProfilerActivity, profile, schedule
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    return profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active, repeat=1))


# -- training ------------------------------------------------------------------------------------------------------
ARMS_TRAIN = {"autocast": {"autocast": "auto"}, "no_autocast": {"autocast": "never"},
              "packed": {"autocast": "auto", "pack_pairs": True},
              "compiled": {"autocast": "auto", "fused_kernels": "compile"},
              "liger": {"autocast": "auto", "fused_kernels": "liger"}}


def train_part(report: Report, size: str, repeats: int, steps: int):
    from spin_lite.train import train_adapter
    s = C.SIZES[size]
    # bf16 on a CPU too in the rehearsal, where `always` stands for auto: the autocast code path runs there as well
    quant = "bf16"
    # on a CPU: `always` stands for auto; compile with aot_eager (no C++ code generated); liger cannot run
    arms = ARMS_TRAIN if CUDA else {name: {**train, "autocast": {"auto": "always"}.get(train["autocast"],
                                                                                    train["autocast"])}
                                    for name, train in ARMS_TRAIN.items() if name != "liger"}
    if not CUDA:
        from spin_lite import kernels
        kernels.COMPILE_BACKEND = "aot_eager"
    if importlib.util.find_spec("liger_kernel") is None:
        arms.pop("liger", None)
        report.data["train"]["liger"] = {"status": "skipped: liger-kernel is not installed"}
    model = B.with_lora(B.load(size, quant))
    body = B.body_of(model)
    runs = 0

    def fit(setting: dict, n_steps: int, progress):
        nonlocal runs
        runs += 1
        out = C.WORK / f"profile-train-{os.getpid()}-{runs}"
        out.mkdir(parents=True, exist_ok=True)
        cfg = B.train_config(size, quant, s, out, train=setting)
        train_adapter(model, B.train_pairs(size, s, s.train_pairs * n_steps), cfg, 0, out, C.PAD, progress=progress)

    def timed(setting: dict) -> dict:
        reset_peak()
        clock = C.StepClock(body)
        try:
            fit(setting, 2 + steps, clock.tick)
        finally:
            clock.close()
        return clock.summary(warmup=2) | {"peak_gib": peak_gib()}

    measured: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, setting in arms.items():
            def one(name=name, setting=setting):
                measured[name].append(timed(setting))
                median = B.median_of(measured[name])
                # the pairs' tokens as two sequences each (what TRL counts), whatever the arm feeds its body: packed
                # rows hold fewer (the prompt once), so its own tokens/s understates the work a step does
                pair_tokens = 2 * s.train_pairs * (s.train_prompt + s.train_response)
                return median | {f"train.{k}": v for k, v in setting.items()} | {
                    "pair_tokens_per_s": pair_tokens / median["step_s_median"] if median.get("step_s_median") else None}
            report.arm("train", name, one)
    report.data["train"]["tokens_per_step"] = 2 * s.train_pairs * (s.train_prompt + s.train_response)
    for name, setting in arms.items():  # one step's kernels: the third of a 3-step fit
        def table(setting=setting, name=name):
            with profiler(wait=1, active=1) as prof:
                fit(setting, 3, lambda *a: prof.step())
            return kernel_table(prof, report.out / f"kernels_train_{name}.txt")
        report.data["profiles"][f"train_{name}"] = _try(table)
        report.save()


# -- the shared prompt once: scoring packed against apart -------------------------------------------------------------
def pack_part(report: Report, size: str, repeats: int, steps: int, flex: bool):
    """Forward + backward of the scorer alone (no optimizer) on the training step's pairs: the 2B sequences
    prompt + real and prompt + generated (`sequence_logprobs`, what fit does) against B packed rows
    [prompt | real | generated] (`packed_logprobs`: a dense sdpa mask; with --flex also flex_attention's BlockMask,
    which transformers compiles at its first call: first_s holds that). Tokens/s count the unpacked tokens on both,
    so the ratio is the time saved."""
    from spin_lite.logprobs import collate, mixed_precision, pack, packed_logprobs, sequence_logprobs
    s = C.SIZES[size]
    model = B.with_lora(B.load(size, "bf16"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = next(model.parameters()).device
    pairs = B.train_pairs(size, s, s.train_pairs)
    prompts = [p["prompt_ids"] for p in pairs]
    apart = collate(prompts + prompts, [p["real_ids"] for p in pairs] + [p["gen_ids"] for p in pairs], C.PAD)
    packed = pack(prompts, [[p["real_ids"], p["gen_ids"]] for p in pairs], C.PAD).to(device)
    apart = apart.to(device)
    tokens = apart.tokens
    setting = "auto" if CUDA else "always"
    arms = {"apart": lambda: sequence_logprobs(model, apart)[0],
            "packed_sdpa": lambda: packed_logprobs(model, packed)[0]}
    if flex:
        arms["packed_flex"] = "flex_attention"

    def step(fn):
        with mixed_precision(model, setting):
            loss = fn().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(fn) -> dict:
        reset_peak()
        C.sync()
        t0 = time.perf_counter()
        step(fn)
        C.sync()
        first = time.perf_counter() - t0
        step(fn)
        seconds = []
        for _ in range(steps):
            C.sync()
            t0 = time.perf_counter()
            step(fn)
            C.sync()
            seconds.append(time.perf_counter() - t0)
        seconds.sort()
        return {"tokens_per_s": tokens / seconds[len(seconds) // 2],
                "spread": [tokens / seconds[-1], tokens / seconds[0]],
                "first_s": round(first, 2), "peak_gib": peak_gib(), "unpacked_tokens": tokens,
                "packed_tokens": int((packed.document >= 0).sum())}

    measured: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, fn in arms.items():
            def one(name=name, fn=fn):
                if fn == "flex_attention":  # the same rows with transformers' flex attention (and its BlockMask)
                    model.set_attn_implementation("flex_attention")
                    try:
                        measured[name].append(timed(lambda: packed_logprobs(model, packed)[0]))
                    finally:
                        model.set_attn_implementation("sdpa")
                else:
                    measured[name].append(timed(fn))
                return B.median_of(measured[name])
            report.arm("pack", name, one)


# -- decoding -------------------------------------------------------------------------------------------------------
class _Stepped:
    """A Sampling whose choose/pick also advance a profiler: once a decoding step (and once after the prefill)."""

    def __init__(self, sampling, on_step):
        self.sampling, self.on_step = sampling, on_step

    def choose(self, scores, u):
        out = self.sampling.choose(scores, u)
        self.on_step()
        return out

    def uniforms(self, steps, device):
        return self.sampling.uniforms(steps, device)

    def pick(self, scores, rows, active):
        out = self.sampling.pick(scores, rows, active)
        self.on_step()
        return out


def gen_part(report: Report, size: str, repeats: int, new_tokens: int):
    from spin_lite import generate as G
    s = C.SIZES[size]
    quant = "bf16" if CUDA else "fp32"
    peft_model = B.with_lora(B.load(size, quant)).eval()
    C.sync()
    t0 = time.perf_counter()
    merged = G.merged_copy(peft_model) or peft_model
    C.sync()
    report.data["gen"]["merged_copy_s"] = round(time.perf_counter() - t0, 3)  # paid once per generate_all call
    small, big = (s.gen_batch, G.GPU_MAX_ROWS) if CUDA else (4, 16)
    prompts = B.prompts(size, big, s.prompt_len, spread=True)
    device = next(merged.parameters()).device
    capacity = G.rows_per_pass(merged, s.prompt_len, new_tokens, 16) if CUDA else G.CPU_ROWS
    report.data["engine_for"] = {
        "rows_in_pass": small, "room_for_rows": capacity, "now": G.engine_for("auto", merged, small),
        "before_the_fix": G.engine_for("auto", merged, capacity), "static_max_rows": G.STATIC_MAX_ROWS}
    report.data["gen"]["prompt_tokens_mean"] = sum(map(len, prompts)) / len(prompts)

    def sampling(rows: int):
        owners = [i // s.gen_batch for i in range(rows)]
        return G.Sampling(True, 1.0, 1.0, owners, [G._generator(1000 + o, device) for o in range(max(owners) + 1)])

    def decode(engine: str, attention: str, rows: int, new: int, pick=None, graphs=None) -> float:
        bucket = 0 if attention == "flat" else None  # gqa without length buckets (every slot), else the default
        """tokens/s of one decode of `rows` prompts, `new` tokens each (no stop id: full length)."""
        pick = pick or sampling(rows)
        if engine != "static" and isinstance(pick, _Stepped):
            pick = pick.pick  # the eager engine takes a function (or a Sampling)
        ended = []
        C.sync()
        t0 = time.perf_counter()
        if engine == "static":
            G.decode_static(merged, prompts[:rows], [], C.PAD, new, pick, lambda *a: ended.append(1), graphs=graphs,
                            attention="auto" if attention in ("auto", "flat") else attention, bucket=bucket)
        else:
            G.decode(merged, prompts[:rows], [], C.PAD, new, pick, lambda *a: ended.append(1))
        C.sync()
        assert len(ended) == rows
        return rows * new / (time.perf_counter() - t0)

    arms = {f"{engine}_{rows}": (engine.split("_")[0], engine.split("_")[-1], rows)
            for rows in (small, big) for engine in ("static_gqa", "static_flat", "static_sdpa", "eager")}
    setting = lambda attention: {"gqa": "auto", "flat": "flat"}.get(attention, "sdpa")  # noqa: E731
    for engine, attention, rows in arms.values():  # warm-up at the measured rows
        decode(engine, setting(attention), rows, 8)
    measured: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, (engine, attention, rows) in arms.items():
            def one(name=name, engine=engine, attention=attention, rows=rows):
                reset_peak()
                tps = decode(engine, setting(attention), rows, new_tokens)
                measured[name].append({"tokens_per_s": tps, "rows": rows, "new_tokens": new_tokens,
                                       "peak_gib": peak_gib()})
                return B.median_of(measured[name])
            report.arm("gen", name, one)
    for name, (engine, attention, rows) in arms.items():
        if rows != big:
            continue

        def table(name=name, engine=engine, attention=attention, rows=rows):
            with profiler(wait=3, active=4) as prof:  # steps: the prefill's token, 2 steps, 1 warm-up, 4 recorded
                decode(engine, setting(attention), rows, 10, _Stepped(sampling(rows), prof.step),
                       graphs=False)
            return kernel_table(prof, report.out / f"kernels_gen_{name}.txt")
        report.data["profiles"][f"gen_{name}"] = _try(table)
        report.save()


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


# -- set-up ---------------------------------------------------------------------------------------------------------
def calibrate(report: Report):
    """The card's bf16 matmul rate and copy bandwidth, to read the figures against."""
    if not CUDA:
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    C.sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    C.sync()
    report.data["bf16_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    C.sync()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    C.sync()
    report.data["copy_tb_per_s"] = round(5 * 2 * x.numel() / (time.perf_counter() - t0) / 1e12, 2)
    del a, b, x, y
    reset_peak()


def environment(report: Report):
    import importlib
    import importlib.metadata
    env = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger_kernel"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[name] = importlib.metadata.version(name.replace("_", "-"))
    import transformers.integrations.sdpa_attention as sdpa
    # transformers' own sdpa packs the grouped heads of a one-token query itself from 5.2x on: then the GQA arms
    # compare two equal paths
    env["transformers_packs_gqa"] = hasattr(sdpa, "pack_gqa")
    if CUDA:
        env["gpu"] = torch.cuda.get_device_name()
        env["sdpa_backends"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                for k in ("flash", "mem_efficient", "math", "cudnn")
                                if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
    report.data["environment"] = env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b" if CUDA else "tiny", choices=list(C.SIZES))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_profile"))
    parser.add_argument("--parts", nargs="*", default=["train", "pack", "gen"], choices=["train", "pack", "gen"])
    parser.add_argument("--flex", action="store_true", help="also score packed rows with flex_attention (compiles)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of each arm (the median kept)")
    parser.add_argument("--steps", type=int, default=5, help="measured training steps a run (after 2 warm-up)")
    parser.add_argument("--new", type=int, default=None, help="new tokens a decoding arm (default: the size's)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    began = time.perf_counter()
    environment(report)
    calibrate(report)
    C.model_dir(args.size)
    report.data["setup_s"] = round(time.perf_counter() - began, 1)
    report.save()
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            if part == "train":
                train_part(report, args.size, args.repeats, args.steps)
            elif part == "pack":
                pack_part(report, args.size, args.repeats, args.steps, args.flex)
            else:
                gen_part(report, args.size, args.repeats, args.new or C.SIZES[args.size].new_tokens)
        except Exception as e:  # noqa: BLE001 - the other part still runs
            report.data[part]["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        report.data[f"{part}_s"] = round(time.perf_counter() - t0, 1)
        reset_peak()
        report.save()
    report.data["total_s"] = round(time.perf_counter() - began, 1)
    report.save()
    failed = [f"{p}.{k}" for p in ("train", "pack", "gen") for k, v in report.data[p].items()
              if isinstance(v, dict) and "error" in v]
    failed += [p for p in ("train", "pack", "gen") if "error" in report.data[p]]
    print(f"profile: {report.data['total_s']} s; wrote {out / 'profile.json'}"
          + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
