"""Everything that needs a GPU, in one prepared run: a profile of where a training step's and a decoding step's time
goes with A/B timings of each speed lever, the gpu tests, the Unsloth backend, the nf4 training step, then (budget
allowing, or with --only) the benchmarks against the peers and the 8B memory phases; one table, one JSON file.

    bash bench/gpu_check.sh .whl             # on the GPU machine: installs the wheels, then runs this (6 minutes)
    make gpu-check ARGS=--tiny               # anywhere: the same steps at a tiny size (a rehearsal, a few minutes
                                             # on 2 CPU cores), the CUDA-only ones skipped with a line
    bash bench/gpu_check.sh .whl --only bench.train bench.gen bench.iter --budget 420   # what the first call left

Steps run in the order below (what matters most first), each in a fresh process group. One starts only if the
time spent so far plus its estimate fits the budget (default 420 s: profile, tests, then unsloth and bench.nf4, so that
the check fits one device call of 8 minutes with the install, and a second call still fits a 15-minute lease); a
step that does not fit is listed as skipped (budget) and `--only` runs it later. A step past its time is killed
with every process it started (the GPU is free for the next). Every step but `unsloth` runs without unsloth on its
path, so model.backend=auto means hf there.
The results go to bench/results/<gpu>.json (merged with an earlier check's file there: a step run again replaces
its entry) and, where $OUT is set (the device machine), to $OUT with the log and the profile's kernel tables,
rewritten after EVERY step (the profile rewrites its own file after every arm), so a call stopped by its time limit
still returns what finished.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "unsloth",
            "unsloth_zoo")


@dataclass
class Step:
    name: str
    what: str
    estimate_s: int           # on an H100 at the full sizes (a guess until the first run: see the JSON)
    cuda_only: bool = False   # skipped (with a line) where there is no CUDA...
    rehearsed: bool = False   # ...except with --tiny, where its code runs on a CPU too


# Estimates: seconds on an H200 at the full sizes. Measured there on 2026-12-04 (bench/results/nvidia-h200.json) where a
# step ran: tests 62, bench.gen 134 (one lengths case), bench.train 79, unsloth 89 (failed at its first decoding step:
# a passing run is longer), bench.iter 122, memory.8b 109; the others are reckoned from those (model load and process
# start about 20 s a process) and are guesses until they run.
STEPS = [
    Step("profile", "kernel tables of a training step and of decoding steps; A/B of each lever (train.autocast, "
         "generation.decode_attention, the engines at 64 and 512 rows: engine_for's fix, scoring with the prompt packed "
         "once, fused kernels: compile and liger, length buckets)", 300),
    Step("tests", "pytest -m gpu tests/test_gpu.py (4-bit runs with autocast, resume after SIGKILL, the static "
         "engine's CUDA graph with the grouped decode attention)", 65),
    Step("unsloth", "the Unsloth backend end to end: greedy tokens against hf on one adapter, a whole iteration",
         100, cuda_only=True),
    Step("bench.nf4", "a training step on the nf4 base against TRL's", 90, cuda_only=True),
    Step("bench.train", "a SPIN training step against TRL DPOTrainer, bf16, equal and spread lengths", 160),
    Step("bench.gen", "generation: the peer, spin_lite static and eager engines, bf16 1B shape, equal and spread "
         "prompt lengths", 270),
    Step("bench.iter", "a whole iteration against generate + DPOTrainer, bf16, time and memory per phase", 125),
    Step("bench.nf4.gen", "generation on the nf4 base (the peer unmerged in 4 bits)", 110, cuda_only=True),
    Step("bench.levers", "transformers generate on the merged copy, dynamic and static (compiled) cache", 70,
         cuda_only=True),
    Step("memory.8b", "an 8B-shape model in nf4, phase by phase, capped at 24 GiB (measured 2026-12-04: fits)", 110,
         cuda_only=True, rehearsed=True),
]
DEFAULT_BUDGET_S = 420  # 7 minutes: the profile and the tests, then as far as it goes; the rest with --only later


def command(step: Step, tiny: bool, work: Path) -> list[str] | None:
    """The step's command line (None: run in this process, or not runnable here)."""
    py = sys.executable
    size = "tiny" if tiny else "1b"
    quant = "bf16" if torch.cuda.is_available() else "fp32"
    # one run a case (--repeats 1): training medians over its measured steps, generation over 3 alternated runs
    bench = [py, str(HERE / "bench.py"), "--size", size, "--repeats", "1"]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py")]
    return {
        "tests": pytest + ["-m", "gpu", "-k", "not unsloth"],  # (unsloth is not on this step's path anyway)
        "unsloth": pytest + ["-m", "gpu", "-k", "unsloth"],
        "profile": [py, str(HERE / "gpu_profile.py"), "--size", size, "--out", str(work / "profile")],
        "bench.gen": bench + ["--quant", quant, "--only", "gen", "--lengths", "equal", "spread",
                              "--out", str(work / "bench.gen.json")],
        "bench.train": bench + ["--quant", quant, "--only", "train.ours", "train.trl", "--lengths", "equal", "spread",
                                "--out", str(work / "bench.train.json")],
        "bench.iter": bench + ["--quant", quant, "--only", "iter.ours", "iter.peer", "--lengths", "equal",
                               "--out", str(work / "bench.iter.json")],
        "bench.nf4": bench + ["--quant", "nf4", "--only", "train.ours", "train.trl", "--lengths", "equal",
                              "--out", str(work / "bench.nf4.json")],
        "bench.nf4.gen": bench + ["--quant", "nf4", "--only", "gen", "--lengths", "equal",
                                  "--out", str(work / "bench.nf4.gen.json")],
        "bench.levers": bench + ["--quant", quant, "--only", "lever.gen.hf_merged_dynamic",
                                 "lever.gen.hf_merged_static", "--out", str(work / "bench.levers.json")],
        "memory.8b": [py, str(HERE / "memory_8b.py"), "--size", "tiny" if tiny else "8b",
                      "--out", str(work / "memory.8b.json")] + ([] if torch.cuda.is_available() else ["--prompts", "4"]),
    }[step.name]


