"""The app's one folder: every path the page types is confined to the workspace, and the app writes only there.

A typed path that resolves outside it is refused (AppError), and so is every path of a run (`resolved`: run_dir,
data files, a local model or adapter) on each way into one: start, continue, load, save and export. The app
never writes through a symlink (`open_to_write`: O_NOFOLLOW) and launches no run into a folder holding one
(`refuse_links`). Run directory names use RUN_NAME's characters only, since they go on the run's command line.
A name no file system takes (a null character, a name over NAME_MAX bytes) is refused by name here too, before
the operating system answers it with an error that reads as a crash.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import re
from pathlib import Path

from ..config import ConfigError, SpinConfig, load_config
from ..data import DataError
from ..model import EMBEDDED, ModelError
from ..records import RunRecordError
from ..state import LinkError, RunLockedError

UPLOADS, EXPORTS, CONFIGS = "uploads", "exports", "configs"
# The app's own folders, which hold files and never a run (a run directory named inside one is refused).
APP_FOLDERS = (UPLOADS, EXPORTS)
# A run directory name the app accepts: folders of letters, digits, "_", "." and "-", each starting with a letter,
# digit or "_" (no "=", spaces, quotes or "#", so no name can be read as a setting, an option or a YAML comment).
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
NAME_MAX, PATH_MAX = 255, 4096  # bytes in one file or folder name, and in a whole path (Linux; macOS: 255, 1024)
# Every setting naming a file or folder that a run reads (run_dir aside); each must be inside the workspace.
LOCAL_PATHS = {"model": ("name", "adapter"), "data": ("path", "eval_path", "val_path")}


class AppError(ValueError):
    """A request the app refuses; the message is shown on the page as it is."""


MAX_MESSAGE = 4000  # characters of one error message on the page: a message quoting huge values is cut
USER_ERRORS = (AppError, ConfigError, DataError, LinkError, ModelError, RunLockedError, RunRecordError)


def user_message(error: BaseException) -> str:
    """The text the page shows for an error raised by a handler (at most MAX_MESSAGE characters)."""
    if isinstance(error, USER_ERRORS):
        text = str(error)
        return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + f" ... ({len(text) - MAX_MESSAGE:,} more characters)"
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return ("out of memory: use a smaller model, load it in 4 bits (model.load_in_4bit), or lower the batch "
                f"sizes and data.max_length ({type(error).__name__}: {str(error)[:200]})")
    return f"unexpected error: {type(error).__name__}: {str(error)[:500]}"


def error_md(error: BaseException) -> str:
    """The error line the page shows under the button that was clicked (markdown, class spin-error)."""
    return f"<span class='spin-error'>**Error:** {user_message(error)}</span>"


def shown(typed, n: int = 80) -> str:
    """A typed value as a message quotes it: cut to `n` characters (a 5,000-character name is not repeated)."""
    text = str(typed)
    return repr(text if len(text) <= n else text[:n] + "...")


def inside(workspace: str | Path, typed: str | Path) -> Path:
    """`typed` (relative to the workspace, or absolute) as an absolute path; refused if it leaves the workspace,
    or if no file system could hold it (a null character, an over-long name)."""
    text = str(typed).strip()
    if "\0" in text:
        raise AppError(f"{shown(typed)} holds a null character, which no file or folder name can hold")
    if len(text.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in Path(text).parts):
        raise AppError(f"{shown(typed)} is too long for a path: at most {NAME_MAX} bytes a file or folder name, "
                       f"{PATH_MAX} in all")
    ws = Path(workspace).resolve()
    path = (ws / Path(text).expanduser()).resolve()  # resolve(): ".." and symlinks followed
    if path != ws and ws not in path.parents:
        raise AppError(f"{text if len(text) <= 200 else shown(text)} is outside the workspace {ws}; "
                       "use a path inside it")
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
        raise AppError(f"run directory name {shown(typed)}: use only letters, digits, '_', '.', '-' and '/' "
                       "(each folder name starting with a letter, digit or '_')")
    if rel.split("/")[0] in APP_FOLDERS:
        raise AppError(f"run directory {shown(typed)} is in the app's {rel.split('/')[0]}/ folder, which holds files, "
                       "never runs; choose another run_dir (e.g. runs/NAME)")
    return rel


def is_run_dir(workspace, folder: Path) -> bool:
    """Whether `folder` (in the workspace) is a run directory: one a run has locked (`.lock`: every run, and the
    app's launch, takes it before writing anything) or, from a run made before that, one holding config.yaml and
    state.json; never one of the app's own folders (uploads/, exports/) or a folder in them. Neither an upload nor
    Save config can write those files, so nothing sent to the app makes a folder a run."""
    ws = Path(workspace).resolve()
    try:
        rel = folder.resolve().relative_to(ws)
    except ValueError:
        return False
    if not rel.parts or rel.parts[0] in APP_FOLDERS or folder.is_symlink() or not folder.is_dir():
        return False
    return (folder / ".lock").is_file() or ((folder / "config.yaml").is_file() and (folder / "state.json").is_file())


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
    """Refuse a folder holding a symlink anywhere under `root`, before the app launches a run into it (which writes
    anywhere under it) or offers an export's files for download. The run and the readers check each path again
    where they use it (spin_lite.state.confined): a link planted after this check is refused there."""
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into linked folders
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                link = (Path(folder) / name).relative_to(Path(workspace).resolve())
                raise AppError(f"{link} is a symbolic link; the app neither runs into nor reads from a folder "
                               "holding links, which could lead outside the workspace (remove it)")


def local_or_hub(workspace, value: str | None) -> str | None:
    """A model/data reference for use in this process: an existing local path made absolute, else the hub id."""
    if value is None or value == EMBEDDED:
        return value
    path = inside(workspace, value)
    return str(path) if path.exists() else value


def resolved(workspace, cfg: SpinConfig) -> SpinConfig:
    """A copy of `cfg` whose local paths are absolute (the app's process does not run in the workspace). This
    is the app's one confinement check: AppError for any path of the run outside the workspace."""
    sections = {}
    for name, keys in LOCAL_PATHS.items():
        section = getattr(cfg, name)
        sections[name] = dataclasses.replace(section, **{k: local_or_hub(workspace, getattr(section, k))
                                                         for k in keys if hasattr(section, k)})
    return dataclasses.replace(cfg, run_dir=str(inside(workspace, cfg.run_dir)), **sections)


def run_config(workspace, run_dir: str) -> SpinConfig:
    """The config.yaml of a run directory, its paths confined and made absolute (`resolved`)."""
    rel = run_name(workspace, run_dir)
    root = Path(workspace).resolve() / rel
    if not (root / "config.yaml").exists():
        raise AppError(f"{run_dir} has no config.yaml yet")
    return resolved(workspace, load_config(root / "config.yaml", [f"run_dir={rel}"]))


# What an upload may be: a data file or a config (the page's upload boxes take these; the API could send anything).
UPLOAD_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml")
# Names of a run directory's own files (spin_lite.state, the app's process record and log): an upload so named, or
# named with a leading ".", is stored as upload-NAME, so that no upload is ever mistaken for a run's record.
RUN_RECORDS = {"config.yaml", "state.json", "progress.json", "summary.json", "eval-start.json", "eval-base.json",
               "eval.json", "samples.jsonl", "pairs.jsonl", "generations.jsonl", "train_log.jsonl",
               "train_metrics.json", "metrics.json", "app-run.json", "app-launch.yaml", "run.log"}


def upload_name(name: str) -> str:
    """The name an upload called `name` is stored under in uploads/: its own, unless a run's record has it."""
    if name in RUN_RECORDS or name.startswith(("app-", ".")):
        return "upload-" + name.lstrip(".")
    return name


def save_upload(workspace, uploaded: str | Path) -> str:
    """Copy an uploaded data or config file into WORKSPACE/uploads/ (upload_name; a new name if a different file has
    its name); the relative path to put in the config. uploads/ never holds a run (workspace.is_run_dir), so an upload
    is data only: it never makes a folder a run, and never stands for a run's state or process."""
    source = Path(uploaded)
    if source.suffix.lower() not in UPLOAD_TYPES:
        raise AppError(f"{shown(source.name)}: an upload is a data file or a config ({', '.join(UPLOAD_TYPES)})")
    name = Path(upload_name(source.name))
    folder = inside(workspace, UPLOADS)
    folder.mkdir(parents=True, exist_ok=True)
    content = source.read_bytes()
    for n in itertools.count():
        target = folder / (name.name if n == 0 else f"{name.stem}-{n}{name.suffix}")
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
