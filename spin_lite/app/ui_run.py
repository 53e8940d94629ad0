"""The Run tab: Continue and Abort, where the run stands (status, progress), its per-step and per-iteration plots,
the results table and the log's last lines, refreshed every 2 s from the run directory (views, processes).
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from . import processes, views
from .workspace import error_md

# The x axis of the per-iteration plots, in this order (not alphabetical).
MODEL_ORDER = ["base", "start", "sft"] + [f"iter {t}" for t in range(100)] + [f"control {t}" for t in range(100)]
STEP_PLOTS = {"loss": "SPIN loss per optimizer step", "margin": "reward margin (real - generated) per step",
              "accuracy": "share of pairs ranked right per step"}
ITERATION_PLOTS = {"logp_per_token": "held-out log-prob per token of the real responses",
                   "margin_accuracy": "held-out margin accuracy", "match_rate": "held-out match rate (eval.match_regex)"}


def run_tab(ws: Path, run_dd) -> SimpleNamespace:
    with gr.Tab("Run", id="run", elem_id="tab-run"):
        with gr.Row():
            continue_btn = gr.Button("Continue the selected run", elem_id="continue-run")
            more_iters = gr.Number(0, label="Total iterations for Continue (0: as configured)",
                                   elem_id="continue-iterations")
            patience = gr.Number(0, label="Stop patience for Continue (0: as configured)",
                                 elem_id="continue-patience")
            abort_btn = gr.Button("Abort the selected run", variant="stop", elem_id="abort-run")
        msg = gr.Markdown(elem_id="run-msg")
        status = gr.HTML(elem_id="run-status")
        # Hidden until their data arrive: no empty frames. Points, not lines: one step or one iteration shows too.
        # Steps run over all iterations in order, coloured by iteration. A native plot fixes its colour domain when
        # it draws its chart anew, not when only its data change, so every planned iteration is in the data from
        # the start (`step_points` pads it with one empty, not drawn, row per iteration not yet trained), and new
        # data are followed by axis limits (`padded`, show_run), whose change redraws the chart: the iterations
        # Continue adds are drawn on an open page, and the points at the edges are not cut in half by the clipping.
        with gr.Row():
            steps = {y: gr.ScatterPlot(x="global_step", y=y, color="iteration", title=title,
                                       x_title="optimizer step (all iterations)", y_title=y, x_axis_format="d",
                                       y_axis_format=".3~f", elem_id=f"plot-{y}", height=260, visible=False)
                     for y, title in STEP_PLOTS.items()}
        with gr.Row():
            per_iteration = {y: gr.ScatterPlot(x="model", y=y, title=title, sort=MODEL_ORDER, y_axis_format=".3~f",
                                               elem_id=f"plot-{y}", height=260, visible=False)
                             for y, title in ITERATION_PLOTS.items()}
        results = gr.Dataframe(label="Results per model (test rows unless marked val; chosen: best on the validation "
                                     "rows)", interactive=False, elem_id="results-table", visible=False,
                               wrap=True)  # the stop rule's reasons (validation) wrap instead of being cut
        log = gr.HTML(elem_id="run-log")  # log_html: opens scrolled to its last line
        overview = gr.Dataframe(label="All run directories in the workspace", interactive=False, elem_id="runs-overview")
        timer = gr.Timer(2.0)
        seen = gr.State(None)  # inside the tab: a component between tabs shifts which panel a tab button opens
    view = [status, *steps.values(), *per_iteration.values(), results, log, overview, seen]
    parts = SimpleNamespace(status=status, steps=steps, per_iteration=per_iteration, results=results, log=log,
                            overview=overview, seen=seen)
    show = lambda run_dir, signature=None: show_run(ws, parts, run_dir, signature)

    def act(action, *args):
        try:
            return action(ws, *args)
        except Exception as e:
            return error_md(e)

    continue_btn.click(lambda r, n, k: act(processes.continue_run, r, n, k), [run_dd, more_iters, patience], msg,
                       trigger_mode="multiple", api_name="continue_run")
    abort_btn.click(lambda r: act(processes.abort_run, r), run_dd, msg, api_name="abort_run").then(show, [run_dd, seen], view)
    timer.tick(show, [run_dd, seen], view, show_progress="hidden", trigger_mode="always_last", api_name="run_view")
    return SimpleNamespace(msg=msg, view=view, show=show)


def show_run(ws: Path, parts: SimpleNamespace, run_dir: str | None, seen: tuple | None) -> dict:
    """The Run tab's updates for `run_dir`. Plots and the table are sent only when their files changed, and the
    plots' axis limits for that data on the tick after (`seen`: the signature of the files last sent, and the
    limits still to send): Gradio applies a plot's limits before its data, so limits sent with new data would
    redraw the chart from the old data, and the new points (an iteration Continue added) would never show."""
    update = {parts.overview: pd.DataFrame(views.runs_overview(ws))}
    if not run_dir:
        return update | {parts.status: "<p>No run directory selected.</p>", parts.log: log_html(""), parts.seen: None}
    sent, limits = seen if isinstance(seen, tuple) else (None, None)
    try:
        update[parts.status] = status_html(processes.run_status(ws, run_dir), views.progress(ws, run_dir))
        update[parts.log] = log_html(views.run_log(ws, run_dir) or "(no run.log: this run was not started from the app)")
        if limits:  # the data went out on the last tick; now its limits, which redraw the charts
            plots = parts.steps | parts.per_iteration
            return update | {plots[y]: gr.update(x_lim=x, y_lim=y_lim) for y, (x, y_lim) in limits.items()} \
                | {parts.seen: (sent, None)}
        signature = views.metrics_signature(ws, run_dir)
        if signature == sent:
            return update
        steps = step_points(views.step_metrics(ws, run_dir), processes.run_status(ws, run_dir)["iterations"])
        limits = {y: (padded(steps["global_step"]), padded(steps[y])) if steps is not None else (None, None)
                  for y in parts.steps}
        for plot in parts.steps.values():
            update[plot] = gr.update(value=steps, visible=steps is not None)
        per_iteration = views.iteration_metrics(ws, run_dir)
        for y, plot in parts.per_iteration.items():
            points = [{"model": r["model"], y: r[y]} for r in per_iteration if r.get(y) is not None]
            update[plot] = gr.update(value=pd.DataFrame(points) if points else None, visible=bool(points))
            limits[y] = (None, padded([p[y] for p in points]))
        rows = pd.DataFrame(views.results_rows(ws, run_dir))
        update[parts.results] = gr.update(value=rows, visible=not rows.empty, column_widths=results_widths(rows))
        return update | {parts.seen: (signature, limits)}
    except Exception as e:
        return update | {parts.status: error_md(e), parts.seen: None}


def step_points(rows: list[dict], iterations: int | None) -> pd.DataFrame | None:
    """The per-step plots' data: `iteration` as a label ("iter 0", ...) and one empty row for each planned
    iteration without steps yet, so that the colour domain holds every iteration from the first drawing."""
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    frame["iteration"] = [f"iter {t}" for t in frame["iteration"]]
    planned = [f"iter {t}" for t in range(max(iterations or 0, max(r["iteration"] for r in rows) + 1))]
    trained = set(frame["iteration"])
    missing = [label for label in planned if label not in trained]
    if missing:
        frame = pd.concat([frame, pd.DataFrame({"iteration": missing})], ignore_index=True)  # NaN: not drawn
    return frame


def results_widths(table: pd.DataFrame) -> list[str] | None:
    """Column widths of the results table: the stop rule's reasons (validation) get a quarter and wrap, instead of
    running off the table's right edge; the numbers share the rest."""
    columns = list(table.columns)
    if "validation" not in columns:
        return None
    share = f"{75 / max(len(columns) - 1, 1):.2f}%"
    return ["25%" if c == "validation" else share for c in columns]


