"""What the web app does, as plain functions: spin_lite.app.ui only lays these out on a page.

Everything here works on one workspace folder: uploads, configs, run directories and exports stay under it.
A typed path that resolves outside it is refused (AppError), and so is every path of a run (`resolved`: run_dir,
data files, a local model or adapter) on each way into one: start, continue, load, save and export. The app
never writes through a symlink (`open_to_write`: O_NOFOLLOW) and launches no run into a folder holding one.
Run directory names use RUN_NAME's characters only, since they go on the run's command line.
Runs are the CLI's: `start_run` takes the run directory's lock and launches `python -m spin_lite run CONFIG`,
which inherits and keeps it, in its own process group and session, cwd = the workspace, output appended
to RUN_DIR/run.log, so closing the page or the app does not stop it; `abort_run` kills that process group,
once it has checked that the app started it (`started_group`); `continue_run` launches the same command on
the run's own config.yaml, and the engine resumes from disk.
Progress, plots and tables are read back from the run directory through its contract, spin_lite.state.RunDir
(progress.json, state.json, the results table, the trained iterations, the adapters that make the model after
an iteration), so a run started from the CLI shows up the same way; run.log is only shown, never parsed for
progress.

Files the app adds to a run directory: app-launch.yaml (the config it launched), run.log, app-run.json
(pid, process start time, command, and how the process ended).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import yaml

from ..config import ConfigError, SpinConfig, load_config, settings_info
from ..config import choices as setting_choices
from ..data import DataError, encode_example, parse_row, read_rows
from ..model import EMBEDDED, ModelError
from ..state import RunDir, RunLockedError, atomic_write_json, found_better, read_json, read_jsonl

LAUNCH_CONFIG = "app-launch.yaml"
PROCESS_FILE = "app-run.json"
LOG_FILE = "run.log"
UPLOADS, EXPORTS, CONFIGS = "uploads", "exports", "configs"
# Values a setting may take where the config accepts a fixed set: its Literal type in spin_lite.config.
CHOICES = {key: list(values) for key, values in setting_choices().items()}
# A run directory name the app accepts: folders of letters, digits, "_", "." and "-", each starting with a letter,
# digit or "_" (no "=", spaces, quotes or "#", so no name can be read as a setting, an option or a YAML comment).
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


class AppError(ValueError):
    """A request the app refuses; the message is shown on the page as it is."""


USER_ERRORS = (AppError, ConfigError, DataError, ModelError, RunLockedError)


def user_message(error: BaseException) -> str:
    """The text the page shows for an error raised by a handler."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return ("out of memory: use a smaller model, load it in 4 bits (model.load_in_4bit), or lower the batch "
                f"sizes and data.max_length ({type(error).__name__}: {str(error)[:200]})")
    return f"unexpected error: {type(error).__name__}: {str(error)[:500]}"


# -- the workspace ---------------------------------------------------------------------------------------
def inside(workspace: str | Path, typed: str | Path) -> Path:
    """`typed` (relative to the workspace, or absolute) as an absolute path; refused if it leaves the workspace."""
    ws = Path(workspace).resolve()
    path = (ws / Path(str(typed).strip()).expanduser()).resolve()  # resolve(): ".." and symlinks followed
    if path != ws and ws not in path.parents:
        raise AppError(f"{typed} is outside the workspace {ws}; use a path inside it")
    return path


def run_name(workspace, typed: str | Path) -> str:
    """A run directory typed on the page, as its path relative to the workspace: inside it, not the workspace
    itself, and named with RUN_NAME's characters only, since the name goes into the run's command line."""
    ws = Path(workspace).resolve()
    path = inside(ws, typed)
    if path == ws:
        raise AppError("run_dir must be a folder inside the workspace, not the workspace itself")
    rel = path.relative_to(ws).as_posix()
    if not RUN_NAME.fullmatch(rel):
        raise AppError(f"run directory name {str(typed)!r}: use only letters, digits, '_', '.', '-' and '/' "
                       "(each folder name starting with a letter, digit or '_')")
    return rel


