"""Every message right (issue 27): a forged lock record, a negative iteration, the SFT stage's rate, and the kill
harness's count."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from spin_lite.state import RunDir, RunLockedError
from test_data_loss import hand_made_run

HOLD = ("import sys, time\nfrom spin_lite.state import RunDir\nlock = RunDir(sys.argv[1]).lock()\n"
        "print('held', flush=True)\ntime.sleep(120)")


def test_a_forged_lock_record_names_no_process_it_does_not_know_holds_the_lock(tmp_path):
    """A lock file whose pid was overwritten with the app's own (here: this process's) made Abort say "kill <the
    app's pid>". A pid is believed only when that process has the lock file open, and never when it is this one."""
    from spin_lite.app import processes
    from spin_lite.app.workspace import AppError

    root = tmp_path / "runs" / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RunDir(root).lock_holder() == holder.pid  # the true record
        for forged in (os.getpid(), os.getppid(), 1):  # this process, a live one that does not hold it, init
            (root / ".lock").write_text(str(forged))
            assert RunDir(root).lock_holder() is None, forged
            with pytest.raises(AppError) as refused:
                processes.abort_run(tmp_path, "runs/held", grace_s=0)
            assert "did not start" in str(refused.value) and str(forged) not in str(refused.value)
            with pytest.raises(RunLockedError) as locked:
                RunDir(root).lock()
            assert str(locked.value) == f"run directory {root} is in use by another process"
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_a_negative_iteration_is_refused_not_exported_as_the_start(tiny_model_dir, tmp_path, capsys):
    from spin_lite.cli import main
    from spin_lite.export import ExportError, export_adapter

    run = hand_made_run(tmp_path / "run", tiny_model_dir)
    with pytest.raises(SystemExit) as refused:
        main(["export", str(run), "--iteration", "-5", "--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    assert "'-5' is not an iteration number (0, 1, ...; -1 or start: the starting model)" in capsys.readouterr().err
    with pytest.raises(ExportError, match="iteration -5 is no model of run"):
        export_adapter(run, -5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_diverging_sft_stage_names_the_sft_rate(tiny_config):
    """The SFT stage trains at sft.learning_rate: its divergence said "lower train.learning_rate"."""
    import math

    from spin_lite.run import SpinRun
    from spin_lite.train import TrainingDiverged

    cfg = tiny_config(iterations=1, **{"sft.enabled": "true", "sft.steps": 2, "eval.enabled": "false"})
    cfg.sft.learning_rate = math.inf  # (set after validation: the guard is what stops it)
    with pytest.raises(TrainingDiverged, match="lower sft.learning_rate and start a new run_dir"):
        SpinRun(cfg, log=lambda *a: None).run()


def test_the_kill_harness_counts_missed_targets_apart_from_differences():
    """All 13 trials identical, 3 of them with a target the run finished before: it printed "10 of 13 trials
    identical"."""
    sys.path.insert(0, str(REPO / "examples"))
    from reliability_kill_resume import summary_line, tally

    rows = [(n, ["iter 0 train: iteration 0 train; ..."] if n > 2 else ["iter 1 evaluate: MISSED (the run finished "
                                                                          "first)"], 1, []) for n in range(13)]
    rows[4] = (4, ["sft: sft; ..."], 1, ["(note) iter-00/x.123-4.tmp: left over"])
    counts = tally(rows)
    assert counts == {"trials": 13, "identical": 13, "differing": 0, "missed": 3}
    assert summary_line(counts).startswith("13 of 13 trials identical, 0 differing; 3 with a target not reached")
    rows[5] = (5, ["sft: sft; ..."], 1, ["sft/adapter/adapter_model.safetensors: 2 of 4 tensors differ"])
    assert tally(rows)["differing"] == 1