def step_env(step: Step) -> dict:
    """The step's environment: unsloth on the path of the unsloth step alone (gpu_check.sh stages it apart)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the machine's own pytest plugins stay out
    site = os.environ.get("SPIN_LITE_UNSLOTH_SITE")
    if step.name == "unsloth" and site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    return env


def unsloth_importable(env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('unsloth') is not None)"],
                           env=env, capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def run_step(step: Step, tiny: bool, work: Path, timeout: float, log) -> dict:
    """Run one step in a fresh process group; {status, seconds, summary, data}. Its output goes to the log."""
    env = step_env(step)
    if step.name == "unsloth" and not unsloth_importable(env):
        return {"status": "skipped", "summary": "unsloth is not importable (give gpu_check.sh the .whl folder)"}
    cmd = command(step, tiny, work)
    began = time.perf_counter()
    log.write(f"\n===== {step.name}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # (it may have ended just now)
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started (bench cases, CLI runs)
        output, _ = proc.communicate()
        code = "timeout"
    log.write(output or "")
    log.flush()
    seconds = round(time.perf_counter() - began, 1)
    out = {"seconds": seconds, "command": " ".join(cmd), "tail": output[-1500:]}
    if code == "timeout":
        return out | {"status": "failed", "summary": f"timed out after {timeout:.0f} s"}
    if step.name in ("tests", "unsloth"):
        counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", output)
        summary = ", ".join(f"{n} {w}" for n, w in counts) or (output.strip().splitlines() or [""])[-1]
        counts = {w: int(n) for n, w in counts}
        ran = counts.get("passed", 0) > 0 or not torch.cuda.is_available()  # on a GPU, all skipped is a failure
        return out | {"status": "passed" if code == 0 and ran else "failed", "summary": summary, "counts": counts}
    path = work / ("profile/profile.json" if step.name == "profile" else f"{step.name}.json")
    if step.name == "profile" and path.exists():  # its arms' errors are in the file; a failed arm fails the step
        data = json.loads(path.read_text())
        failed = [f"{part}.{k}" for part in ("train", "pack", "gen") for k, v in data.get(part, {}).items()
                  if isinstance(v, dict) and "error" in v]
        return out | {"status": "failed" if code != 0 or failed else "passed", "data": data,
                      "summary": f"failed: {', '.join(failed)}" if failed else ("ok" if code == 0 else f"exit {code}")}
    if code != 0 or not path.exists():
        return out | {"status": "failed", "summary": f"exit {code}: " + output.strip()[-300:]}
    data = json.loads(path.read_text())
    errors = [c["comparison"] for c in data.get("comparisons", []) if "error" in c]
    if data.get("out_of_memory"):
        errors.append("out of memory")
    return out | {"status": "failed" if errors else "passed", "data": data,
                  "summary": f"failed: {', '.join(errors)}" if errors else "ok"}


def table_rows(steps: dict) -> list[list[str]]:
    """One row a figure: step, item, result, target, met."""
    rows = []
    for name, r in steps.items():
        data = r.get("data") or {}
        if r.get("status") != "passed" or not data:
            rows.append([name, "", r.get("status", "?") + (f": {r['summary']}" if r.get("summary") else ""), "", ""])
            continue
        for c in data.get("comparisons", []):
            unit = " tok/s" if c["metric"] == "tokens_per_s" else " s"
            target = " ".join(filter(None, [f">= {c['target_ratio']}x" if c.get("target_ratio") else "",
                                            f">= {c['target_tokens_per_s']:,} tok/s" if c.get("target_tokens_per_s")
                                            else ""]))
            met = {True: "yes", False: "NO", None: ""}[c.get("meets_target")]
            rows.append([name, f"{c['comparison']} ({c['quant']}{', spread' if c.get('lengths') == 'spread' else ''})",
                         f"{c['ours']:,.1f}{unit} vs {c['peer']:,.1f}{unit} = {c['ratio']:.2f}x; "
                         f"{c['ours_peak_gib']:.2f} vs {c['peer_peak_gib']:.2f} GiB", target, met])
        for key, cases in (data.get("cases") or {}).items():  # the iteration's phases on both sides
            for case, v in sorted(cases.items()):
                if v.get("phases"):
                    rows.append([name, f"{case} phases ({key})", "; ".join(
                        f"{ph} {x['seconds']:.1f} s {x['peak_gib']:.2f} GiB" for ph, x in v["phases"].items()), "", ""])
        for key, cases in (data.get("cases") or {}).items():  # the levers have no peer row
            for case, v in sorted(cases.items()):
                if case.startswith("lever.") and "tokens_per_s" in v:
                    rows.append([name, f"{case} ({key})", f"{v['tokens_per_s']:,.1f} tok/s, {v['peak_gib']:.2f} GiB",
                                 "", ""])
        for part in ("train", "pack", "gen"):  # the profile's A/B arms
            for arm, v in sorted((data.get(part) or {}).items()):
                if isinstance(v, dict) and "tokens_per_s" in v:
                    spread = v.get("spread") or [v["tokens_per_s"]] * 2
                    memory = f", {v['peak_gib']:.2f} GiB" if v.get("peak_gib") is not None else ""
                    rows.append([name, f"{part}.{arm}", f"{v['tokens_per_s']:,.0f} tok/s ({spread[0]:,.0f}-"
                                 f"{spread[1]:,.0f}){memory}", "", ""])
        if data.get("engine_for"):
            e = data["engine_for"]
            rows.append([name, "engine_for auto", f"{e['rows_in_pass']} rows in a pass (room for {e['room_for_rows']}):"
                         f" {e['now']}; before the fix {e['before_the_fix']}", "", ""])
        for phase, v in (data.get("phases") or {}).items():
            cap = data.get("cap_gib")  # None on a CPU rehearsal
            item = f"{phase} ({data.get('generated_from', '')}, {data.get('engine', '')} engine)" \
                if phase == "generate" else phase
            rows.append([name, item, f"{v['peak_reserved_gib']:.2f} GiB reserved, {v['peak_allocated_gib']:.2f} "
                         f"allocated, {v['seconds']} s", f"<= {cap} GiB" if cap else "",
                         ("yes" if v["peak_reserved_gib"] <= cap else "NO") if cap else ""])
    return rows


def print_table(report: dict):
    head = ["step", "item", "result", "target", "met"]
    rows = [head] + table_rows(report["steps"])
    widths = [min(max(len(r[i]) for r in rows), 90) for i in range(len(head))]
    print(f"\ngpu-check on {report['machine']} ({report['date']}, {report['mode']}): "
          f"{sum(r.get('seconds', 0) for r in report['steps'].values()):.0f} s in steps")
    for n, r in enumerate(rows):
        print(" | ".join(v[:90].ljust(w) for v, w in zip(r, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def environment() -> dict:
    env = {"python": sys.version.split()[0], "cuda": torch.cuda.is_available(), "packages": {}}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                "bf16": torch.cuda.is_bf16_supported(), "torch_cuda": torch.version.cuda}
    return env


def save(report: dict, path: Path, work: Path, results: Path | None):
    """The report as it stands, to `path` and (on the device machine) to $OUT with the log: after every step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic = path.with_suffix(".json.tmp")
    atomic.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(atomic, path)
    if results:
        results.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, results / path.name)
        shutil.copy(work / "gpu_check.log", results / "gpu_check.log")
        if (work / "profile").is_dir():  # the kernel tables
            shutil.copytree(work / "profile", results / "profile", dirs_exist_ok=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the same steps at a tiny size (a rehearsal)")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in STEPS], help="run only these steps")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all steps (default: {DEFAULT_BUDGET_S} on a GPU at full size, no limit "
                             "with --tiny)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    budget = args.budget or (1e9 if args.tiny else float(DEFAULT_BUDGET_S))
    work = C.WORK / ("gpu-check-tiny" if args.tiny else "gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = C.machine()
    results = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    path = (work / f"{machine}-tiny.json") if args.tiny else HERE / "results" / f"{machine}.json"
    report = {"machine": machine, "date": datetime.date.today().isoformat(), "mode": "tiny" if args.tiny else "full",
              "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]), "budget_s": budget,
              "environment": environment(), "steps": {}}
    if path.exists() and not args.tiny:  # an earlier check on this machine: keep the steps not run again
        report["steps"] = json.loads(path.read_text()).get("steps", {})
    print(f"gpu-check: {machine}, {'tiny' if args.tiny else 'full'} sizes, budget {budget:.0f} s; "
          f"packages {report['environment']['packages']}", flush=True)
    began = time.perf_counter()
    with open(work / "gpu_check.log", "w") as log:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            spent = time.perf_counter() - began
            if step.cuda_only and not cuda and not (args.tiny and step.rehearsed):
                result = {"status": "skipped", "summary": "needs CUDA"}
            elif spent + (0 if args.tiny else step.estimate_s) > budget:
                result = {"status": "skipped", "summary": f"budget: {spent:.0f} s spent, {step.estimate_s} s estimated"}
            else:
                print(f"[{spent:5.0f} s] {step.name}: {step.what}{' (at the tiny size)' if args.tiny else ''}",
                      flush=True)
                # past the budget by at most a minute: the device call's own limit must not cut the JSON
                timeout = min(max(budget - spent, step.estimate_s) + 20, 1800)
                result = run_step(step, args.tiny, work, timeout, log)
            earlier = report["steps"].get(step.name, {})
            if result["status"] == "skipped" and earlier.get("status") in ("passed", "failed"):
                result = earlier  # a step skipped now keeps what an earlier check on this machine measured
            else:
                result = result | {"ran_at": datetime.datetime.now().isoformat(timespec="seconds")}
            report["steps"][step.name] = result
            print(f"        {step.name}: {result['status']} ({result.get('seconds', 0)} s) {result.get('summary', '')}",
                  flush=True)
            report["seconds"] = round(time.perf_counter() - began, 1)
            save(report, path, work, results)
    print_table(report)
    print(f"wrote {path}" + (f" (and a copy with gpu_check.log in {results})" if results else ""))
    failed = [n for n, r in report["steps"].items() if r["status"] == "failed"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
