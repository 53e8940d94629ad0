"""The run directory: the run's state on disk, which is also its checkpoint.

    run_dir/
      config.yaml            the resolved config of the run
      state.json             where the run is (iteration, stage, status); written atomically, for display
      eval-start.json        held-out metrics of the starting model
      iter-00/
        generations.jsonl    the opponent's responses, appended one finished batch at a time
        pairs.jsonl          (prompt, real, generated) token ids with the opponent's log-probs
        checkpoint/          last training checkpoint (adapter, optimizer, scheduler, RNG); removed when done
        train_log.jsonl      one line per optimizer step
        adapter/             the trained adapter, standard PEFT layout
        eval.json            held-out metrics of the new model
        samples.jsonl        held-out prompt, real, opponent and new model responses side by side
        summary.json         written last: its presence marks the iteration complete
Every file a resume trusts is written to a temporary name and renamed into place, so a kill at any moment
leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: Path, default=None):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replace_dir(tmp: Path, target: Path):
    """Move the finished folder `tmp` to `target`; the old `target` survives until the new one is in place."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path):
    """After a kill inside replace_dir: put the surviving old folder back if the new one never landed."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter-{t:02d}"

    def is_complete(self, t: int) -> bool:
        return (self.iteration(t) / "summary.json").exists()

    def completed(self) -> int:
        """Number of leading complete iterations."""
        t = 0
        while self.is_complete(t):
            t += 1
        return t

    def summaries(self) -> list[dict]:
        return [read_json(self.iteration(t) / "summary.json") for t in range(self.completed())]

    def state(self) -> dict:
        return read_json(self.state_path, {})

    def set_state(self, **fields):
        state = {**self.state(), **fields, "updated": time.time()}
        atomic_write_json(self.state_path, state)

    def lock(self):
        """Hold the run directory for this process; refuse if another process holds it.

        An flock dies with its process, so a killed run never leaves the directory locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunLockedError(f"run directory {self.root} is in use by another process") from None
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def is_locked(self) -> bool:
        if not (self.root / ".lock").exists():
            return False
        with open(self.root / ".lock") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False


class RunLockedError(RuntimeError):
    pass


def fault_point(name: str, count: int):
    """Test hook: SPIN_LITE_KILL_AT=name:count kills this process with SIGKILL there, as a crash would."""
    if os.environ.get("SPIN_LITE_KILL_AT") == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
