"""Resume: real processes killed (SIGKILL) mid-generation and mid-training, then the same command again.

The final adapters must equal those of an uninterrupted run with the same seed, and no finished generation
batch may be generated twice.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import cli, tiny_settings


def adapters(run_dir):
    return {t: load_file(run_dir / f"iter-{t:02d}" / "adapter" / "adapter_model.safetensors") for t in (0, 1)}


def test_killed_runs_continue_to_the_same_result(tiny_model_dir, tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    args = lambda run_dir: ["run", *tiny_settings(tiny_model_dir, run_dir, **{"data.max_examples": 12})]

    done = cli(*args(reference))
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. killed after the first of 5 generation batches of iteration 0 (12 train + 4 validation + 4 test prompts)
    first = cli(*args(crashed), env={"SPIN_LITE_KILL_AT": "generate_batch:1"})
    assert first.returncode == -9, first.stderr[-3000:]
    gens = (crashed / "iter-00" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 4 and {json.loads(l)["batch"] for l in gens} == {0}
    assert not (crashed / "iter-00" / "adapter").exists()

    # 2. resumed, then killed after training step 2 of 3 of iteration 0 (checkpoints every step)
    second = cli(*args(crashed), env={"SPIN_LITE_KILL_AT": "train_step:2"})
    assert second.returncode == -9, second.stderr[-3000:]
    assert "1 of 5 batches already on disk, generating 4" in second.stdout
    assert (crashed / "iter-00" / "checkpoint" / "trainer_state.pt").exists()
    assert not (crashed / "iter-00" / "adapter").exists()

    # 3. resumed, then killed inside the replacement of a checkpoint (iteration 1, 6 steps: the one of step 2
    # replacing step 1's), between its two renames: the checkpoint folder is missing, the old one set aside
    (crashed / "iter-01").mkdir()
    (crashed / "iter-01" / "checkpoint.old").mkdir()  # a folder of the user's with a name like it: never touched
    third = cli(*args(crashed), env={"SPIN_LITE_KILL_AT": "replace_dir:1"})
    assert third.returncode == -9, third.stderr[-3000:]
    # nothing redone: iteration 0's pairs were on disk, so its generate stage did not run again
    assert "generate iter 0" not in third.stdout + third.stderr and "generate iter 1" in third.stdout + third.stderr
    assert "resumed from the checkpoint at step 2 of 3" in third.stdout
    aside = [p.name for p in (crashed / "iter-01").glob("checkpoint.old-*")]
    assert not (crashed / "iter-01" / "checkpoint").exists() and len(aside) == 1

    # 4. resumed to the end: the set-aside checkpoint put back (recover_dir), training goes on from its step 1
    fourth = cli(*args(crashed))
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "resumed from the checkpoint at step 1 of 6" in fourth.stdout and "iter 1" in fourth.stdout
    assert (crashed / "iter-01" / "checkpoint.old").is_dir() and not list((crashed / "iter-01").glob("*.old-*"))

    lines = (crashed / "iter-00" / "generations.jsonl").read_text().splitlines()
    keys = [json.loads(l)["key"] for l in lines]
    assert len(keys) == len(set(keys)) == 20
    steps = [json.loads(l)["step"] for l in (crashed / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    expected, got = adapters(reference), adapters(crashed)
    for t in (0, 1):
        assert expected[t].keys() == got[t].keys()
        for k in expected[t]:
            assert torch.equal(expected[t][k], got[t][k]), f"iteration {t} {k} differs after resume"
    # Running the finished command again does nothing but print the table.
    again = cli(*args(crashed))
    assert again.returncode == 0 and "generate" not in again.stderr and "iter 1" in again.stdout


def test_resume_after_the_adapter_was_saved_evaluates_the_trained_adapter(tiny_config):
    """A run stopped between saving the adapter and finishing the evaluation evaluates the trained adapter on
    resume, not the opponent: same held-out metrics as an uninterrupted run."""
    import shutil
    from spin_lite.run import SpinRun
    run = SpinRun(tiny_config(iterations=1), log=lambda *a: None).prepare()
    run.iteration(0)
    out = run.dir.iteration(0)
    expected = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "samples.jsonl", "summary.json"):
        (out / name).unlink()
    run.iteration(0)
    assert json.loads((out / "eval.json").read_text()) == expected
    shutil.rmtree(run.dir.root)


def test_resume_loads_the_optimizer_on_the_cpu_and_replaces_the_log_whole(tiny_model_dir, tmp_path, monkeypatch):
    """The checkpoint's optimizer state is loaded onto the CPU (map_location="cpu": it was saved from rank 0's device,
    perhaps on another machine) and load_state_dict puts it on each parameter's device. The log is cut back to the
    checkpoint's step by rank 0 alone, replacing the file whole (a new inode): the other ranks read it meanwhile."""
    from peft import get_peft_model_state_dict
    from spin_lite import train
    from spin_lite.config import LoraSettings, ModelConfig
    from spin_lite.model import load_base, with_adapter

    model = with_adapter(load_base(ModelConfig(name=str(tiny_model_dir))), LoraSettings(), None)
    params = [p for p in model.parameters() if p.requires_grad]

    def optimizer_and_schedule():
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        return optimizer, train.lr_schedule(optimizer, "linear", 10, 0.0)

    optimizer, scheduler = optimizer_and_schedule()
    sum(p.sum() for p in params).backward()  # one step: AdamW has state to save
    optimizer.step()
    scheduler.step()
    ckpt, log = tmp_path / "checkpoint", tmp_path / "train_log.jsonl"
    train._save_checkpoint(model, optimizer, scheduler, 1, ckpt, get_peft_model_state_dict)
    log.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2)))  # step 2: after it
    saved = optimizer.state_dict()["state"]

    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))
    monkeypatch.setattr(train.dist, "barrier", lambda: None)
    for rank in (1, 0):
        inode = log.stat().st_ino
        optimizer, scheduler = optimizer_and_schedule()
        start, records = train._resume(model, optimizer, scheduler, None, ckpt, log, rank, 2)
        assert (start, [r["step"] for r in records]) == (1, [1])
        assert loads[-1]["map_location"] == "cpu"
        state = optimizer.state_dict()["state"]
        assert len(state) == len(saved) == len(params)
        for k, p in enumerate(params):
            assert torch.equal(state[k]["exp_avg"], saved[k]["exp_avg"]) and state[k]["exp_avg"].device == p.device
        assert (log.stat().st_ino != inode) == (rank == 0)  # only rank 0 rewrites it, by replacing it
    assert log.read_text() == json.dumps({"step": 1, "loss": 0.5}) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "train_log.jsonl"]  # no temporary file left


def test_a_restarted_run_removes_what_killed_atomic_writes_left(tiny_config):
    """A process killed inside atomic_write_text leaves NAME.PID-TID.tmp beside the file (seen in the kill-resume
    trials, docs/RELIABILITY.md); the next process to hold the run removes them, and nothing else."""
    from spin_lite.run import SpinRun
    cfg = tiny_config(iterations=1)
    root = Path(cfg.run_dir)
    (root / "iter-00").mkdir(parents=True)
    stale = [root / "progress.json.4242-139871.tmp", root / "iter-00" / "samples.jsonl.77-1.tmp"]
    kept = [root / "iter-00" / "notes.tmp", root / "mine.json"]  # not an atomic write's name: left alone
    for p in stale + kept:
        p.write_text("{")
    lines = []
    SpinRun(cfg, log=lines.append).prepare()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert sum("left by an interrupted write" in line for line in lines) == 2
