"""Export from the page: the CLI's `spin-lite export`, in its own process, into WORKSPACE/exports/.

The menus open on "best", the model the stop rule chose (RunDir.resolve_model); `export_note` says what the
page warns of before and after: an iteration the stop rule rejected, or what "the starting model" is here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..state import RunDir
from .processes import child_env
from .views import number_of, trained_iterations
from .workspace import EXPORTS, AppError, inside, refuse_links, run_config, run_name

EXPORT_KINDS = ("adapter", "merged", "gguf")


def model_number(workspace, run_dir: str, which) -> int | str:
    """The iteration a menu's value names, -1 for the starting model: "best" and "start" as RunDir.resolve_model
    reads them, "iter N" or N; "control N" (SFT continued) is returned as that name."""
    text = str(which).strip()
    if text.startswith("control") or text in ("best", "start"):
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
                f"SPIN iterations 0..{number_of(n)}" + (", chosen on the validation rows over SPIN's choice."
                                                        if n == rd.chosen_model() else "."))
    if n >= 0:
        return f"**Warning: {rd.rejection(n)}.**" if rd.rejection(n) else ""
    cfg, chosen = rd.settings(), rd.chosen_model() == "start"
    said = "The stop rule chose the starting model: no iteration was better on the validation rows. " if chosen else ""
    start = rd.start_adapter(cfg) if cfg is not None else None  # the SFT stage's adapter, else model.adapter
    if start:
        return said + f"It is the base with the starting adapter `{start}`, which this exports."
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
    from ..export import EXPORT_DTYPES
    from ..gguf_export import GGUF_TYPES

    for name, value, allowed in (("export kind", kind, EXPORT_KINDS), ("weight type", dtype, EXPORT_DTYPES),
                                 ("GGUF type", gguf_type, GGUF_TYPES)):
        if value not in allowed:
            raise AppError(f"unknown {name} {str(value)[:40]!r}: one of {', '.join(allowed)}")
    ws = Path(workspace).resolve()
    run_dir = run_name(workspace, run_dir)
    run_config(workspace, run_dir)  # the model it reads: inside the workspace, like a run's
    n = model_number(workspace, run_dir, iteration)
    control = n if isinstance(n, str) else None  # "control N": SFT continued
    n = -2 if control else n  # (below: neither the start nor an iteration)
    if n >= 0 and n not in trained_iterations(workspace, run_dir):
        raise AppError(f"iteration {n} of {run_dir} has no trained adapter to export")
    push_repo = (push_repo or "").strip() if isinstance(push_repo, (str, type(None))) else str(push_repo)
    if push_repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", push_repo):
        raise AppError(f"Hub repository {push_repo[:80]!r} is not of the form OWNER/NAME")
    suffix = {"adapter": "adapter", "merged": f"merged-{dtype}", "gguf": f"gguf-{gguf_type}"}[kind]
    model = f"control-{number_of(control):02d}" if control else f"iter-{n:02d}" if n >= 0 else "start"
    name = f"{export_name(run_dir)}-{model}-{suffix}"
    out = inside(workspace, Path(EXPORTS) / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    for written in out.parent.glob(name + "*"):  # the folder, its .tmp-PID/.old siblings and the zip
        if written.is_symlink():
            raise AppError(f"{written.relative_to(ws)} is a symbolic link; the app does not export through links")
    asked = ("best" if str(iteration).strip() == "best" else f"control-{number_of(control)}" if control
             else str(n) if n >= 0 else "start")  # (the CLI's words on "best")
    args = ["export", run_dir, "--iteration", asked, "--out", str(out.relative_to(ws))]
    args += {"adapter": [], "merged": ["--merged", "--dtype", dtype], "gguf": ["--gguf", gguf_type]}[kind]
    args += ["--push-to-hub", push_repo] + (["--private"] if private else []) if push_repo else []
    env = child_env(**({"HF_TOKEN": token.strip()} if isinstance(token, str) and token.strip() else {}))
    done = subprocess.run([sys.executable, "-m", "spin_lite", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AppError(last_error_text(done.stderr) or f"spin-lite export failed with exit code {done.returncode}")
    if kind == "merged":
        return out
    refuse_links(workspace, out)  # what is archived or offered for download: the export's own files, no link
    if kind == "gguf":
        return next(out.glob("*.gguf"))
    return Path(shutil.make_archive(str(out), "zip", root_dir=out))


def export_name(run_dir: str) -> str:
    """The export's name for a run: its whole path in the workspace, "/" written "+" (a character no run directory
    name holds: workspace.RUN_NAME), so that runs/a/dup and runs/b/dup never share an export folder."""
    return run_dir.replace("/", "+")


def last_error_text(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else None
