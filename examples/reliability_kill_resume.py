"""Kill a run at random moments (SIGKILL), run the same command again, and compare with an uninterrupted run.

    python examples/reliability_kill_resume.py                 # 12 trials, writes docs/RELIABILITY.md
    python examples/reliability_kill_resume.py --trials 3 --out /tmp/r.md

A tiny random Llama (2 layers, the embedded model's tokenizer and chat template) runs 2 SPIN iterations of
8 prompts. One reference run goes through uninterrupted. Each trial starts the same run in a fresh directory,
kills it once or twice at a moment drawn uniformly over the reference run's working time (after the imports;
a run that finishes before its moment is started afresh with the window shortened to its time), then runs the
command again until it finishes. A trial passes when every adapter is bit-identical to the
reference's, the pairs (by split and key) and the samples and per-step losses are equal, and no generation
or training step appears twice or is missing. The stage each kill landed in is read from state.json at the moment of the kill.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
    settings = {"run_dir": run_dir, "iterations": 2, "model.name": model, "data.path": DEMO,
                "data.max_examples": 8, "data.eval_size": 4, "data.val_size": 4, "train.stop_when": "never",
                "data.max_prompt_length": 96, "data.max_length": 160, "generation.max_new_tokens": 8,
                "generation.batch_size": 4, "train.epochs": 1, "train.micro_batch_size": 2,
                "train.gradient_accumulation_steps": 2, "train.learning_rate": 1e-2, "train.save_every": 2,
                "eval.max_new_tokens": 8}
    return [sys.executable, "-m", "spin_lite", "run", *(f"{k}={v}" for k, v in settings.items())]


SOURCE = REPO  # the spin_lite every run imports: main() points it at a copy, so edits made meanwhile do not count


def run(cmd: list[str], kill_after: float | None = None, run_dir: Path | None = None) -> tuple[int, str | None]:
    """Run `cmd`; with `kill_after`, SIGKILL its process group then. The exit code, and the stage it was in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SOURCE)}
    proc = subprocess.Popen(cmd, cwd=SOURCE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, None
    except subprocess.TimeoutExpired:
        state = {}
        try:
            state = json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        where = f"iteration {state['iteration']} {state.get('stage')}" if state.get("iteration") is not None else "set-up"
        return proc.returncode, where


def differences(reference: Path, got: Path, notes: list[str]) -> list[str]:
    """What differs between two finished run directories (empty: identical in every result); differences
    that change no result (the order of pairs.jsonl) go to `notes`."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for t in (0, 1):
        a, b = reference / f"iter-{t:02d}", got / f"iter-{t:02d}"
        ref_w, got_w = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
        if ref_w.keys() != got_w.keys() or not all(torch.equal(ref_w[k], got_w[k]) for k in ref_w):
            problems.append(f"iter {t}: adapter differs")
        if (a / "samples.jsonl").read_bytes() != (b / "samples.jsonl").read_bytes():
            problems.append(f"iter {t}: samples.jsonl differs")
        ref_pairs = [json.loads(line) for line in (a / "pairs.jsonl").read_text().splitlines()]
        got_pairs = [json.loads(line) for line in (b / "pairs.jsonl").read_text().splitlines()]
        by_key = lambda pairs: {(p["split"], p["key"]): p for p in pairs}
        if len(got_pairs) != len(by_key(got_pairs)) or by_key(ref_pairs) != by_key(got_pairs):
            problems.append(f"iter {t}: pairs differ")
        elif ref_pairs != got_pairs:  # the same pairs and log-probs, in another order: noted, not a failure
            notes.append(f"iter {t}: pairs.jsonl lists the same pairs in another order")
        gens = [json.loads(line) for line in (b / "generations.jsonl").read_text().splitlines()]
        keys = [g["key"] for g in gens]
        ref_keys = [json.loads(line)["key"] for line in (a / "generations.jsonl").read_text().splitlines()]
        if len(keys) != len(set(keys)) or sorted(keys) != sorted(ref_keys):
            problems.append(f"iter {t}: generations duplicated or missing ({len(keys)} lines, {len(set(keys))} keys)")
        steps = [json.loads(line) for line in (b / "train_log.jsonl").read_text().splitlines()]
        ref_steps = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
        if [s["step"] for s in steps] != [s["step"] for s in ref_steps]:
            problems.append(f"iter {t}: training steps {[s['step'] for s in steps]}")
        elif [s["loss"] for s in steps] != [s["loss"] for s in ref_steps]:
            problems.append(f"iter {t}: training losses differ")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "docs" / "RELIABILITY.md"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    began = time.time()
    global SOURCE
    work = Path(tempfile.mkdtemp(prefix="spin-kill-"))
    SOURCE = work / "src"  # one frozen copy of the package for the reference and every trial
    shutil.copytree(REPO / "spin_lite", SOURCE / "spin_lite", ignore=shutil.ignore_patterns("__pycache__"))
    model = make_tiny_model(work / "tiny")

    start = time.time()
    code, _ = run(command(model, work / "reference"))
    total = time.time() - start
    assert code == 0, "the reference run failed"
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import spin_lite.run"], cwd=SOURCE, env={**os.environ, "PYTHONPATH": str(SOURCE)})
    imports = time.time() - t0  # the first part of every run, where a kill tests nothing
    print(f"reference run: {total:.1f} s ({imports:.1f} s of imports)", flush=True)

    rows, stages, passed = [], Counter(), 0
    for trial in range(args.trials):
        run_dir = work / f"trial-{trial:02d}"
        kills = []
        for _ in range(rng.choice((1, 1, 2))):
            for _attempt in range(3):  # a run that ends before its kill moment: start afresh, sooner
                began_run = time.time()
                code, where = run(command(model, run_dir), rng.uniform(imports, total), run_dir)
                if where is not None or kills:
                    break
                total = min(total, time.time() - began_run)  # this machine is faster now than for the reference
                shutil.rmtree(run_dir)
            if where is not None:
                kills.append(where)
                stages[where.split(" ", 2)[-1] if where != "set-up" else where] += 1
        resumes = 0
        while True:
            resumes += 1
            code, _ = run(command(model, run_dir))
            if code == 0 or resumes == 3:
                break
        notes = []
        problems = differences(work / "reference", run_dir, notes) if code == 0 else [f"exit code {code}"]
        passed += not problems
        rows.append((trial, kills, resumes, problems + [f"(note) {n}" for n in notes]))
        print(f"trial {trial}: killed at {kills or ['(finished first)']}; resumed {resumes}x; "
              f"{'identical' if not problems else problems} {notes or ''}", flush=True)

    lines = [
        "# Kill and resume: randomized SIGKILL trials",
        "",
        f"`python examples/reliability_kill_resume.py --trials {args.trials} --seed {args.seed}` "
        f"({time.time() - began:.0f} s on this machine; {os.cpu_count()} CPUs, shared).",
        "",
        "A tiny random Llama (2 layers, the embedded model's tokenizer) runs 2 SPIN iterations of 8 prompts "
        "(generation batches of 4, a checkpoint every 2 optimizer steps). Each trial kills the run once or twice "
        f"with SIGKILL at a moment drawn uniformly over the reference run's working time ({imports:.0f}-{total:.0f} s), "
        "then runs the same command again until it finishes. A trial passes when every adapter is bit-identical "
        "to the uninterrupted run's, samples.jsonl is byte-identical, the per-step losses are "
        "equal, and no generation or optimizer step is duplicated or missing; pairs.jsonl holds the same pairs "
        "with the same log-probs (its order is noted when it differs: training reads the pairs by split).",
        "",
        f"**{passed} of {args.trials} trials identical**, {sum(len(r[1]) for r in rows)} kills.",
        "",
        "Where the kills landed (state.json at the moment of the kill): "
        + ", ".join(f"{stage}: {n}" for stage, n in sorted(stages.items())) + ".",
        "",
        "| trial | killed at | runs to finish | result |",
        "|---|---|---|---|",
        *[f"| {t} | {'; '.join(k) or '(finished before the kill)'} | {r} | "
      f"{'; '.join(['identical'] * all(x.startswith('(note)') for x in p) + p)} |"
          for t, k, r, p in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"{passed}/{args.trials} identical; wrote {args.out}")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