def open_to_write(path: Path, append: bool = False, new: bool = False):
    """`path` opened for writing in bytes, never through a symlink (O_NOFOLLOW): a link planted in the workspace
    cannot redirect the app's writes. `new`: fail with FileExistsError if anything has the name already."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC) | (os.O_EXCL if new else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AppError(f"{path} is a symbolic link; the app does not write through links") from None
        raise
    return open(fd, "ab" if append else "wb")


def refuse_links(workspace, root: Path):
    """A launched run writes anywhere under `root`; refuse a folder holding a symlink, which could send the
    writes outside the workspace."""
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into linked folders
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                link = (Path(folder) / name).relative_to(Path(workspace).resolve())
                raise AppError(f"{link} is a symbolic link; the app does not run into a folder holding links "
                               "(remove it, or choose another run_dir)")


def local_or_hub(workspace, value: str | None) -> str | None:
    """A model/data reference for use in this process: an existing local path made absolute, else the hub id."""
    if value is None or value == EMBEDDED:
        return value
    path = inside(workspace, value)
    return str(path) if path.exists() else value


# Every setting naming a file or folder that a run reads (run_dir aside); each must be inside the workspace.
LOCAL_PATHS = {"model": ("name", "adapter"), "data": ("path", "eval_path", "val_path")}


def resolved(workspace, cfg: SpinConfig) -> SpinConfig:
    """A copy of `cfg` whose local paths are absolute (the app's process does not run in the workspace). This
    is the app's one confinement check: AppError for any path of the run outside the workspace."""
    sections = {}
    for name, keys in LOCAL_PATHS.items():
        section = getattr(cfg, name)
        sections[name] = dataclasses.replace(section, **{k: local_or_hub(workspace, getattr(section, k))
                                                         for k in keys if hasattr(section, k)})
    return dataclasses.replace(cfg, run_dir=str(inside(workspace, cfg.run_dir)), **sections)


def save_upload(workspace, uploaded: str | Path) -> str:
    """Copy an uploaded file into WORKSPACE/uploads/ (a new name if a different file has its name); the
    relative path to put in the config."""
    source = Path(uploaded)
    folder = inside(workspace, UPLOADS)
    folder.mkdir(parents=True, exist_ok=True)
    content = source.read_bytes()
    for n in itertools.count():
        target = folder / (source.name if n == 0 else f"{source.stem}-{n}{source.suffix}")
        if target.is_symlink():  # a planted link (dangling or not) is neither read nor written through
            continue
        if target.exists():
            if target.read_bytes() == content:
                break
            continue
        try:
            with open_to_write(target, new=True) as f:
                f.write(content)
            break
        except FileExistsError:  # the name was taken meanwhile
            continue
    return str(target.relative_to(Path(workspace).resolve()))


# -- the settings form: built from the config dataclasses ----------------------------------------------------
@dataclasses.dataclass
class Setting:
    key: str
    """Name as in the YAML file and the CLI overrides: `iterations`, `train.beta`."""
    kind: str
    """bool, int, float, str, optional-int, optional-str, or yaml (a number or a list, typed as YAML)."""
    default: object
    help: str
    choices: list | None = None


KINDS = {bool: "bool", int: "int", float: "float", str: "str", int | None: "optional-int", str | None: "optional-str"}


def settings() -> list[Setting]:
    """Every config setting, in the config's order, with its default and its documentation (spin_lite.config's
    settings_info: types, defaults, docstrings and allowed values, computed once)."""
    return [Setting(s.key, "str" if s.choices else KINDS.get(s.type, "yaml"), s.default, s.help,
                    list(s.choices) if s.choices else None) for s in settings_info()]


def yaml_value(value) -> str:
    """A value as one line of YAML, the way `key=value` overrides are parsed (5e-05 -> 5.0e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def form_values(cfg: SpinConfig) -> list:
    """`cfg` as the form's values, in settings() order."""
    data = cfg.to_dict()
    values = []
    for s in settings():
        value = data
        for part in s.key.split("."):
            value = value[part]
        if s.kind == "yaml":
            value = yaml_value(value)
        elif s.kind.startswith("optional"):
            value = "" if value is None else str(value)
        values.append(value)
    return values


def config_from_form(values: list) -> SpinConfig:
    """The form's values (settings() order) as a checked config; ConfigError lists every problem."""
    data: dict = {}
    for s, value in zip(settings(), values):
        if s.kind == "yaml":
            value = _parse_yaml_field(s.key, value)
        elif s.kind == "optional-str":
            value = value if isinstance(value, str) and value.strip() else None  # spaces may matter (a regex)
        elif s.kind == "optional-int":
            value = _optional_int(value)
        elif s.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif s.kind == "str" and isinstance(value, str):
            value = value.strip()
        node = data
        *parents, leaf = s.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return SpinConfig.from_dict(data)


def _optional_int(text):
    """An optional integer typed in a text box: empty is None; anything else not an integer is left for the
    config's check to report."""
    text = str(text).strip() if text is not None else ""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _parse_yaml_field(key: str, text) -> object:
    if not isinstance(text, str):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid configuration:\n  - {key} is not valid YAML: {e}") from None
    if isinstance(value, str):  # "5e-5": YAML 1.1 reads a float without a dot as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def cli_overrides(cfg: SpinConfig) -> list[str]:
    """`key=value` overrides that turn the default config into `cfg`."""
    defaults = form_values(SpinConfig())
    out = []
    for s, value, default in zip(settings(), form_values(cfg), defaults):
        if value != default:
            if s.kind == "yaml":
                text = value
            elif s.kind.startswith("optional"):
                text = value if s.kind == "optional-int" or value == "" else yaml_value(value)
            else:
                text = yaml_value(value)
            out.append(f"{s.key}={text}")
    return out


def cli_command(workspace, cfg: SpinConfig) -> str:
    """The shell command that runs `cfg` without the app."""
    args = " ".join(shlex.quote(o) for o in cli_overrides(cfg))
    return f"cd {shlex.quote(str(Path(workspace).resolve()))}\nspin-lite run {args}".rstrip()


def save_config(workspace, cfg: SpinConfig, path: str) -> Path:
    target = inside(workspace, path)
    if target.suffix not in (".yaml", ".yml"):
        raise AppError(f"{path}: a config file name ends in .yaml")
    resolved(workspace, cfg)  # a config whose paths leave the workspace is not saved
    if (Path(workspace).resolve() / str(path).strip()).is_symlink():  # inside() looked through it
        raise AppError(f"{path} is a symbolic link; the app does not write through links")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_to_write(target) as f:
        f.write(cfg.to_yaml().encode("utf-8"))
    return target


def open_config(workspace, path: str) -> SpinConfig:
    """A config file from the workspace (a run directory stands for its config.yaml)."""
    target = inside(workspace, path)
    if target.is_dir():
        target = target / "config.yaml"
    cfg = load_config(target)
    resolved(workspace, cfg)  # nor loaded into the form
    return cfg


# -- data preview ---------------------------------------------------------------------------------------------
PREVIEW_RAW_CHARS = 300  # of one raw row in the preview: enough to recognise the fields


def raw_columns(row) -> str:
    """A data row as the file has it, one `column: value` line per column (values cut to PREVIEW_RAW_CHARS)."""
    if not isinstance(row, dict):
        return repr(row)[:PREVIEW_RAW_CHARS]
    lines = []
    for key, value in row.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        lines.append(f"{key}: {text if len(text) <= PREVIEW_RAW_CHARS else text[:PREVIEW_RAW_CHARS] + '…'}")
    return "\n".join(lines)


def preview_data(workspace, cfg: SpinConfig, rows: int = 5) -> tuple[list[dict], str]:
    """The first `rows` rows as the file has them (`raw columns`) beside what the model sees (the chat template
    applied), and a message on the data: its row count, its columns and the format read from them.

    A row that cannot be used shows its error in the `problem` column.
    """
    from ..data import row_format
    from ..model import load_tokenizer

    cfg = resolved(workspace, cfg)
    tokenizer = load_tokenizer(cfg.model)
    raw = read_rows(cfg.data.path, cfg.data.split)
    table, bad = [], 0
    for i, row in enumerate(raw[:rows]):
        line = {"row": i, "raw columns": raw_columns(row)}
        try:
            enc = encode_example(parse_row(row, i, cfg.data), tokenizer, cfg.data)
        except ValueError as e:
            bad += 1
            table.append(line | {"prompt": "", "response": "", "prompt_tokens": 0, "response_tokens": 0,
                                 "problem": str(e)})
            continue
        notes = [n for n, cut in (("prompt cut to data.max_prompt_length", enc.prompt_truncated),
                                  ("response cut to data.max_length", enc.response_truncated)) if cut]
        table.append(line | {"prompt": tokenizer.decode(enc.prompt_ids), "response": tokenizer.decode(enc.response_ids),
                             "prompt_tokens": len(enc.prompt_ids), "response_tokens": len(enc.response_ids),
                             "problem": "; ".join(notes)})
    message = f"{len(raw)} rows in {cfg.data.path}"
    if raw and isinstance(raw[0], dict):
        try:
            shape = f"read as {row_format(raw[0], cfg.data)}"
        except ValueError:
            shape = "in no format spin_lite reads"
        message += f"; columns {', '.join(raw[0])} ({shape}, data.format: {cfg.data.format})"
    message += f"; the first {len(table)} as the file has them and as the model sees them."
    if bad:
        message += (f" {bad} of them cannot be used (see the problem column); set data.skip_bad_rows to skip "
                    "such rows, or fix the data, data.format or the field names (data.messages_field, "
                    "data.prompt_field, data.response_field).")
    return table, message


def estimate_time(workspace, cfg: SpinConfig) -> str:
    """Each stage's estimated time for this config on this machine (spin_lite.estimate), as a markdown table."""
    from ..estimate import estimate_run, fmt_s

    stages, line = estimate_run(resolved(workspace, cfg), log=lambda *_: None)
    rows = ["| stage | work per iteration | iteration 0 | each later iteration |", "|---|---|---|---|"]
    rows += [f"| {s.stage} | {s.work} | {fmt_s(s.first_s)} | {fmt_s(s.later_s)} |" for s in stages]
    return "\n".join(rows) + f"\n\nEstimate: {line}."


# -- run directories ------------------------------------------------------------------------------------------
def list_runs(workspace, depth: int = 3) -> list[str]:
    """Run directories under the workspace (relative paths, sorted): folders with a config.yaml and a
    state.json, or launched by the app."""
    ws = Path(workspace).resolve()
    found = []
    for root, dirs, files in os.walk(ws):
        rel = Path(root).relative_to(ws)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("node_modules", "site-packages")
                         and not d.startswith("iter-") and len(rel.parts) < depth)
        if ("config.yaml" in files and "state.json" in files) or LAUNCH_CONFIG in files:
            found.append(str(rel))
            dirs[:] = []
    return sorted(found)


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
    engine's state, iterations done and configured, and the app's process record."""
    root = inside(workspace, run_dir)
    rd = RunDir(root)
    state, proc = rd.state(), read_json(root / PROCESS_FILE, {})
    config = read_yaml(root / "config.yaml") or read_yaml(root / LAUNCH_CONFIG) or {}
    running = _alive(proc.get("pid")) or rd.is_locked()
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
           "pid": proc.get("pid") if running else None, "returncode": proc.get("returncode"), "error": None,
           "best_iteration": rd.best_iteration(), "chosen": rd.chosen_model(),
           "stopped_by_rule": ended_by_rule and not running}
    if status == "failed":
        out["error"] = last_error(root / LOG_FILE, proc.get("returncode"))
    return out


def read_yaml(path: Path) -> dict | None:
    """A YAML mapping from a file, or None (no file, not YAML, not a mapping, not text)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


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


