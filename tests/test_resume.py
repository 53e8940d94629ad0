"""Resume: real processes killed (SIGKILL) mid-generation and mid-training, then the same command again.

The final adapters must equal those of an uninterrupted run with the same seed, and no finished generation
batch may be generated twice.
"""
import json

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

    # 3. resumed to the end
    third = cli(*args(crashed))
    assert third.returncode == 0, third.stderr[-3000:]
    # nothing redone: iteration 0's pairs were on disk, so its generate stage did not run again
    assert "generate iter 0" not in third.stdout + third.stderr and "generate iter 1" in third.stdout + third.stderr
    assert "resumed from the checkpoint at step 2 of 3" in third.stdout
    assert "iter 1" in third.stdout

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
