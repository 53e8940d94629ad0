"""Runs as processes: start, continue and abort them, and say whether one is running.

Runs are the CLI's: `start_run` takes the run directory's lock and launches `python -m spin_lite run -`, which
inherits and keeps it, in its own process group and session, cwd = the workspace, output appended to
RUN_DIR/run.log, so closing the page or the app does not stop it. The config it runs is the one checked here
(Start: the form's config; Continue: the run's own config.yaml with the page's changes), handed to it on its
standard input: no file that the workspace holds, and so none that could be swapped after the check, is read for
it. `abort_run` kills that process group, once it has checked that this app started it (`started_group`): the
process's identity (pid and start time) is kept in the app's memory (`LAUNCHED`), never read back from a file.

Files the app adds to a run directory: run.log, and app-run.json (pid, process start time, command, and how the
process ended), which is shown, never trusted to name a process to signal.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..config import STDIN, SpinConfig, load_config
from ..state import LinkError, RunDir, RunLockedError, atomic_write_json, read_json
from .workspace import AppError, inside, is_run_dir, open_to_write, refuse_links, resolved, run_name

PROCESS_FILE = "app-run.json"
LOG_FILE = "run.log"
LAUNCH_MARK = "$ spin-lite "  # starts the line run.log gets for each launch

# The run processes this app started, by run directory (resolved): {"pid", "process_start"}. In memory only, so
# that no file (an upload, a forged app-run.json) can make Abort signal a process the app did not start; after
# a restart of the app, its earlier runs are stopped where they run (the message says how).
LAUNCHED: dict[Path, dict] = {}


def child_env(**extra: str) -> dict:
    """The environment of a `python -m spin_lite` child: this one, with the folder holding spin_lite/ first on
    PYTHONPATH (the child runs in the workspace, where a checkout's package would not be found)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}


def _alive(pid) -> bool:
    """Whether `pid` is a running spin_lite process, or one that has ended but is not reaped yet (a zombie:
    its exit is being written down by _record_exit)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (macOS): trust the pid
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    # a process that is exiting has no command line before it becomes a zombie: still ours, still running
    return stat.rsplit(")", 1)[1].split()[0] == "Z" or not cmdline or b"spin_lite" in cmdline


def run_status(workspace, run_dir: str) -> dict:
    """Where a run directory stands: status (running, finished, aborted, failed, stopped, not started), the
    engine's state, iterations done and configured, and the app's process record. A run directory whose files are
    refused where they are read (a planted link: LinkError) is "failed", or "running" while a process holds it,
    with the refusal as its error."""
    root = inside(workspace, run_dir)
    rd = RunDir(root)
    launched = LAUNCHED.get(root)
    running = (launched is not None and _alive(launched["pid"])) or rd.is_locked()
    pid = running_pid(rd, launched) if running else None
    try:
        return _status(rd, run_dir, running, pid)
    except LinkError as e:  # (a damaged record raises RunRecordError: the overview names it "unreadable: ...")
        return {"run_dir": run_dir, "status": "running" if running else "failed", "iterations_done": 0,
                "iterations": None, "iteration": None, "stage": None, "updated": None, "pid": pid,
                "returncode": None, "error": str(e), "best_iteration": None, "chosen": None, "stopped_by_rule": False}


def _status(rd: RunDir, run_dir: str, running: bool, pid: int | None) -> dict:
    state, proc = rd.state(), process_record(rd.root)
    config = read_yaml(rd.config_path) or {}
    done, planned = rd.completed(), config.get("iterations")
    cfg = rd.settings() if state.get("status") == "finished" and done < (planned or 0) else None
    ended_by_rule = cfg is not None and rd.stopped(cfg)
    if running:
        status = "running"
    elif state.get("status") == "finished" and (ended_by_rule or (planned is not None and done >= planned)):
        status = "finished"
    elif proc.get("aborted"):
        status = "aborted"
    elif proc.get("returncode") not in (None, 0):
        status = "failed"
    elif state or done:
        status = "stopped"
    else:
        status = "not started"
    out = {"run_dir": run_dir, "status": status, "iterations_done": done, "iterations": planned,
           "iteration": state.get("iteration"), "stage": state.get("stage"), "updated": state.get("updated"),
           "pid": pid, "returncode": proc.get("returncode"), "error": None,
           "best_iteration": rd.best_iteration(), "chosen": rd.chosen_model(),
           "stopped_by_rule": ended_by_rule and not running}
    if status == "failed":
        out["error"] = last_error(rd.root / LOG_FILE, proc.get("returncode"))
    return out


def process_record(root: Path) -> dict:
    """app-run.json as the page shows it ({} when missing or malformed): how the app's last launch ended
    (returncode, aborted). Never used to choose a process to signal."""
    try:
        record = read_json(root / PROCESS_FILE, {})
    except (ValueError, OSError):
        return {}
    if not isinstance(record, dict):
        return {}
    ok = {"returncode": lambda v: v is None or type(v) is int, "aborted": lambda v: type(v) is bool}
    return {k: v for k, v in record.items() if k in ok and ok[k](v)}


def running_pid(rd: RunDir, launched: dict | None) -> int | None:
    """The pid the page names for a running run: the process this app started, else the lock's holder when it is
    a live spin_lite process that is neither this app nor in its process group (the lock file's text is written
    by whoever holds it, and a forged one must never have the page say "kill" the app)."""
    if launched is not None and _alive(launched["pid"]):
        return launched["pid"]
    holder = rd.lock_holder()
    if holder is None or holder in (os.getpid(), os.getppid()) or not _alive(holder):
        return None
    try:
        return None if os.getpgid(holder) == os.getpgrp() else holder
    except OSError:
        return None


def read_yaml(path: Path) -> dict | None:
    """A YAML mapping from a file, or None (no file, not YAML, not a mapping, not text)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


def log_lines(log: Path, n: int = 40) -> list[str]:
    """The last `n` lines of a log, each tqdm bar reduced to its latest state."""
    if not log.exists():
        return []
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 256_000))
        text = f.read().decode("utf-8", errors="replace")
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip("\r\n").split("\n")][-n:]


