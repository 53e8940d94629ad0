"""Reliability: the lock and Abort with real processes, two launches at once, unique temporary files, every
number checked, and every error that user input can cause raised before the run directory is written.

    python -m pytest -q tests/test_reliability.py

Each test is a failure found by the red-team pass of issue 10 (the divergence guard is tested with train.py).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from typing import get_args

import pytest

from conftest import REPO, hold_run, recorded_launch, tiny_settings
from spin_lite.app import form, processes, views, workspace
from spin_lite import config
from spin_lite.cli import main
from spin_lite.config import ConfigError, load_config
from spin_lite.state import RunDir, atomic_write_json

# A process holding a run directory's lock, as `spin-lite run` does (its command line names spin_lite).
HOLD = ("import sys, time\nfrom spin_lite.state import RunDir\nlock = RunDir(sys.argv[1]).lock()\n"
        "print('held', flush=True)\ntime.sleep(120)")
# Abort from a process in a session of its own: signalling the wrong group kills this process, not the tests.
ABORT = ("import os, sys, json\nfrom pathlib import Path\nfrom spin_lite.app import processes, workspace\n"
         "record = Path(sys.argv[1]) / sys.argv[2] / processes.PROCESS_FILE\n"
         "if sys.argv[3] != '-':\n"
         "    record.write_text(json.dumps({'pid': os.getpid() if sys.argv[3] == 'self' else int(sys.argv[3])}))\n"
         "try:\n    print(processes.abort_run(sys.argv[1], sys.argv[2], grace_s=1))\n"
         "except workspace.AppError as e:\n    print('refused:', e)\n")


def python(code: str, *args, **kwargs):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, start_new_session=True, **kwargs)


# -- the lock and Abort, with real processes ---------------------------------------------------------------------
def test_a_refused_locker_leaves_the_holders_pid_and_abort_signals_only_what_the_app_started(tmp_path):
    ws = tmp_path
    root = ws / "runs" / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = python("import sys\nfrom spin_lite.state import RunDir\nRunDir(sys.argv[1]).lock()", root)
        assert second.returncode == 1 and f"in use by another process (process {holder.pid})" in second.stderr
        assert (root / ".lock").read_text() == str(holder.pid)  # not emptied by the refused process
        assert RunDir(root).is_locked() and RunDir(root).lock_holder() == holder.pid
        # Abort: the run was not started by the app, so nothing is signalled; records naming group 0, init,
        # the aborting process itself or the CLI's process are refused.
        for pid in ("-", "0", "1", "self", str(holder.pid)):
            out = python(ABORT, ws, "runs/held", pid)
            assert out.returncode == 0, (pid, out.returncode, out.stderr[-2000:])
            assert "refused:" in out.stdout and "did not start" in out.stdout, (pid, out.stdout)
            assert holder.poll() is None
        started = processes._process_start(holder.pid)
        assert processes.started_group({"pid": holder.pid}) is None  # no start time: not a record the app wrote
        assert processes.started_group({"pid": holder.pid, "process_start": started + 1}) is None  # a reused pid
        assert processes.started_group({"pid": holder.pid, "process_start": started}) == holder.pid
        assert processes.started_group({"pid": True}) is None and processes.started_group({"pid": "12"}) is None
    finally:
        holder.kill()
        holder.wait()
    assert not RunDir(root).is_locked()  # an flock dies with its process


def test_two_launches_at_once_start_one_run(tmp_path):
    """Two tabs press Start on the same run directory at the same moment: one run starts, the other is refused,
    and the lock file ends up holding the run's pid."""
    from test_app import make_workspace, tiny_config

    ws = make_workspace(tmp_path / "ws")
    cfg = tiny_config("runs/race", iterations=2)
    barrier, results = threading.Barrier(2), []

    def start():
        barrier.wait()
        try:
            results.append(processes.start_run(ws, cfg))
        except Exception as e:  # noqa: BLE001 - the test sorts them below
            results.append(e)

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    started = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, workspace.AppError)]
    assert len(started) == 1 and len(refused) == 1, results
    assert "already running" in str(refused[0])
    pid = json.loads((ws / "runs" / "race" / processes.PROCESS_FILE).read_text())["pid"]
    deadline = time.time() + 120
    while RunDir(ws / "runs" / "race").lock_holder() != pid and time.time() < deadline:  # the run adopted the lock
        time.sleep(0.2)
    try:
        assert RunDir(ws / "runs" / "race").lock_holder() == pid, views.run_log(ws, "runs/race")
        hold_run(ws / "runs" / "race")  # held there: the abort below lands mid-run, however fast the machine
        with pytest.raises(workspace.AppError, match="already running"):
            processes.start_run(ws, cfg)
    finally:
        assert "aborted" in processes.abort_run(ws, "runs/race", grace_s=2)
    assert not RunDir(ws / "runs" / "race").is_locked()
    assert not list((ws / "runs" / "race").glob("*.tmp"))