def runs_overview(workspace) -> list[dict]:
    rows = []
    for run in list_runs(workspace):
        s = run_status(workspace, run)
        rows.append({"run_dir": run, "status": s["status"],
                     "iterations": f"{s['iterations_done']}/{s['iterations'] if s['iterations'] else '?'}",
                     "stage": s["stage"] or "",
                     "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["updated"])) if s["updated"] else ""})
    return rows


def start_run(workspace, cfg: SpinConfig) -> str:
    """Check `cfg` and launch it; refuses (AppError) a run directory in use, a run directory started with
    other settings, a folder that is not a run directory, and data or a model that cannot be loaded."""
    from ..data import load_splits
    from ..model import load_tokenizer
    from ..preflight import check_model

    cfg.validate()
    rel = run_name(workspace, cfg.run_dir)
    full = resolved(workspace, cfg)
    root = Path(full.run_dir)
    _refuse_if_running(workspace, rel)
    if (root / "config.yaml").exists():
        changed = RunDir(root).changed_settings(cfg.to_dict())
        if changed:
            raise AppError(f"run directory {cfg.run_dir} was started with other settings (changed: "
                           + ", ".join(changed) + "). Choose a new run_dir, or Continue it with its own settings.")
    elif root.exists() and any(root.iterdir()) and not (root / LAUNCH_CONFIG).exists():
        raise AppError(f"{cfg.run_dir} exists and is not a run directory; choose a new run_dir")
    check_model(full)  # model, adapter, LoRA targets, data: errors here, before launching
    load_splits(full.data, load_tokenizer(full.model), full.seed)
    root.mkdir(parents=True, exist_ok=True)
    refuse_links(workspace, root)
    lock = _take(root, rel)
    try:
        with open_to_write(root / LAUNCH_CONFIG) as f:
            f.write(cfg.to_yaml().encode("utf-8"))
        return _launch(workspace, root, ["run", f"{rel}/{LAUNCH_CONFIG}"], lock)
    finally:
        lock.close()  # the run's process holds its own copy


def continue_run(workspace, run_dir: str, iterations: int | None = None, stop_patience: int | None = None) -> str:
    """Launch the run again on its own config (the engine skips what is on disk); `iterations` raises the total,
    `stop_patience` lets a run the stop rule ended go on."""
    from ..preflight import check_model

    rel = run_name(workspace, run_dir)
    root = Path(workspace).resolve() / rel
    _refuse_if_running(workspace, rel)
    config = root / "config.yaml" if (root / "config.yaml").exists() else root / LAUNCH_CONFIG
    if not config.exists():
        raise AppError(f"{run_dir} is not a run directory (no config.yaml); start a run with the Setup settings")
    overrides = ([f"run_dir={rel}"] + ([f"iterations={int(iterations)}"] if iterations else [])
                 + ([f"train.stop_patience={int(stop_patience)}"] if stop_patience else []))
    cfg = load_config(config, overrides)  # a broken config file is reported here, not in the log
    rd = RunDir(root)
    if rd.stopped(cfg):
        raise AppError(f"the stop rule ended {run_dir} {rd.stop_reason(cfg)}: set a higher stop patience for "
                       "Continue to go on")
    check_model(resolved(workspace, cfg))  # its paths confined like a new run's (a config may have been saved)
    refuse_links(workspace, root)
    lock = _take(root, rel)
    try:
        return _launch(workspace, root, ["run", config.relative_to(Path(workspace).resolve()).as_posix(),
                                         *overrides], lock)
    finally:
        lock.close()


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


def _launch(workspace, root: Path, args: list[str], lock) -> str:
    """Start `python -m spin_lite ARGS` in its own session, cwd = workspace, output appended to run.log; the
    process inherits `lock` (the run directory's, taken by the caller) and adopts it (spin_lite.state)."""
    command = [sys.executable, "-m", "spin_lite", *args]
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding spin_lite/
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPIN_LITE_LOCK_FD": str(lock.fileno()),
           "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    with open_to_write(root / LOG_FILE, append=True) as log:
        log.write(f"\n{LAUNCH_MARK}{shlex.join(args)}    # started by the app, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode("utf-8"))
        log.flush()
        proc = subprocess.Popen(command, cwd=Path(workspace).resolve(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                pass_fds=(lock.fileno(),))
    atomic_write_json(root / PROCESS_FILE, {"pid": proc.pid, "command": ["spin-lite", *args],
                                            "started": time.time(), "process_start": _process_start(proc.pid)})
    threading.Thread(target=_record_exit, args=(proc, root), daemon=True).start()
    return f"started `spin-lite {shlex.join(args)}` (process {proc.pid}); it goes on if you close the page"


LAUNCH_MARK = "$ spin-lite "


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
    record = read_json(root / PROCESS_FILE, {})
    if record.get("pid") == proc.pid:
        atomic_write_json(root / PROCESS_FILE, {**record, "returncode": code, "ended": time.time()})
    proc.wait()


def started_group(record: dict) -> int | None:
    """The process group the app started for a run (its app-run.json `record`), while it runs; else None.

    Only a group that passes every check is ever signalled: a pid above 1 that is neither the app nor its
    own group, still a spin_lite process (or its zombie), the leader of its own group (start_new_session),
    and started when the record says (a reused pid fails this)."""
    pid = record.get("pid")
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


def abort_run(workspace, run_dir: str, grace_s: float = 10.0) -> str:
    """Stop a running run: SIGTERM to its process group, SIGKILL after `grace_s`. Everything on disk is
    written atomically, so Continue picks up from the last finished batch or checkpoint. Only a run the app
    started is signalled (started_group); a run started elsewhere is left to whoever started it."""
    root = inside(workspace, run_dir)
    record = read_json(root / PROCESS_FILE, {})
    pid = started_group(record)
    if pid is None:
        rd = RunDir(root)
        if rd.is_locked():
            holder = rd.lock_holder()
            raise AppError(f"{run_dir} is running in a process the app did not start"
                           + (f" (process {holder}): stop it where it runs (Ctrl-C, or kill {holder})"
                              if holder else ""))
        raise AppError(f"{run_dir} is not running")
    atomic_write_json(root / PROCESS_FILE, {**record, "aborted": True})
    with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
        os.killpg(pid, signal.SIGTERM)  # start_new_session: the process group id is the pid
        deadline = time.time() + grace_s
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if started_group(record) == pid:
            os.killpg(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while RunDir(root).is_locked() and time.time() < deadline:  # an exiting process still holds its files
        time.sleep(0.05)
    with open_to_write(root / LOG_FILE, append=True) as log:
        log.write(f"\naborted from the app at {time.strftime('%Y-%m-%d %H:%M:%S')}; Continue picks it up\n".encode())
    return f"aborted {run_dir}; Continue resumes it from what is on disk"


# -- what a run shows: progress, per-step and per-iteration metrics, log -----------------------------------------
def log_lines(log: Path, n: int = 40) -> list[str]:
    """The last `n` lines of a log, each tqdm bar reduced to its latest state."""
    if not log.exists():
        return []
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 256_000))
        text = f.read().decode("utf-8", errors="replace")
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip("\r\n").split("\n")][-n:]


def progress(workspace, run_dir: str) -> dict | None:
    """The running stage's progress, as the run writes it (RunDir.read_progress: progress.json): iteration,
    stage (generate, score, train, evaluate val, evaluate test), done, total, rate (units a second), updated;
    plus `unit` and `remaining_s` (None while unknown). None before the run has written any."""
    p = RunDir(inside(workspace, run_dir)).read_progress()
    if not p.get("stage"):
        return None
    done, total, rate = p.get("done") or 0, p.get("total"), p.get("rate")
    remaining = (total - done) / rate if rate and total is not None else None
    return {**p, "done": done, "unit": STAGE_UNITS.get(p["stage"].split()[0], "items"), "remaining_s": remaining}


# What one unit of a stage's progress counts (spin_lite.run: SpinRun.generate, score, train, _evaluate).
STAGE_UNITS = {"generate": "batches", "score": "sequences", "train": "steps", "evaluate": "prompts"}


def step_metrics(workspace, run_dir: str) -> list[dict]:
    """One row per optimizer step of every iteration, from the train_log.jsonl files: iteration, step (within
    the iteration), global_step (1, 2, ... over all iterations in order), loss, margin, accuracy."""
    rd = RunDir(inside(workspace, run_dir))
    rows = []
    for folder in sorted(rd.root.glob("iter-[0-9][0-9]")):
        for r in read_jsonl(folder / "train_log.jsonl"):
            rows.append({"iteration": int(folder.name[5:]), "step": r["step"], "global_step": len(rows) + 1,
                         "loss": r["loss"], "margin": r["margin"], "accuracy": r["accuracy"]})
    return rows


def iteration_metrics(workspace, run_dir: str) -> list[dict]:
    """RunDir.results_table: one row for the starting model, one per complete iteration (test metrics, val_*
    validation metrics, train_loss, train_accuracy, best, selection), for the plots."""
    rd = RunDir(inside(workspace, run_dir))
    return rd.results_table(rd.settings())


def results_rows(workspace, run_dir: str) -> list[dict]:
    """The results table as the page shows it: spin-lite table's columns with their plain names, values rounded
    to 3 decimals, `chosen` on the iteration chosen on the validation rows, and the stop rule's reasons on an
    iteration it rejected or did not find clearly better."""
    from ..run import TABLE_COLUMNS

    rows = iteration_metrics(workspace, run_dir)
    columns = [(key, title) for key, title, _ in TABLE_COLUMNS if any(r.get(key) is not None for r in rows)]
    table = []
    for r in rows:
        line = {title: (round(r[key], 3) if isinstance(r.get(key), float) else r.get(key)) for key, title in columns}
        line["chosen"] = "best" if r.get("best") else ""
        s = r.get("selection") or {}
        line["validation"] = ("" if not s or found_better(s) else
                              ("rejected: not better than " if s["accepted"] is False else "not clearly better than ")
                              + f"{s['compared_with']} (" + "; ".join(s["reasons"]) + ")"
                              + ("; run stopped" if r.get("stopped") else ""))
        table.append(line)
    return table


def metrics_signature(workspace, run_dir: str) -> str:
    """Changes whenever the files behind step_metrics and iteration_metrics change (names, sizes, times)."""
    root = inside(workspace, run_dir)
    files = [root / "eval-start.json", root / "config.yaml",  # (its stop settings decide the "run stopped" note)
             *sorted(root.glob("iter-[0-9][0-9]/train_log.jsonl")),
             *sorted(root.glob("iter-[0-9][0-9]/summary.json")),
             root / "eval-base.json", *sorted(root.glob("control-[0-9][0-9]/summary.json"))]  # SFT stage, control arm
    return str(root) + "".join(f"|{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                               for p in files if p.exists())


def run_log(workspace, run_dir: str, n: int = 40) -> str:
    return "\n".join(log_lines(inside(workspace, run_dir) / LOG_FILE, n))


# -- inspect ------------------------------------------------------------------------------------------------
def sample_sets(workspace, run_dir: str) -> list[str]:
    """Held-out sample sets of a run: "start" (the starting model) and "iter N" for each evaluated iteration."""
    root = inside(workspace, run_dir)
    sets = ["start"] if (root / "eval-start.json").exists() else []
    return (sets + [f"iter {int(p.parent.name[5:])}" for p in sorted(root.glob("iter-[0-9][0-9]/samples.jsonl"))]
            + [f"control {int(p.parent.name[8:])}" for p in sorted(root.glob("control-[0-9][0-9]/samples.jsonl"))])


def samples(workspace, run_dir: str, which: str, query: str = "") -> list[dict]:
    """Held-out samples side by side (prompt, real, opponent, model), those containing `query` (any case)."""
    root = inside(workspace, run_dir)
    if which == "start":
        rows = (read_json(root / "eval-start.json") or {}).get("samples", [])
    else:
        rows = read_jsonl(_folder(RunDir(root), which) / "samples.jsonl")
    columns = ("prompt", "real", "opponent", "model")
    table = [{c: r.get(c) or "" for c in columns} for r in rows]
    q = query.strip().lower()
    return [r for r in table if not q or any(q in r[c].lower() for c in columns)]


# Turn markers of the common chat templates: (start of a turn with its role, end of the role, end of a turn).
TEMPLATES = [re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML (SmolLM2, Qwen)
             re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),  # Llama 3
             re.compile(r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>|$)", re.S)]  # Gemma


def prompt_turns(text: str) -> list[dict]:
    """A prompt rendered by its chat template, back as turns [{role, content}]: ChatML, Llama 3 and Gemma
    markers are read; other text is one user turn. The generation prompt's empty assistant turn is dropped."""
    for template in TEMPLATES:
        turns = [{"role": m[1], "content": m[2].strip()} for m in template.finditer(text)]
        if turns:
            return [t for i, t in enumerate(turns) if t["content"] or i < len(turns) - 1]
    return [{"role": "user", "content": text}]


def summary(workspace, run_dir: str, which: str) -> dict:
    """summary.json of an iteration, or the starting model's held-out metrics."""
    root = inside(workspace, run_dir)
    if which == "start":
        return {"model": "start", "eval": (read_json(root / "eval-start.json") or {}).get("metrics")}
    return read_json(_folder(RunDir(root), which) / "summary.json") or {}


def _iteration(which) -> int:
    return int(str(which).split()[-1])


def _folder(rd: RunDir, which: str) -> Path:
    """The folder of "iter N" or "control N" (SFT continued, the control matched to iteration N)."""
    return (rd.control if str(which).startswith("control") else rd.iteration)(_iteration(which))


def trained_iterations(workspace, run_dir: str) -> list[int]:
    """Iterations of a run with a trained adapter (RunDir.trained_iterations)."""
    return RunDir(inside(workspace, run_dir)).trained_iterations()


def model_menus(workspace, run_dir: str) -> dict[str, tuple[list[tuple[str, str]], str | None]]:
    """The model menus of Inspect, Compare and Export: {"inspect" | "compare" | "export": (choices, value)}. A
    choice is (label, value): the label as RunDir.model_label names the model ("iter 1 (chosen)", "start (chosen)",
    "iter 3 (rejected by the stop rule)"), the value "start" or "iter N" as the other handlers read it. Every menu
    opens on the model the run chose (RunDir.resolve_model); Export opens on "best", which resolves to it."""
    rd = RunDir(inside(workspace, run_dir))
    chosen, trained = rd.resolve_model("best"), rd.trained_iterations()
    value = lambda n: n if isinstance(n, str) else "start" if n < 0 else f"iter {n}"  # (a str: "control N")
    option = lambda n: (rd.model_label(n), value(n))
    inspect = [option(s if s.startswith("control") else -1 if s == "start" else _iteration(s))
               for s in sample_sets(workspace, run_dir)]
    controls = [option(f"control {t}") for t in rd.trained_controls()]  # SFT continued, beside the iterations
    compare = [option(-1)] + [option(t) for t in trained] + controls if trained else []
    cfg = rd.settings()
    export = [option(t) for t in trained] + controls
    if trained and (chosen == -1 or (cfg is not None and rd.start_adapter(cfg))):  # (the base alone: nothing to export)
        export.insert(0, option(-1))
    if trained:
        picked = rd.model_label(chosen) + ("" if rd.best_iteration() is not None else ": nothing chosen, the last")
        export.insert(0, (f"best = {picked}", "best"))
    opened = lambda options: (options, value(chosen) if value(chosen) in [v for _, v in options]
                              else options[-1][1] if options else None)
    return {"inspect": opened(inspect), "compare": opened(compare), "export": (export, "best" if export else None)}


# -- compare: chat with the starting model and an iteration's model --------------------------------------------
def run_config(workspace, run_dir: str) -> SpinConfig:
    rel = run_name(workspace, run_dir)
    root = Path(workspace).resolve() / rel
    if not (root / "config.yaml").exists():
        raise AppError(f"{run_dir} has no config.yaml yet")
    return resolved(workspace, load_config(root / "config.yaml", [f"run_dir={rel}"]))


def chat_model(workspace, run_dir: str, which: str):
    """(model, tokenizer): "start" is the run's starting model, "iter N" the model after iteration N, with the
    adapters RunDir.adapters_after names, built by model.build_model for inference."""
    cfg = run_config(workspace, run_dir)
    rd = RunDir(cfg.run_dir)
    n = -1 if which == "start" else _iteration(which)
    if str(which).startswith("control"):  # SFT continued: its adapter stands alone
        if n not in rd.trained_controls():
            raise AppError(f"control {n} of {run_dir} has no trained adapter")
        adapters = (str(rd.control(n) / "adapter"),)
    elif n >= 0 and n not in rd.trained_iterations():
        raise AppError(f"iteration {n} of {run_dir} has no trained adapter")
    else:
        adapters = tuple(rd.adapters_after(n, cfg.mode, rd.start_adapter(cfg)))
    stamp = tuple(os.path.getmtime(Path(a) / "adapter_config.json") if Path(a).exists() else 0 for a in adapters)
    with _LOADING:
        return _load_chat_model(dataclasses.astuple(cfg.model), cfg.mode, adapters, stamp)


# The two chats load their models at the same time; transformers' loading is not thread-safe (its
# weight-initialisation switches are process-wide), and two loads at once gave a model random weights.
_LOADING = threading.Lock()


@lru_cache(maxsize=2)  # the two models side by side stay loaded between messages
def _load_chat_model(model_fields: tuple, mode: str, adapters: tuple, stamp: tuple):
    from ..config import LoraSettings, ModelConfig
    from ..model import build_model, load_base, load_tokenizer

    model_cfg = ModelConfig(*model_fields)
    # transformers + peft whatever backend the run trained on: an Unsloth model carries one adapter only
    model = build_model(load_base(model_cfg, backend="hf"), LoraSettings(), list(adapters), mode, trainable=False,
                        log=lambda *_: None)  # LoraSettings: read only for a trainable adapter
    return model.eval(), load_tokenizer(model_cfg)


def chat_reply(workspace, run_dir: str, which: str, messages: list[dict], max_new_tokens: int = 128) -> Iterator[str]:
    """The model's answer to a chat, greedy, streamed: yields the text so far."""
    import torch
    from transformers import TextIteratorStreamer

    from ..data import encode_prompt

    model, tokenizer = chat_model(workspace, run_dir, which)
    prompt = torch.tensor([encode_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    failure = []

    def generate():
        try:
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=streamer,
                               max_new_tokens=int(max_new_tokens), do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        except Exception as e:  # reported to the page below, after the streamer is released
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if failure:
        raise failure[0]
    if not text:
        yield ""


# -- export: the CLI's `spin-lite export`, in its own process ------------------------------------------------------
EXPORT_KINDS = ("adapter", "merged", "gguf")


def model_number(workspace, run_dir: str, which) -> int:
    """The iteration a menu's value names, -1 for the starting model: "best" and "start" as RunDir.resolve_model
    reads them, "iter N" or N."""
    text = str(which).strip()
    if text.startswith("control"):  # "control N": SFT continued (returned as that name)
        return RunDir(inside(workspace, run_dir)).resolve_model(text)
    if text in ("best", "start"):
        return RunDir(inside(workspace, run_dir)).resolve_model(text)
    found = re.fullmatch(r"(?:iter )?(\d{1,4})", text)
    if not found:
        raise AppError(f"unknown model {str(which)[:40]!r}: best, start, or an iteration (iter N)")
    return int(found[1])


def export_note(workspace, run_dir: str, which) -> str:
    """What the Export page says about exporting `which` before and after: a warning when the stop rule rejected
    it, and what "the starting model" is when that was chosen; "" otherwise."""
    rd = RunDir(inside(workspace, run_dir))
    n = model_number(workspace, run_dir, which)
    if isinstance(n, str):
        return (f"{n} is SFT continued, the control arm: the starting model trained by SFT for as many steps as "
                f"SPIN iterations 0..{_iteration(n)}" + (", chosen on the validation rows over SPIN's choice."
                                                          if n == rd.chosen_model() else "."))
    if n >= 0:
        return f"**Warning: {rd.rejection(n)}.**" if rd.rejection(n) else ""
    cfg, chosen = rd.settings(), rd.best_iteration() == -1
    said = "The stop rule chose the starting model: no iteration was better on the validation rows. " if chosen else ""
    if cfg is not None and cfg.model.adapter:
        return said + f"It is the base with your starting adapter `{cfg.model.adapter}`, which this exports."
    return said + ("It is the base model itself, so there is nothing trained to export: use the base as it is, or "
                   "choose an iteration to export it anyway.")


def export(workspace, run_dir: str, iteration: int | str, kind: str = "adapter", *, dtype: str = "bfloat16",
           gguf_type: str = "q8_0", push_repo: str | None = None, token: str | None = None, private: bool = False,
           timeout_s: float = 3600) -> Path:
    """Export a model (`iteration`: a menu value, model_number; "best": the chosen one) under WORKSPACE/exports/:
    the adapter (a zip), the merged model (a folder, weights in `dtype`) or one GGUF file of `gguf_type` (llama.cpp,
    Ollama); with `push_repo`, also upload it to that Hub model repository (`token`, else HF_TOKEN or the saved
    login).

    Runs `spin-lite export` (spin_lite.export) in a child process in the workspace, like a run: the run's
    relative paths resolve there, and merging a large model does not load it into the app's process. The token
    reaches it in its environment, never on its command line (which other users of the machine can read).
    """
    if kind not in EXPORT_KINDS:
        raise AppError(f"unknown export kind {kind!r}: one of {', '.join(EXPORT_KINDS)}")
    ws = Path(workspace).resolve()
    run_dir = run_name(workspace, run_dir)
    run_config(workspace, run_dir)  # the model it reads: inside the workspace, like a run's
    n = model_number(workspace, run_dir, iteration)
    control = n if isinstance(n, str) else None  # "control N": SFT continued
    n = -2 if control else n  # (below: neither the start nor an iteration)
    if n >= 0 and n not in trained_iterations(workspace, run_dir):
        raise AppError(f"iteration {n} of {run_dir} has no trained adapter to export")
    push_repo = (push_repo or "").strip() or None
    if push_repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", push_repo):
        raise AppError(f"Hub repository {push_repo!r} is not of the form OWNER/NAME")
    suffix = {"adapter": "adapter", "merged": f"merged-{dtype}", "gguf": f"gguf-{gguf_type}"}[kind]
    model = f"control-{_iteration(control):02d}" if control else f"iter-{n:02d}" if n >= 0 else "start"
    name = f"{Path(run_dir).name}-{model}-{suffix}"
    out = inside(workspace, Path(EXPORTS) / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    for written in out.parent.glob(name + "*"):  # the folder, its .tmp-PID/.old siblings and the zip
        if written.is_symlink():
            raise AppError(f"{written.relative_to(ws)} is a symbolic link; the app does not export through links")
    asked = ("best" if str(iteration).strip() == "best" else f"control-{_iteration(control)}" if control
             else str(n) if n >= 0 else "start")  # (the CLI's words on "best")
    args = ["export", run_dir, "--iteration", asked, "--out", str(out.relative_to(ws))]
    args += {"adapter": [], "merged": ["--merged", "--dtype", dtype], "gguf": ["--gguf", gguf_type]}[kind]
    args += ["--push-to-hub", push_repo] + (["--private"] if private else []) if push_repo else []
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding spin_lite/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    if token and token.strip():
        env["HF_TOKEN"] = token.strip()
    done = subprocess.run([sys.executable, "-m", "spin_lite", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AppError(last_error_text(done.stderr) or f"spin-lite export failed with exit code {done.returncode}")
    if kind == "merged":
        return out
    if kind == "gguf":
        return next(out.glob("*.gguf"))
    return Path(shutil.make_archive(str(out), "zip", root_dir=out))


def last_error_text(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else None
