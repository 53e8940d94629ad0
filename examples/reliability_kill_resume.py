"""Kill a run in each of its stages (SIGKILL), run the same command again, and compare with an uninterrupted run.

    OMP_NUM_THREADS=1 nice -n 19 python examples/reliability_kill_resume.py     # 20 trials, writes docs/RELIABILITY.md
    python examples/reliability_kill_resume.py --trial "iter 0 train" --out /tmp/r.md

A tiny random Llama (2 layers, the embedded model's tokenizer and chat template) runs the whole pipeline in one run:
an SFT stage (sft/), 2 SPIN iterations of 24 training prompts, and the control arm (control-NN/). One reference run
goes through uninterrupted. Each trial starts the same run in a fresh directory and kills its process group when
the run reaches the trial's target stage, read from progress.json (stage, iteration, units done: RunDir.read_progress)
and state.json (which part of the run that stage belongs to), polled every few milliseconds: `iter 0 train` is
killed the first time progress.json shows optimizer steps done in iteration 0's training, not at a moment on the
clock. Set-up writes no progress; its kill is the SPIN_LITE_KILL_AT=set_up:1 hook at its end (the directory locked,
config.yaml written). Then the same command runs again until it finishes (a trial of two targets is killed again
in the resumed run). A trial passes when every file of the run equals the reference's: adapters bit-identical (SFT,
iterations, controls), samples, evaluations and summaries equal (wall times aside), the same pairs with the same
log-probs, every generation and optimizer step once, with the same losses.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "data" / "demo_sft.jsonl"


def make_tiny_model(path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_lite.config import ModelConfig
    from spin_lite.model import embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=str(embedded_model_dir())))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def command(model: Path, run_dir: Path) -> list[str]:
    # small batches and a checkpoint every 2 optimizer steps: each stage writes progress.json several times, and a
    # kill in training lands after a checkpoint as often as before one
    settings = {"run_dir": run_dir, "iterations": 2, "model.name": model, "data.path": DEMO,
                "data.max_examples": 24, "data.eval_size": 4, "data.val_size": 4, "train.stop_when": "never",
                "data.max_prompt_length": 96, "data.max_length": 160, "generation.max_new_tokens": 12,
                "generation.batch_size": 2, "train.epochs": 1, "train.micro_batch_size": 1,
                "train.gradient_accumulation_steps": 2, "train.learning_rate": 1e-2, "train.save_every": 2,
                "eval.max_new_tokens": 8, "sft.enabled": "true", "sft.steps": 12, "sft.control": "true"}
    return [sys.executable, "-m", "spin_lite", "run", *(f"{k}={v}" for k, v in settings.items())]


SOURCE = REPO  # the spin_lite every run imports: main() points it at a copy, so edits made meanwhile do not count
POLL_S = 0.005  # the stages of this tiny run last 0.2-2 s; progress.json is rewritten at most twice a second
RUN_LIMIT_S = 900  # a run that takes longer has hung


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (each file is replaced atomically: never half of one)
        return {}


def snapshot(run_dir: Path, since: float) -> dict:
    """Where the run is: state.json's iteration and stage (which part of the run), progress.json's stage, iteration,
    done and total, each only if written after `since` (by this process, not by one killed before), and the
    folders complete so far (their summary.json written)."""
    state, progress = (read(run_dir / name) for name in ("state.json", "progress.json"))
    state = state if state.get("updated", 0) >= since else {}
    progress = progress if progress.get("updated", 0) >= since else {}
    return {"iteration": state.get("iteration"), "stage": state.get("stage"),
            "p_iteration": progress.get("iteration"), "p_stage": progress.get("stage"),
            "done": progress.get("done") or 0, "total": progress.get("total"),
            "complete": sorted(p.parent.name for p in run_dir.glob("*/summary.json"))}


def working(p_stage: str, p_iteration: int | None, stage: str):
    """The target "units done in progress stage `p_stage` of `p_iteration`, within the run's `stage`": state.json
    tells an iteration's evaluation from a control's, which progress.json names alike."""
    return lambda s: (s["p_stage"], s["p_iteration"], s["stage"]) == (p_stage, p_iteration, stage) and s["done"] > 0


def entered(p_stage: str, p_iteration: int | None, stage: str):
    """As `working`, from the moment progress.json shows the stage at all (0 units done too): an evaluation's few rows
    can pass between two polls, so "units done" may never be seen there."""
    return lambda s: (s["p_stage"], s["p_iteration"], s["stage"]) == (p_stage, p_iteration, stage)


TARGETS = {
    "set-up": None,  # no progress.json yet: the SPIN_LITE_KILL_AT=set_up:1 hook, at the end of set-up
    "evaluate base": working("evaluate val", None, "evaluate base"),  # the model before the SFT stage
    "sft": working("sft", None, "sft"),
    "evaluate start": working("evaluate val", None, "evaluate start"),
    "iter 0 generate": working("generate", 0, "generate"),
    "iter 0 score": working("score", 0, "generate"),  # scoring is the last part of the generate stage
    "iter 0 train": working("train", 0, "train"),
    "iter 0 evaluate": entered("evaluate val", 0, "evaluate"),
    "iter 0 evaluate test": working("evaluate test", 0, "evaluate"),
    # iteration 0 complete (its summary.json written) and nothing of what follows it begun: progress.json still
    # shows iteration 0's last evaluation
    "between iterations": lambda s: ("iter-00" in s["complete"] and "control-00" not in s["complete"]
                                     and (s["p_stage"], s["p_iteration"]) == ("evaluate test", 0)
                                     and s["stage"] != "control evaluate"),
    "control 0 train": working("control train", 0, "control train"),
    "control 0 evaluate": working("evaluate val", 0, "control evaluate"),
    "control 0 evaluate test": working("evaluate test", 0, "control evaluate"),
    "iter 1 generate": working("generate", 1, "generate"),
    "iter 1 score": working("score", 1, "generate"),
    "iter 1 train": working("train", 1, "train"),
    "iter 1 evaluate val": entered("evaluate val", 1, "evaluate"),
    "iter 1 evaluate": working("evaluate test", 1, "evaluate"),
    "control 1 train": working("control train", 1, "control train"),
    "control 1 evaluate": entered("evaluate val", 1, "control evaluate"),
}
TRIALS = [[name] for name in TARGETS if name != "iter 1 generate"] + [["iter 1 generate", "iter 1 evaluate"]]


def run(cmd: list[str], run_dir: Path, target: str | None = None) -> tuple[int, dict | None]:
    """Run `cmd` to its end or, with a target, SIGKILL its process group once the run reaches it. The exit code,
    and where the kill landed (the snapshot at that moment), or None where the run ended first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SOURCE)}
    if target == "set-up":
        env["SPIN_LITE_KILL_AT"] = "set_up:1"
    since, reached = time.time(), TARGETS.get(target)
    proc = subprocess.Popen(cmd, cwd=SOURCE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None:
        s = snapshot(run_dir, since) if reached else None
        if (s and reached(s)) or time.time() - since > RUN_LIMIT_S:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode, s
        time.sleep(POLL_S)
    if target == "set-up" and proc.returncode == -signal.SIGKILL:
        return proc.returncode, snapshot(run_dir, since)
    return proc.returncode, None


def landed(s: dict, run_dir: Path) -> str:
    """Where a kill landed, in words: the run's stage, the progress shown, and what the stage's folder held."""
    if s["stage"] is None:
        return f"set-up (on disk: {', '.join(sorted(p.name for p in run_dir.iterdir()))}; no state.json)"
    part = (f"iteration {s['iteration']} " if s["iteration"] is not None else "") + s["stage"]
    shown = f"{s['p_stage']} {s['done']}/{s['total']}" if s["p_stage"] else "none yet"
    folder = ("sft" if s["iteration"] is None else f"control-{s['iteration']:02d}" if "control" in s["stage"]
              else f"iter-{s['iteration']:02d}")
    held = sorted(p.name for p in (run_dir / folder).iterdir()) if (run_dir / folder).is_dir() else []
    return f"{part}; progress.json: {shown}; {folder}/ held: {', '.join(held) or 'nothing'}"


IGNORED = {".lock", "state.json", "progress.json"}  # the lock, and where the run was last: for display only
TIMING = {"wall_s", "tokens_per_s"}  # measured, not computed: they differ between any two runs


def comparable(value):
    """`value` without its timing fields, at any depth; PEFT's target_modules (a set, written in hash order) sorted."""
    if isinstance(value, dict):
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else comparable(v)
                for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def first_difference(a, b, path: str = "") -> str:
    """The first place where two JSON values differ, e.g. `val.logp_per_token: -2.1 != -2.3`."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "(absent)") != b.get(key, "(absent)"):
                return first_difference(a.get(key, "(absent)"), b.get(key, "(absent)"), f"{path}.{key}".lstrip("."))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        k = next(k for k in range(len(a)) if a[k] != b[k])
        return first_difference(a[k], b[k], f"{path}[{k}]")
    return f"{path or 'the value'}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compare_file(a: Path, b: Path, notes: list[str]) -> str | None:
    """What differs between a reference file and the resumed run's (None: nothing that matters). Text is compared
    with each run's own directory written RUN_DIR (config.yaml and the summaries name it)."""
    if a.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        ref, got = load_file(a), load_file(b)
        if ref.keys() != got.keys():
            return "other tensors"
        unequal = [k for k in ref if not torch.equal(ref[k], got[k])]
        return f"{len(unequal)} of {len(ref)} tensors differ (first: {unequal[0]})" if unequal else None
    if a.name in ("pairs.jsonl", "generations.jsonl"):  # by key: each once, with the same content
        ref, got = jsonl(a), jsonl(b)
        by_key = lambda rows: {(r.get("split"), r["key"]): r for r in rows}
        if len(got) != len(by_key(got)) or by_key(ref).keys() != by_key(got).keys():
            return f"{len(got)} lines for {len(by_key(got))} keys; the reference has {len(ref)} keys"
        if by_key(ref) != by_key(got):
            key = next(k for k in by_key(ref) if by_key(ref)[k] != by_key(got)[k])
            return f"key {key[1]}: {first_difference(by_key(ref)[key], by_key(got)[key])}"
        if ref != got:  # the same lines in another order: no result changes (training reads pairs by split)
            notes.append(f"{a.parent.name}/{a.name} lists the same lines in another order")
        return None
    if a.name == "train_log.jsonl":  # one line per optimizer step, each once, with the same loss and metrics
        ref, got = comparable(jsonl(a)), comparable(jsonl(b))
        if [r["step"] for r in got] != [r["step"] for r in ref]:
            return f"steps {[r['step'] for r in got]}, the reference's {[r['step'] for r in ref]}"
        return None if ref == got else first_difference(ref, got)
    ref, got = (text(path) for path in (a, b))
    if a.suffix == ".json":
        ref, got = comparable(json.loads(ref)), comparable(json.loads(got))
        return None if ref == got else first_difference(ref, got)
    if ref != got:
        line = next(k for k, (x, y) in enumerate(zip(ref.splitlines() + [""], got.splitlines() + [""])) if x != y)
        return f"line {line + 1} differs"
    return None


def text(path: Path) -> str:
    """A run's text file with the run's own directory (the folder above sft/, iter-NN/, ...) written RUN_DIR."""
    root = next(p for p in path.parents if (p / "config.yaml").exists())
    return path.read_text().replace(str(root), "RUN_DIR")


def differences(reference: Path, got: Path, notes: list[str]) -> list[str]:
    """What differs between two finished run directories (empty: identical in every result): every file of the
    reference is compared (compare_file); a file only the resumed run has is noted (a temporary left by a kill)."""
    files = lambda root: {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in IGNORED}
    ref_files, got_files = files(reference), files(got)
    problems = [f"{name}: missing" for name in sorted(ref_files - got_files)]
    notes += [f"{name}: left over" for name in sorted(got_files - ref_files)]
    for name in sorted(ref_files & got_files):
        problem = compare_file(reference / name, got / name, notes)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def trial(model: Path, run_dir: Path, targets: list[str]) -> tuple[list[str], int, int]:
    """Kill the run at each target in turn, then run it to its end. A target the run ended before reaching (it
    moved too fast for the poll) starts the trial afresh, 3 times at most. (where each kill landed, the runs it
    took to finish after the last kill, the last exit code)"""
    for _attempt in range(3):
        kills = []
        for target in targets:
            _, s = run(command(model, run_dir), run_dir, target)
            kills.append(f"{target}: " + (landed(s, run_dir) if s else "MISSED (the run finished first)"))
            if s is None:
                break
        if all("MISSED" not in k for k in kills):
            break
        shutil.rmtree(run_dir)
    resumes, code = 0, 0
    while resumes < 3 and (resumes == 0 or code != 0):
        resumes += 1
        code, _ = run(command(model, run_dir), run_dir)
    return kills, resumes, code


def tally(rows: list[tuple]) -> dict[str, int]:
    """Counts of the trials (rows: trial, kills, runs to finish, problems): identical (every file equals the
    reference's; notes aside), differing, and, apart from both, those with a target not reached (the run ended
    before the poll saw it: no kill there, so nothing of that target's resume was tested)."""
    identical = sum(all(p.startswith("(note)") for p in problems) for _, _, _, problems in rows)
    missed = sum(any("MISSED" in k for k in kills) for _, kills, _, _ in rows)
    return {"trials": len(rows), "identical": identical, "differing": len(rows) - identical, "missed": missed}


def summary_line(counts: dict[str, int]) -> str:
    """E.g. "13 of 13 trials identical, 0 differing; 1 with a target not reached (the run finished before the kill:
    that target's resume untested)"."""
    return (f"{counts['identical']} of {counts['trials']} trials identical, {counts['differing']} differing"
            + (f"; {counts['missed']} with a target not reached (the run finished before the kill: that target's "
               "resume untested)" if counts["missed"] else "; every target reached"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial", action="append", choices=list(TARGETS),
                        help="run only the trial aimed at this target (repeatable); default: every trial")
    parser.add_argument("--out", default=str(REPO / "docs" / "RELIABILITY.md"))
    args = parser.parse_args(argv)
    trials = [t for t in TRIALS if not args.trial or t[0] in args.trial]
    began = time.time()
    global SOURCE
    work = Path(tempfile.mkdtemp(prefix="spin-kill-"))
    SOURCE = work / "src"  # one frozen copy of the package for the reference and every trial
    shutil.copytree(REPO / "spin_lite", SOURCE / "spin_lite", ignore=shutil.ignore_patterns("__pycache__"))
    model = make_tiny_model(work / "tiny")
    start = time.time()
    code, _ = run(command(model, work / "reference"), work / "reference")
    assert code == 0, "the reference run failed"
    print(f"reference run: {time.time() - start:.1f} s", flush=True)

    rows = []
    for n, targets in enumerate(trials):
        run_dir = work / f"trial-{n:02d}"
        kills, resumes, code = trial(model, run_dir, targets)
        notes = []
        problems = differences(work / "reference", run_dir, notes) if code == 0 else [f"exit code {code}"]
        rows.append((n, kills, resumes, problems + [f"(note) {x}" for x in notes]))
        print(f"trial {n}: {kills}; {resumes} run(s) to finish; {problems or 'identical'} {notes or ''}", flush=True)

    counts = tally(rows)
    lines = [
        "# Kill and resume: SIGKILL in every stage",
        "",
        f"`OMP_NUM_THREADS=1 nice -n 19 python examples/reliability_kill_resume.py` ({time.time() - began:.0f} s on "
        f"this machine, the reference run included; {os.cpu_count()} CPUs, shared).",
        "",
        "A tiny random Llama (2 layers, the embedded model's tokenizer) runs the whole pipeline: an SFT stage of 12 "
        "steps, 2 SPIN iterations of 24 training prompts (generation batches of 2, a checkpoint every 2 optimizer "
        "steps), and the control arm. Each trial kills the run (SIGKILL, its process group) when it reaches the "
        "trial's target, read from progress.json (stage, iteration, units done) and state.json (which part of the "
        "run), polled every 5 ms; the set-up kill is the SPIN_LITE_KILL_AT=set_up:1 hook at its end (set-up writes "
        "no progress). Then the same command runs again until it finishes. A trial passes when every file of the "
        "run equals the uninterrupted run's: the adapters (SFT, iterations, controls) bit-identical, the samples, "
        "evaluations, summaries and per-step training logs equal (wall times and tokens/s aside), the same "
        "generations and pairs with the same log-probs, each once (a different order is noted: training reads "
        "the pairs by split).",
        "",
        f"**{summary_line(counts)}**, {sum(len(r[1]) for r in rows)} kills.",
        "",
        *([f"Left over after {sum(any('left over' in x for x in r[3]) for r in rows)} trial(s): the temporary file "
           "of an atomic write that the kill cut short (NAME.PID-....tmp, never renamed into place). Nothing reads "
           "it and no result changes; the run directory keeps it.", ""]
          if any("left over" in x for r in rows for x in r[3]) else []),
        "| trial | target: where the kill landed (state.json; progress.json done/total; the stage's folder then) "
        "| runs to finish | result |",
        "|---|---|---|---|",
        *[f"| {n} | {'<br>'.join(kills)} | {resumes} | "
          f"{'; '.join(['identical'] * all(x.startswith('(note)') for x in p) + p)} |"
          for n, kills, resumes, p in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"{summary_line(counts)}; wrote {args.out}")
    passed = counts["differing"] == 0 and counts["missed"] == 0
    if passed:
        shutil.rmtree(work)
    else:
        print(f"the runs are in {work}")
    return 0 if passed else 1

if __name__ == "__main__":
    sys.exit(main())