def test_atomic_writes_from_many_threads(tmp_path):
    target = tmp_path / "app-run.json"
    (tmp_path / "app-run.json.tmp").symlink_to(tmp_path / "elsewhere.json")  # the old fixed temporary name
    errors = []

    def write(i):
        try:
            for k in range(50):
                atomic_write_json(target, {"thread": i, "k": k})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text())["k"] == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app-run.json", "app-run.json.tmp"]  # no temporaries left
    assert not (tmp_path / "elsewhere.json").exists()


def test_settings_help_is_computed_once_and_choices_declared_once(monkeypatch):
    from spin_lite.loss import LOSS_TYPES

    config._settings_info.cache_clear()
    parses, real = [], ast.parse
    monkeypatch.setattr(ast, "parse", lambda *a, **k: parses.append(1) or real(*a, **k))
    threads = [threading.Thread(target=lambda: (form.settings(), config.describe_settings())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(parses) == 1
    assert {"mode", "model.dtype", "model.backend", "train.loss_type", "train.lr_scheduler",
            "train.report_to"} <= set(config.choices())
    assert form.CHOICES == {k: list(v) for k, v in config.choices().items()}
    assert LOSS_TYPES == get_args(config.LossType) == config.choices()["train.loss_type"]
    assert [s.choices for s in form.settings() if s.key == "model.backend"] == [["auto", "hf", "unsloth"]]


# -- numbers ------------------------------------------------------------------------------------------------------
def test_every_number_is_checked_for_range_and_finiteness():
    bad = {"data.max_examples=-5": "data.max_examples must be >= 1", "train.max_grad_norm=-1": "train.max_grad_norm",
           "lora.alpha=-16": "lora.alpha must be > 0", "train.weight_decay=-0.5": "train.weight_decay",
           "generation.temperature=.inf": "generation.temperature must be a finite number",
           "train.learning_rate=.inf": "train.learning_rate must be a positive number",
           "train.beta=[0.1, .nan]": "train.beta must be a positive number", "seed=-1": "seed must be >= 0",
           "eval.max_new_tokens=0": "eval.max_new_tokens must be >= 1", "lora.target_modules=[]": "lora.target_modules",
           "lora.dropout=.nan": "lora.dropout"}
    with pytest.raises(ConfigError) as e:
        load_config(None, list(bad))
    for text in bad.values():
        assert text in str(e.value)
    with pytest.raises(ConfigError, match="train.max_grad_norm must be a finite number"):
        load_config(None, ["train.max_grad_norm=.inf"])


def test_exponent_numbers_are_numbers_on_the_cli_and_in_files(tmp_path, capsys):
    cfg = load_config(None, ["train.learning_rate=1e6", "train.beta=[1e-1, 2E-1]", "generation.temperature=7e-1"])
    assert cfg.train.learning_rate == 1e6 and cfg.train.beta == [0.1, 0.2] and cfg.generation.temperature == 0.7
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  learning_rate: 5e-5\n  weight_decay: 1e-2\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == 5e-5 and cfg.train.weight_decay == 0.01
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(None, ["train.epochs=1e3"])  # an integer setting stays an integer
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["train.beta=[0.1"])


def test_undecodable_or_odd_config_files_are_named_errors(tmp_path, capsys):
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert main(["run", str(binary)]) == 2
    err = capsys.readouterr().err
    assert "is not a text file" in err and "Traceback" not in err
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert main(["run", str(listy)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


# -- errors before anything is written --------------------------------------------------------------------------------
def test_model_errors_come_before_the_run_directory_is_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    run = tmp_path / "run"
    no_adapter = tmp_path / "not-an-adapter"
    no_adapter.mkdir()
    cases = [({"model.adapter": tmp_path / "missing-adapter"}, f"no such folder: {tmp_path / 'missing-adapter'}"),
             ({"model.adapter": no_adapter}, "has no adapter_config.json"),
             ({"lora.target_modules": "[q_proj, qproj]"}, "no module of"),
             ({"lora.target_modules": "[layers]"}, "which LoRA cannot wrap"),
             ({"model.name": tmp_path / "missing-model"}, f"no such folder: {tmp_path / 'missing-model'}")]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases.append(({"model.name": "nobody-here/not-a-cached-model"}, "HF_HUB_OFFLINE"))
    for extra, text in cases:
        began = time.time()
        assert main(["run", *tiny_settings(tiny_model_dir, run, **extra)]) == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, (extra, err)
        assert not run.exists(), extra  # no config.yaml, no state.json: the corrected command starts cleanly
        assert time.time() - began < 30
    monkeypatch.chdir(tmp_path)
    assert main(["run", *tiny_settings(tiny_model_dir, run, **{"model.name": "models/tiny"})]) == 2
    assert "Offline?" in capsys.readouterr().err  # a relative folder that is not there, and the hub is off


# -- what the page shows -------------------------------------------------------------------------------------------
def test_a_killed_run_shows_why_not_a_warning_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n$ spin-lite run a.yaml    # started by the app\nerror: an earlier failure\n"
                   "\n$ spin-lite run a.yaml    # started by the app\nLoading weights\n"
                   "  /x/torch/jit/_script.py:365: DeprecationWarning: deprecated\n  warnings.warn(\n")
    assert processes.last_error(log, -9).startswith("the run was killed by SIGKILL")
    assert processes.last_error(log, 1) == "the run ended with exit code 1; see its log"
    with open(log, "a") as f:
        f.write("Traceback (most recent call last):\nRuntimeError: boom\n  warnings.warn(\n")
    assert processes.last_error(log, 1) == "RuntimeError: boom"
    run = tmp_path / "runs" / "killed"
    run.mkdir(parents=True)
    (run / processes.LOG_FILE).write_text(log.read_text().split("Traceback")[0])
    (run / processes.PROCESS_FILE).write_text(json.dumps({"pid": 2 ** 22 + 7, "returncode": -9}))
    status = processes.run_status(tmp_path, "runs/killed")
    assert status["status"] == "failed" and "SIGKILL" in status["error"]


def test_auth_from_a_file_or_the_environment(monkeypatch, tmp_path):
    launched = recorded_launch(monkeypatch)
    from spin_lite.app import ui as app
    secret = tmp_path / "auth.txt"
    secret.write_text("ann:s3cret:with-colon\n")
    app.main(["--workspace", str(tmp_path), "--auth-file", str(secret)])
    assert launched["auth"] == ("ann", "s3cret:with-colon")
    monkeypatch.setenv("SPIN_LITE_APP_AUTH", "bob:pw")  # kept out of `ps`, like the file
    app.main(["--workspace", str(tmp_path)])
    assert launched["auth"] == ("bob", "pw")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit):
        app.main(["--workspace", str(tmp_path), "--auth-file", str(tmp_path / "empty.txt")])