def log_html(text: str) -> str:
    """The log's last lines in a box that shows its end: a column-reverse flex box starts scrolled to the bottom
    (a Textbox's autoscroll follows only a box already near its end, so 40 new lines opened at the top)."""
    return (f"<div class='spin-log-title'>Log (run.log, last lines)</div>"
            f"<div class='spin-log'><pre>{html.escape(text)}</pre></div>")


def padded(values, margin: float = 0.06) -> list[float] | None:
    """An axis range holding `values` (NaN skipped) with `margin` of their span on each side (of the value itself
    when all are equal, 0.05 for all zeros), so that no point sits on the plot's clipped edge. None without values."""
    numbers = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not numbers:
        return None
    low, high = min(numbers), max(numbers)
    pad = (high - low) * margin or abs(high) * margin or 0.05
    return [low - pad, high + pad]


def status_html(status: dict, progress: dict | None) -> str:
    """Where the run is (state.json, app-run.json), its best iteration, and the running stage's progress
    (progress.json), shown while the run runs or after it stopped midway. Every text from the run directory is
    escaped: a file's or a link's name is shown, never read as markup."""
    e = lambda value: html.escape(str(value), quote=True)
    where = f"iteration {e(status['iteration'])}, stage {e(status['stage'])}" if status.get("stage") else ""
    out = (f"<p><b>{e(status['run_dir'])}</b>: {e(status['status'])} — {e(status['iterations_done'])} of "
           f"{e(status['iterations'] or '?')} iterations complete{'; ' + where if where else ''}"
           f"{' (process ' + e(status['pid']) + ')' if status.get('pid') else ''}</p>")
    if status.get("stopped_by_rule"):
        out += (f"<p class='spin-stop-rule'>the stop rule ended the run after iteration {status['iterations_done'] - 1}"
                " (not better on the validation rows); Continue with a higher stop patience to go on</p>")
    best, chosen = status.get("best_iteration"), status.get("chosen")  # (chosen: RunDir.chosen_model)
    if best is not None:
        named = ("the starting model" if not chosen or chosen == "start" else f"iteration {chosen.split()[-1]}"
                 if chosen.startswith("iter") else f"SFT continued ({chosen})")
        out += f"<p class='spin-best' data-best='{e(best)}'>best on the validation rows: {e(named)}</p>"
    if status.get("error"):
        out += f"<p class='spin-error'>{e(status['error'])}</p>"
    if progress and status["status"] != "finished":
        out += progress_bar(progress, status["status"] == "running")
    return out


def progress_bar(p: dict, running: bool) -> str:
    e = lambda value: html.escape(str(value), quote=True)
    total = p.get("total")
    counts = f"{p['done']}/{total} {p['unit']}" if total is not None else f"{p['done']} {p['unit']}"
    rate = f", {p['rate']:.2f} {p['unit']}/s" if p.get("rate") else ""
    left = f", about {p['remaining_s']:.0f} s left" if running and p.get("remaining_s") is not None else ""
    iteration = "start" if p.get("iteration") is None else f"iteration {p['iteration']}"
    # no value attribute while nothing is counted yet: the bar shows work under way without a share
    value = f" value='{e(p['done'])}'" if p["done"] and total else ""
    return (f"<div class='spin-bar' data-stage='{e(p['stage'])}'>{'' if running else 'last progress: '}{e(iteration)} · "
            f"{e(p['stage'])}: {e(counts + rate + left)}<progress max='{e(total or 1)}'{value}></progress></div>")
