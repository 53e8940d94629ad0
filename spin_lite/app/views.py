"""What a run shows: the run list, progress, per-step and per-iteration metrics, the results table, the log, the
held-out samples and the model menus.

Everything is read back from the run directory through its contract, spin_lite.state.RunDir (progress.json,
state.json, the results table, the trained iterations, the adapters that make the model after an iteration), so a
run started from the CLI shows up the same way; run.log is only shown, never parsed for progress.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..state import CONTROL_ARMS, RunDir, compared_with, confined, control_name, found_better, read_json, read_jsonl
from .processes import LOG_FILE, log_lines, run_status
from .workspace import APP_FOLDERS, AppError, inside, is_run_dir, user_message

# What one unit of a stage's progress counts (spin_lite.run: SpinRun.generate, score, train, _evaluate).
STAGE_UNITS = {"generate": "batches", "score": "sequences", "train": "steps", "evaluate": "prompts"}
# Turn markers of the common chat templates: (start of a turn with its role, end of the role, end of a turn).
TEMPLATES = [re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML (SmolLM2, Qwen)
             re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),  # Llama 3
             re.compile(r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>|$)", re.S)]  # Gemma


def list_runs(workspace, depth: int = 3) -> list[str]:
    """Run directories under the workspace (relative paths, sorted): workspace.is_run_dir's, never in the app's own
    uploads/ and exports/ folders."""
    ws = Path(workspace).resolve()
    found = []
    for root, dirs, files in os.walk(ws):
        rel = Path(root).relative_to(ws)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("node_modules", "site-packages")
                         and not d.startswith("iter-") and len(rel.parts) < depth
                         and not (rel == Path(".") and d in APP_FOLDERS))
        if rel != Path(".") and is_run_dir(ws, Path(root)):
            found.append(str(rel))
            dirs[:] = []
    return sorted(found)


def opening_run(workspace, runs: list[str] | None = None) -> str | None:
    """The run a page opens on: a running one (the one active last, when several run), else the one active last;
    None without runs. Not the alphabetically first: a page reopened while a run goes on shows that run."""
    runs = list_runs(workspace) if runs is None else runs
    rank = {}
    for run in runs:
        try:
            s = run_status(workspace, run)
        except Exception:  # noqa: BLE001 - an unreadable run is listed, just not opened on
            continue
        lock = inside(workspace, run) / ".lock"  # touched by every launch: when a run has no state.json yet
        active = s["updated"] if isinstance(s["updated"], (int, float)) else lock.stat().st_mtime if lock.exists() else 0
        rank[run] = (s["status"] == "running", active)
    return max(rank, key=rank.get) if rank else (runs[0] if runs else None)


def runs_overview(workspace) -> list[dict]:
    """One row per run directory: status, iterations done of planned, stage, last update. A run whose files
    cannot be read gets its own row saying so; the others are shown as usual."""
    rows = []
    for run in list_runs(workspace):
        try:
            s = run_status(workspace, run)
        except Exception as e:  # noqa: BLE001 - one broken run directory must not hide the others
            rows.append({"run_dir": run, "status": f"unreadable: {user_message(e)[:200]}", "iterations": "",
                         "stage": "", "updated": ""})
            continue
        rows.append({"run_dir": run, "status": s["status"],
                     "iterations": f"{s['iterations_done']}/{s['iterations'] if s['iterations'] else '?'}",
                     "stage": s["stage"] or "",
                     "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["updated"])) if s["updated"] else ""})
    return rows


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


def step_metrics(workspace, run_dir: str) -> list[dict]:
    """One row per optimizer step of every iteration, from the train_log.jsonl files: iteration, step (within
    the iteration), global_step (1, 2, ... over all iterations in order), loss, margin, accuracy."""
    rd = RunDir(inside(workspace, run_dir))
    rows = []
    for folder in sorted(rd.root.glob("iter-[0-9][0-9]")):
        for r in read_jsonl(confined(rd.root, folder / "train_log.jsonl")):
            rows.append({"iteration": int(folder.name[5:]), "step": r["step"], "global_step": len(rows) + 1,
                         "loss": r["loss"], "margin": r.get("margin"), "accuracy": r.get("accuracy")})
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
    from ..report import TABLE_COLUMNS

    rows = iteration_metrics(workspace, run_dir)
    columns = [(key, title) for key, title, _ in TABLE_COLUMNS if any(r.get(key) is not None for r in rows)]
    table = []
    for r in rows:
        line = {title: (round(r[key], 3) if isinstance(r.get(key), float) else r.get(key)) for key, title in columns}
        line["chosen"] = "best" if r.get("best") else ""
        s = r.get("selection") or {}
        line["validation"] = ("" if not s or found_better(s) else
                              ("rejected: not better than " if s["accepted"] is False else "not clearly better than ")
                              + f"{compared_with(s)} (" + "; ".join(s.get("reasons") or []) + ")"
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
            + [f"control {int(p.parent.name[8:])}" for p in sorted(root.glob("control-[0-9][0-9]/samples.jsonl"))]
            + [f"control-spin {int(p.parent.name[13:])}"
               for p in sorted(root.glob("control-spin-[0-9][0-9]/samples.jsonl"))])


def samples(workspace, run_dir: str, which: str, query: str = "") -> list[dict]:
    """Held-out samples side by side (prompt, real, opponent, model), those containing `query` (any case)."""
    root = inside(workspace, run_dir)
    if which == "start":
        rows = (read_json(confined(root, root / "eval-start.json")) or {}).get("samples", [])
    else:
        rows = read_jsonl(confined(root, folder_of(RunDir(root), which) / "samples.jsonl"))
    columns = ("prompt", "real", "opponent", "model")
    table = [{c: r.get(c) or "" for c in columns} for r in rows]
    q = str(query).strip().lower()
    return [r for r in table if not q or any(q in r[c].lower() for c in columns)]


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
        return {"model": "start", "eval": (read_json(confined(root, root / "eval-start.json")) or {}).get("metrics")}
    return read_json(confined(root, folder_of(RunDir(root), which) / "summary.json")) or {}


def number_of(which) -> int:
    """The number in a menu value: "iter 3" -> 3, "control 1" -> 1, "control-spin 1" -> 1."""
    found = re.fullmatch(r"(?:iter |control |control-spin )?(\d{1,4})", str(which).strip())
    if not found:
        raise AppError(f"unknown model {str(which)[:40]!r}: start, an iteration (iter N) or a control (control N, "
                       "control-spin N)")
    return int(found[1])


def arm_of(which) -> str:
    """The control arm of a menu value: "spin" for "control-spin N" (SFT continued at SPIN's rate), else "sft"."""
    return "spin" if str(which).startswith("control-spin") else "sft"


def folder_of(rd: RunDir, which: str) -> Path:
    """The folder of "iter N", "control N" (SFT continued, the control matched to iteration N) or "control-spin N"
    (the same at SPIN's own rate)."""
    if str(which).startswith("control"):
        return rd.control(number_of(which), arm_of(which))
    return rd.iteration(number_of(which))


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
    inspect = [option(s if s.startswith("control") else -1 if s == "start" else number_of(s))
               for s in sample_sets(workspace, run_dir)]
    controls = [option(control_name(t, arm)) for arm in CONTROL_ARMS  # SFT continued, beside the iterations
                for t in rd.trained_controls(arm)]
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
