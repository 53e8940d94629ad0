"""Data-parallel runs: `torchrun --nproc_per_node 2 -m spin_lite run ...` on the CPU (gloo) against one process.

Two processes split the generation batches, the scoring and every optimizer step's pairs; the run must
come out as one process's: the same pairs (the same sampled tokens: batch b is sampled with its own seed
wherever it runs), the same optimizer steps, and an adapter equal up to float32 rounding (the micro batches
are cut differently, so sums are taken in another order).
Run alone: .venv/bin/python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "iterations": 2, "seed": 7,
    "data": {"path": str(REPO / "examples" / "data" / "demo_sft.jsonl"), "max_examples": 8, "eval_size": 4, "val_size": 4,
             "max_prompt_length": 96, "max_length": 160},
    "generation": {"max_new_tokens": 8, "batch_size": 4},
    "train": {"epochs": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
              "gradient_checkpointing": False, "stop_when": "never"},
    "eval": {"max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same config run by one process and by two (torchrun, gloo); {processes: run directory}."""
    from spin_lite.config import ModelConfig
    from spin_lite.model import embedded_model_dir, load_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("distributed")
    tokenizer = load_tokenizer(ModelConfig(name=str(embedded_model_dir())))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump({**SETTINGS, "model": {"name": str(root / "model")}}))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launchers = {1: [sys.executable, "-m", "spin_lite"],
                 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "spin_lite"]}
    # Both runs at once: each is mostly start-up (imports), and the machine has 2 cores.
    procs = {n: subprocess.Popen([*cmd, "run", str(config_path), f"run_dir={root / f'run{n}'}"], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, cmd in launchers.items()}
    for n, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{n}-process run failed:\n{out[-4000:]}"
    return {n: root / f"run{n}" for n in procs}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _adapter(run: Path, t: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run / f"iter-{t:02d}" / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("t", [0, 1])
def test_same_pairs_and_steps_as_one_process(runs, t):
    one, two = runs[1] / f"iter-{t:02d}", runs[2] / f"iter-{t:02d}"
    assert (two / "summary.json").exists()
    # each process wrote its own share of the generation batches, and the shares make up the whole
    shares = [_jsonl(two / f"generations-rank{r}.jsonl") for r in (0, 1)]
    assert all(shares) and not {g["key"] for g in shares[0]} & {g["key"] for g in shares[1]}
    assert sorted(g["key"] for s in shares for g in s) == sorted(g["key"] for g in _jsonl(one / "generations.jsonl"))

    pairs1, pairs2 = _jsonl(one / "pairs.jsonl"), _jsonl(two / "pairs.jsonl")
    assert [(p["key"], p["split"]) for p in pairs1] == [(p["key"], p["split"]) for p in pairs2]
    assert len(pairs1) == (16 if t == 0 else 24)  # 8 training + 4 validation + 4 test, then + 8 previous pairs
    if t == 0:  # the same weights: the same sampled tokens, the same opponent log-probs
        assert [p["gen_ids"] for p in pairs1] == [p["gen_ids"] for p in pairs2]
        for a, b in zip(pairs1, pairs2):
            assert a["opponent_real"] == pytest.approx(b["opponent_real"], rel=1e-4, abs=1e-3)
            assert a["opponent_gen"] == pytest.approx(b["opponent_gen"], rel=1e-4, abs=1e-3)

    log1, log2 = _jsonl(one / "train_log.jsonl"), _jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, len(log1) + 1))
    assert len(log1) == (8 if t == 0 else 16) // 2  # pairs / (micro batch 2 x accumulation 1)
    s1, s2 = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert s1["pairs"] == s2["pairs"] and s1["train"]["steps"] == s2["train"]["steps"]


def test_adapter_matches_one_process(runs):
    """Iteration 0 trains on identical pairs: the adapters agree to float32 rounding."""
    a1, a2 = _adapter(runs[1], 0), _adapter(runs[2], 0)
    assert a1.keys() == a2.keys()
    moved = max(float(v.abs().max()) for k, v in a1.items() if "lora_B" in k)
    assert moved > 1e-4  # training changed the adapter (B starts at zero)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    log1 = _jsonl(runs[1] / "iter-00" / "train_log.jsonl")
    log2 = _jsonl(runs[2] / "iter-00" / "train_log.jsonl")
    for r1, r2 in zip(log1, log2):  # the log of two processes covers all of each step's pairs
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["margin"] == pytest.approx(r1["margin"], rel=1e-3, abs=1e-5)


# -- what a GPU run needs of the process group, checked on the CPU with the calls recorded -------------------------
@pytest.mark.parametrize("cuda", [True, False])
def test_each_process_joins_on_its_own_gpu_with_a_long_timeout(monkeypatch, tmp_path, cuda):
    """On GPUs, cuda:LOCAL_RANK becomes the current device before the NCCL group starts: NCCL and all_gather_object
    run on the current device, cuda:0 in every process otherwise. The group waits longer than NCCL's default 10
    minutes, since ranks > 0 wait in a barrier while rank 0 evaluates alone. Here: rank 3 of 2 machines x 2 GPUs."""
    import datetime

    from spin_lite import run as run_module
    from spin_lite.config import load_config
    from spin_lite.model import device

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(run_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(run_module.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init_process_group", backend, kw.get("timeout"))))
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    run_module.SpinRun(load_config(None, [f"run_dir={tmp_path / 'run'}"]))
    joined = ("init_process_group", "nccl" if cuda else "gloo", run_module.COLLECTIVE_TIMEOUT)
    assert calls == ([("set_device", 1)] if cuda else []) + [joined]
    assert run_module.COLLECTIVE_TIMEOUT >= datetime.timedelta(hours=1)
    assert device() == (torch.device("cuda", 1) if cuda else torch.device("cpu"))  # where load_base puts the model


@pytest.mark.parametrize("rank", [0, 1])
def test_merged_base_is_written_by_rank_0_and_read_after_a_barrier(monkeypatch, tmp_path, rank):
    """Merge mode on Unsloth loads a base with the earlier adapters merged in, from run_dir/merged-base: rank 0
    alone writes it, every process loads it after the barrier that follows, and only rank 0 deletes it (another
    rank deleting it late could remove the next iteration's, being written)."""
    from spin_lite import run as run_module
    from spin_lite.config import load_config

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(run_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(run_module.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(run_module, "save_merged_base", lambda cfg, adapters, folder: calls.append(
        ("write", [Path(a).parent.name for a in adapters], folder)))
    monkeypatch.setattr(run_module, "load_base", lambda cfg, path=None: calls.append(("load", path)) or "base")
    monkeypatch.setattr(run_module, "build_model", lambda base, *args, **kwargs: base)
    run = run_module.SpinRun(load_config(None, [f"run_dir={tmp_path}", "mode=merge"]))
    run.backend = "unsloth"
    assert run.model_for(2) == "base"  # iteration 2: the adapters of iterations 0 and 1 merged
    folder = tmp_path / "merged-base"
    written = [("write", ["iter-00", "iter-01"], folder)] if rank == 0 else []
    assert calls == written + ["barrier", ("load", str(folder))]
    folder.mkdir()
    run._release(object())
    assert folder.exists() == (rank != 0)