def last_error(log: Path, returncode: int | None = None) -> str | None:
    """Why the last launch in the log stopped: its `error: ...` line or the last line of its traceback; for a
    process killed by a signal, the signal; else its exit code (never a stray line such as a warning's)."""
    lines = [line for line in log_lines(log, 400) if line.strip()]
    launches = [i for i, line in enumerate(lines) if line.startswith(LAUNCH_MARK)]
    for line in reversed(lines[launches[-1] if launches else 0:]):
        if line.startswith("error:") or re.match(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", line):
            return line
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        oom = " (with no other error: often the system's out-of-memory killer)" if -returncode == signal.SIGKILL else ""
        return f"the run was killed by {name}{oom}; Continue resumes it from what is on disk"
    return f"the run ended with exit code {returncode}; see its log" if returncode else None


def start_run(workspace, cfg: SpinConfig) -> str:
    """Check `cfg` and launch it; refuses (AppError) a run directory in use, a run directory started with
    other settings, a folder that is not a run directory, and data or a model that cannot be loaded."""
    from ..data import load_splits
    from ..model import load_tokenizer
    from .preview import check_model

    cfg.validate()
    rel = run_name(workspace, cfg.run_dir)
    full = resolved(workspace, cfg)
    root = Path(full.run_dir)
    _refuse_if_running(workspace, rel)
    if (root / "config.yaml").exists() and is_run_dir(workspace, root):
        changed = RunDir(root).changed_settings(cfg.to_dict())
        if changed:
            raise AppError(f"run directory {cfg.run_dir} was started with other settings (changed: "
                           + ", ".join(changed) + "). Choose a new run_dir, or Continue it with its own settings.")
    if root.exists() and any(root.iterdir()) and not is_run_dir(workspace, root):
        raise AppError(f"{cfg.run_dir} exists and is not a run directory; choose a new run_dir")
    check_model(workspace, cfg)  # model, adapter, LoRA targets, data: errors here, before launching
    load_splits(full.data, load_tokenizer(full.model), full.seed)
    return _launch_checked(workspace, root, rel, cfg)


def continue_run(workspace, run_dir: str, iterations: int | None = None, stop_patience: int | None = None) -> str:
    """Launch the run again on its own config (the engine skips what is on disk); `iterations` raises the total,
    `stop_patience` lets a run the stop rule ended go on."""
    from .preview import check_model

    rel = run_name(workspace, run_dir)
    root = Path(workspace).resolve() / rel
    iterations, stop_patience = _count("iterations", iterations), _count("stop patience", stop_patience)
    _refuse_if_running(workspace, rel)
    config = root / "config.yaml"
    if not (is_run_dir(workspace, root) and config.exists()):
        raise AppError(f"{run_dir} is not a run directory (no config.yaml written by a run); start a run with the "
                       "Setup settings")
    overrides = ([f"run_dir={rel}"] + ([f"iterations={iterations}"] if iterations else [])
                 + ([f"train.stop_patience={stop_patience}"] if stop_patience else []))
    cfg = load_config(config, overrides)  # a broken config file is reported here, not in the log
    rd = RunDir(root)
    if rd.stopped(cfg):
        raise AppError(f"the stop rule ended {run_dir} {rd.stop_reason(cfg)}: set a higher stop patience for "
                       "Continue to go on")
    check_model(workspace, cfg)  # its paths confined like a new run's (a config may have been saved)
    return _launch_checked(workspace, root, rel, cfg)


def _count(name: str, value) -> int | None:
    """A count typed on the Run tab: a whole number >= 0 (0 or empty: as configured)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise AppError(f"{name} for Continue must be a whole number >= 0 (0: as configured), not {str(value)[:40]!r}")
    return int(value) or None


def _launch_checked(workspace, root: Path, rel: str, cfg: SpinConfig) -> str:
    """Launch `cfg` as checked, under the run directory's lock: `spin-lite run -` reads it from its standard input."""
    root.mkdir(parents=True, exist_ok=True)
    refuse_links(workspace, root)
    lock = _take(root, rel)
    try:
        return _launch(workspace, root, rel, cfg.to_yaml(), lock)
    finally:
        lock.close()  # the run's process holds its own copy


def _refuse_if_running(workspace, run_dir: str):
    status = run_status(workspace, run_dir)
    if status["status"] == "running":
        pid = f" (process {status['pid']})" if status["pid"] else ""
        raise AppError(f"run directory {run_dir} is already running{pid}; abort it first or choose another run_dir")


def _take(root: Path, rel: str):
    """The run directory's lock, taken by the app for the process it is about to start (which inherits it), so
    two launches at once cannot both start: the second is refused here."""
    try:
        return RunDir(root).lock()
    except RunLockedError:
        raise AppError(f"run directory {rel} is already running or being started; abort it first or choose "
                       "another run_dir") from None


def _launch(workspace, root: Path, rel: str, config_yaml: str, lock) -> str:
    """Start `python -m spin_lite run -` in its own session, cwd = workspace, output appended to run.log, with
    `config_yaml` on its standard input; the process inherits `lock` (the run directory's, taken by the caller) and
    adopts it (spin_lite.state). Its identity goes to LAUNCHED, in this process's memory."""
    args = ["run", STDIN]
    env = child_env(PYTHONUNBUFFERED="1", SPIN_LITE_LOCK_FD=str(lock.fileno()))
    with open_to_write(root / LOG_FILE, append=True) as log:
        log.write(f"\n{LAUNCH_MARK}{shlex.join(args)}    # the config of {rel} checked and started by the app, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode("utf-8"))
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "spin_lite", *args], cwd=Path(workspace).resolve(),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env,
                                start_new_session=True, pass_fds=(lock.fileno(),))
    LAUNCHED[root] = {"pid": proc.pid, "process_start": _process_start(proc.pid)}
    with contextlib.suppress(BrokenPipeError):  # a child that died at once: its log says why
        proc.stdin.write(config_yaml.encode("utf-8"))
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    atomic_write_json(root / PROCESS_FILE, {**LAUNCHED[root], "command": ["spin-lite", *args], "started": time.time()})
    threading.Thread(target=_record_exit, args=(proc, root), daemon=True).start()
    return (f"started the run {rel} (process {proc.pid}: `spin-lite run -`, the checked config on its standard "
            "input); it goes on if you close the page")


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names one
    process, not a later one that reuses the number. None without /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record_exit(proc: subprocess.Popen, root: Path):
    """Wait for the run to end, write down how, then reap it. Until it is reaped the process is a zombie,
    which _alive counts as running, so the page never sees it ended without its exit code."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status  # killed: minus the signal
    with contextlib.suppress(ValueError, OSError):  # (a record made unreadable: the exit is not written down)
        record = read_json(root / PROCESS_FILE, {})
        if isinstance(record, dict) and record.get("pid") == proc.pid:
            atomic_write_json(root / PROCESS_FILE, {**record, "returncode": code, "ended": time.time()})
    proc.wait()


def started_group(record: dict | None) -> int | None:
    """The process group the app started for a run (`record`: its LAUNCHED entry), while it runs; else None.

    Only a group that passes every check is ever signalled: a pid above 1 that is neither the app nor its
    own group, still a spin_lite process (or its zombie), the leader of its own group (start_new_session),
    and started when the record says (a reused pid fails this)."""
    pid = (record or {}).get("pid")
    if type(pid) is not int or pid <= 1 or pid in (os.getpid(), os.getpgrp()) or not _alive(pid):
        return None
    try:
        if os.getpgid(pid) != pid:
            return None
    except OSError:
        return None
    started = _process_start(pid)
    if started is not None and record.get("process_start") != started:  # without /proc: the checks above
        return None
    return pid


def _exit_code(root: Path, pid: int) -> int | None:
    """The exit code _record_exit wrote for process `pid` of the run, or None (not yet, or unreadable)."""
    with contextlib.suppress(ValueError, OSError, LinkError):
        record = read_json(root / PROCESS_FILE, {})
        if isinstance(record, dict) and record.get("pid") == pid and type(record.get("returncode")) is int:
            return record["returncode"]
    return None


def abort_run(workspace, run_dir: str, grace_s: float = 10.0) -> str:
    """Stop a running run: SIGTERM to its process group, SIGKILL after `grace_s`. Everything on disk is
    written atomically, so Continue picks up from the last finished batch or checkpoint. Only a run the app
    started is signalled (started_group); a run started elsewhere is left to whoever started it."""
    root = inside(workspace, run_dir)
    record = LAUNCHED.get(root)
    pid = started_group(record)
    if pid is None:
        rd = RunDir(root)
        if rd.is_locked():
            holder = running_pid(rd, None)
            raise AppError(f"{run_dir} is running in a process this app did not start (from the command line, or "
                           "before the app was restarted): stop it where it runs"
                           + (f" (Ctrl-C, or kill {holder})" if holder else ""))
        raise AppError(f"{run_dir} is not running")
    with contextlib.suppress(ValueError, OSError):
        stored = read_json(root / PROCESS_FILE, {})
        atomic_write_json(root / PROCESS_FILE, {**(stored if isinstance(stored, dict) else {}), **record,
                                                "aborted": True})
    with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
        os.killpg(pid, signal.SIGTERM)  # start_new_session: the process group id is the pid
        deadline = time.time() + grace_s
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if started_group(record) == pid:
            os.killpg(pid, signal.SIGKILL)
    deadline = time.time() + 10  # an exiting process still holds its files; _record_exit then writes how it ended
    while (RunDir(root).is_locked() or _exit_code(root, pid) is None) and time.time() < deadline:
        time.sleep(0.05)
    finished = _exit_code(root, pid) == 0  # it ended on its own before the signal came (killed: minus the signal)
    with open_to_write(root / LOG_FILE, append=True) as log:
        log.write((f"\nabort from the app at {time.strftime('%Y-%m-%d %H:%M:%S')} came after the run had finished\n"
                   if finished else f"\naborted from the app at {time.strftime('%Y-%m-%d %H:%M:%S')}; Continue "
                   "picks it up\n").encode())
    if finished:
        return f"{run_dir} had finished before the abort reached it: nothing was stopped"
    return f"aborted {run_dir}; Continue resumes it from what is on disk"
