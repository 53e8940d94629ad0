"""The spin_lite web app: set up, run, watch, inspect, compare and export SPIN runs from a browser.

    spin-lite app                                  # http://127.0.0.1:7860, workspace: the current folder
    SPIN_LITE_APP_AUTH=alice:secret spin-lite app --workspace ~/spin --port 8000   # or --auth-file FILE
    spin-lite app --host 0.0.0.0                   # every interface: only on a network you trust

A thin shell over spin_lite.app.handlers: each tab is built by its own function, each button calls one
handler, and each event returns its updates by component. A run is the CLI's `spin-lite run CONFIG` in a
process of its own, which goes on when the page or the app is closed. Setting names and defaults are the
config's (spin_lite.config); the Setup tab shows the equivalent CLI command. Uploads, configs, run directories
and exports stay in the workspace folder; a typed path outside it is refused. Listens on 127.0.0.1 unless
--host says otherwise; a public share link only with --share.
"""
from __future__ import annotations

import argparse
import html
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app makes no outside connections of its own

import gradio as gr
import pandas as pd

from . import handlers as h
from ..config import SpinConfig

# The Setup tab's guided steps show these settings; every other one is in the "Advanced" section of its topic.
GUIDED = {"model.name": "1. Model: the embedded SmolLM2-135M-Instruct (default), a Hub id, or a folder here",
          "data.path": "2. Data: sample:demo (bundled), an uploaded file, a file here, or a Hub dataset id",
          "iterations": "3. SPIN iterations", "run_dir": "Run directory (a new folder in the workspace)"}
SECTIONS = [("Run", ""), ("Model", "model."), ("Data", "data."), ("LoRA / QLoRA", "lora."),
            ("Generation (the opponent's responses)", "generation."), ("SPIN training", "train."),
            ("Held-out evaluation", "eval."), ("SFT stage and the SFT-continued control", "sft.")]
PREVIEW_COLUMNS = ["row", "raw columns", "prompt", "response", "prompt_tokens", "response_tokens", "problem"]
# The x axis of the per-iteration plots, in this order (not alphabetical).
MODEL_ORDER = ["base", "start", "sft"] + [f"iter {t}" for t in range(100)] + [f"control {t}" for t in range(100)]
STEP_PLOTS = {"loss": "SPIN loss per optimizer step", "margin": "reward margin (real - generated) per step",
              "accuracy": "share of pairs ranked right per step"}
ITERATION_PLOTS = {"logp_per_token": "held-out log-prob per token of the real responses",
                   "margin_accuracy": "held-out margin accuracy", "match_rate": "held-out match rate (eval.match_regex)"}
CSS = (".spin-bar progress { width: 100%; height: 14px; } .spin-error { color: #b91c1c; }"
       " .spin-best { color: #15803d; font-weight: 600; }"
       " .spin-sample { border: 1px solid #d4d4d8; border-radius: 6px; padding: 6px 10px; margin: 8px 0; }"
       " .spin-turn { margin: 4px 0; } .spin-text { white-space: pre-wrap; }"
       " .spin-answers { display: flex; gap: 12px; } .spin-answer { flex: 1; border-top: 1px dashed #a1a1aa; }")


def error_md(e: BaseException) -> str:
    return f"<span class='spin-error'>**Error:** {h.user_message(e)}</span>"


def build_demo(workspace: str | Path) -> gr.Blocks:
    ws = Path(workspace).resolve()
    with gr.Blocks(title="spin_lite") as demo:
        gr.Markdown(f"# spin_lite: SPIN self-play fine-tuning with LoRA\nWorkspace: `{ws}`")
        with gr.Row():
            run_dd = gr.Dropdown(label="Run directory (in the workspace)", choices=[], allow_custom_value=True,
                                 elem_id="run-dir", scale=4)
            refresh_btn = gr.Button("Refresh run list", scale=1)
        with gr.Tabs():
            setup = setup_tab(ws, demo)
            run = run_tab(ws, run_dd)
            inspect, sample_dd = inspect_tab(ws, run_dd)
            compare, chat_dd = compare_tab(ws, run_dd)
            export, export_dd = export_tab(ws, run_dd)

        def run_choices(selected=None):
            runs = h.list_runs(ws)
            return gr.update(choices=runs, value=selected or (runs[0] if runs else None))

        def start(*values):
            try:
                cfg = h.config_from_form(list(values))
                message = h.start_run(ws, cfg)
            except Exception as e:
                return {setup.start_msg: error_md(e), run.msg: error_md(e)}
            return {setup.start_msg: message, run.msg: message, run_dd: run_choices(cfg.run_dir)}

        # "multiple": a second click is answered too (a refusal while the run goes on), not dropped
        setup.start_btn.click(start, setup.fields, [setup.start_msg, run.msg, run_dd], trigger_mode="multiple",
                              api_name="start").then(run.show, run_dd, run.view)  # a new run: everything redrawn
        refresh_btn.click(run_choices, run_dd, run_dd)
        demo.load(run_choices, None, run_dd)
        run_dd.change(run.show, run_dd, run.view)
        tab_choices = [sample_dd, chat_dd, export_dd]
        for event in (run_dd.change, inspect.select, compare.select, export.select):
            event(lambda r: iteration_choices(ws, r, sample_dd, chat_dd, export_dd), run_dd, tab_choices)
    return demo


def iteration_choices(ws, run_dir, sample_dd, chat_dd, export_dd) -> dict:
    """The models of the selected run in Inspect, Compare and Export (h.model_menus), each opened on the chosen one."""
    try:
        menus = h.model_menus(ws, run_dir) if run_dir else {}
    except Exception:
        menus = {}
    pick = lambda tab: (lambda choices, value: gr.update(choices=choices, value=value))(*menus.get(tab, ([], None)))
    return {sample_dd: pick("inspect"), chat_dd: pick("compare"), export_dd: pick("export")}


# -- Setup ------------------------------------------------------------------------------------------------------
def setting_input(s: h.Setting, value, label: str | None = None):
    """The form input of one config setting: its name (or `label`) as label, its documentation and default as info."""
    shown = "none" if s.default is None else h.yaml_value(s.default)
    info = f"{s.key}: {s.help} Default: {shown}." if label else f"{s.help} Default: {shown}."
    common = dict(label=label or s.key, info=info, elem_id="cfg-" + s.key.replace(".", "-"), min_width=280)
    if s.choices:
        return gr.Dropdown(s.choices, value=value, **common)
    if s.kind == "bool":  # in a column of its own: a checkbox alone in a row gets too narrow for its label
        with gr.Column(min_width=280):
            return gr.Checkbox(value=value, **common)
    if s.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if s.kind == "int" else None, **common)
    return gr.Textbox(value=value, max_lines=1, **common)


def setup_tab(ws: Path, demo: gr.Blocks) -> SimpleNamespace:
    """Setup as a guided flow: model, data, iterations, Start; the other settings in collapsed sections by topic."""
    specs, defaults = h.settings(), h.form_values(SpinConfig())
    field = {}
    with gr.Tab("Setup", id="setup", elem_id="tab-setup"):
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("Fill in the three steps and start; every other setting has a default "
                            "(under *Advanced settings*).")
                for s, value in zip(specs, defaults):
                    if s.key in ("model.name", "data.path"):
                        field[s.key] = setting_input(s, value, GUIDED[s.key])
                    if s.key == "data.path":
                        data = data_section()
                with gr.Row():
                    for s, value in zip(specs, defaults):
                        if s.key in ("iterations", "run_dir"):
                            field[s.key] = setting_input(s, value, GUIDED[s.key])
                problems = gr.Markdown(elem_id="config-problems")
                with gr.Row():
                    start_btn = gr.Button("Start this run", variant="primary", elem_id="start-run", scale=3)
                    estimate_btn = gr.Button("Estimate the time", elem_id="estimate-time", scale=1)
                start_msg = gr.Markdown(elem_id="setup-msg")
                estimate = gr.Markdown(elem_id="time-estimate")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    for title, prefix in SECTIONS:
                        with gr.Accordion(title, open=False, elem_id=f"advanced-{prefix.rstrip('.') or 'run'}"), gr.Row():
                            for s, value in zip(specs, defaults):
                                if s.key not in GUIDED and (s.key.startswith(prefix) if prefix else "." not in s.key):
                                    field[s.key] = setting_input(s, value)
            with gr.Column(scale=2):
                files = config_files_section()
    fields = [field[s.key] for s in specs]  # settings() order: the order handlers.config_from_form reads
    wire_setup(ws, demo, fields, field["data.path"], data, files, problems)

    def estimate_time(*values):
        try:
            return h.estimate_time(ws, h.config_from_form(list(values)))
        except Exception as e:
            return error_md(e)

    estimate_btn.click(estimate_time, fields, estimate, api_name="estimate")
    return SimpleNamespace(fields=fields, start_btn=start_btn, start_msg=start_msg)


def data_section() -> SimpleNamespace:
    upload = gr.File(label="Upload a data file (.jsonl, .json, .csv, .parquet): it is copied to the workspace's "
                           "uploads/ folder", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                     elem_id="data-upload", height=100)
    preview_btn = gr.Button("Preview the first rows as the model sees them", elem_id="preview-data", size="sm")
    msg = gr.Markdown(elem_id="preview-msg")
    table = gr.Dataframe(pd.DataFrame(columns=PREVIEW_COLUMNS), label="Data preview: the file's columns, and the prompt with the chat template applied",
                         wrap=True, elem_id="preview-table", interactive=False)
    return SimpleNamespace(upload=upload, preview_btn=preview_btn, msg=msg, table=table)


def config_files_section() -> SimpleNamespace:
    yaml_code = gr.Code(label="Config (YAML)", language="yaml", interactive=False, elem_id="yaml-preview")
    cli_code = gr.Code(label="The same run from the command line", language="shell", interactive=False,
                       elem_id="cli-preview")
    with gr.Row():
        path = gr.Textbox("configs/spin.yaml", label="Config file (in the workspace)", elem_id="config-path", scale=3)
        save_btn = gr.Button("Save config", elem_id="save-config", scale=1)
        load_btn = gr.Button("Load config", elem_id="load-config", scale=1)
    msg = gr.Markdown(elem_id="config-file-msg")
    upload = gr.File(label="Load a config file from this computer", file_types=[".yaml", ".yml"], height=100,
                     elem_id="config-upload")
    download = gr.File(label="Saved config", interactive=False)
    return SimpleNamespace(yaml=yaml_code, cli=cli_code, path=path, save_btn=save_btn, load_btn=load_btn,
                           msg=msg, upload=upload, download=download)


def wire_setup(ws: Path, demo, fields: list, data_path, data: SimpleNamespace, files: SimpleNamespace, problems):
    def show_config(*values):
        try:
            cfg = h.config_from_form(list(values))
        except Exception as e:
            return {problems: error_md(e)}
        return {files.yaml: cfg.to_yaml(), files.cli: h.cli_command(ws, cfg), problems: ""}

    config_view = [files.yaml, files.cli, problems]
    gr.on([f.change for f in fields], show_config, fields, config_view, trigger_mode="always_last",
          show_progress="hidden")
    demo.load(show_config, fields, config_view)

    def preview(*values):
        try:
            rows, message = h.preview_data(ws, h.config_from_form(list(values)))
            return {data.table: pd.DataFrame(rows, columns=PREVIEW_COLUMNS), data.msg: message}
        except Exception as e:
            return {data.table: pd.DataFrame(columns=PREVIEW_COLUMNS), data.msg: error_md(e)}

    def uploaded(file):
        try:
            return {data_path: h.save_upload(ws, file), data.msg: ""} if file else {data.msg: ""}
        except Exception as e:
            return {data.msg: error_md(e)}

    data.preview_btn.click(preview, fields, [data.table, data.msg])
    data.upload.upload(uploaded, data.upload, [data_path, data.msg]).then(preview, fields, [data.table, data.msg])

    def save(path, *values):
        try:
            target = h.save_config(ws, h.config_from_form(list(values)), path)
            copy = Path(tempfile.mkdtemp(prefix="spin-config-")) / target.name  # the download's own copy
            copy.write_text(target.read_text())
            return {files.msg: f"saved {target.relative_to(ws)}", files.download: str(copy)}
        except Exception as e:
            return {files.msg: error_md(e), files.download: None}

    def load(path):
        try:
            return {files.msg: f"loaded {path}", **dict(zip(fields, h.form_values(h.open_config(ws, path))))}
        except Exception as e:
            return {files.msg: error_md(e)}

    def load_uploaded(file):
        try:
            return load(h.save_upload(ws, file)) if file else {}
        except Exception as e:
            return {files.msg: error_md(e)}

    files.save_btn.click(save, [files.path, *fields], [files.msg, files.download], api_name="save")
    files.load_btn.click(load, files.path, [files.msg, *fields], api_name="load")
    files.upload.upload(load_uploaded, files.upload, [files.msg, *fields])


# -- Run --------------------------------------------------------------------------------------------------------
def run_tab(ws: Path, run_dd) -> SimpleNamespace:
    with gr.Tab("Run", id="run", elem_id="tab-run"):
        with gr.Row():
            continue_btn = gr.Button("Continue the selected run", elem_id="continue-run")
            more_iters = gr.Number(0, precision=0, label="Total iterations for Continue (0: as configured)",
                                   elem_id="continue-iterations")
            patience = gr.Number(0, precision=0, label="Stop patience for Continue (0: as configured)",
                                 elem_id="continue-patience")
            abort_btn = gr.Button("Abort the selected run", variant="stop", elem_id="abort-run")
        msg = gr.Markdown(elem_id="run-msg")
        status = gr.HTML(elem_id="run-status")
        # Hidden until their data arrive: no empty frames. Points, not lines: one step or one iteration shows too.
        # Steps run over all iterations in order, coloured by iteration. A native plot fixes its colour domain at
        # its first data (the points of a later iteration were not drawn), so every planned iteration is in the
        # data from the start: `step_points` pads it with one empty (not drawn) row per iteration not yet trained.
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
                                     "rows)", interactive=False, elem_id="results-table", visible=False)
        log = gr.Textbox(label="Log (run.log, last lines)", lines=14, max_lines=14, autoscroll=True,
                         interactive=False, elem_id="run-log")
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

    continue_btn.click(lambda r, n, k: act(h.continue_run, r, n, k), [run_dd, more_iters, patience], msg,
                       trigger_mode="multiple", api_name="continue_run")
    abort_btn.click(lambda r: act(h.abort_run, r), run_dd, msg, api_name="abort_run").then(show, [run_dd, seen], view)
    timer.tick(show, [run_dd, seen], view, show_progress="hidden", trigger_mode="always_last")
    return SimpleNamespace(msg=msg, view=view, show=show)


def show_run(ws: Path, parts: SimpleNamespace, run_dir: str | None, seen: str | None) -> dict:
    """The Run tab's updates for `run_dir`. Plots and the table are sent only when their files changed (`seen`:
    the signature last sent), so a plot is not redrawn every tick."""
    update = {parts.overview: pd.DataFrame(h.runs_overview(ws))}
    if not run_dir:
        return update | {parts.status: "<p>No run directory selected.</p>", parts.log: "", parts.seen: None}
    try:
        update[parts.status] = status_html(h.run_status(ws, run_dir), h.progress(ws, run_dir))
        update[parts.log] = h.run_log(ws, run_dir) or "(no run.log: this run was not started from the app)"
        signature = h.metrics_signature(ws, run_dir)
        if signature == seen:
            return update
        steps = step_points(h.step_metrics(ws, run_dir), h.run_status(ws, run_dir)["iterations"])
        for plot in parts.steps.values():
            update[plot] = gr.update(value=steps, visible=steps is not None)
        per_iteration = h.iteration_metrics(ws, run_dir)
        for y, plot in parts.per_iteration.items():
            points = [{"model": r["model"], y: r[y]} for r in per_iteration if r.get(y) is not None]
            update[plot] = gr.update(value=pd.DataFrame(points) if points else None, visible=bool(points))
        rows = h.results_rows(ws, run_dir)
        update[parts.results] = gr.update(value=pd.DataFrame(rows), visible=bool(rows))
        return update | {parts.seen: signature}
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


def status_html(status: dict, progress: dict | None) -> str:
    """Where the run is (state.json, app-run.json), its best iteration, and the running stage's progress
    (progress.json), shown while the run runs or after it stopped midway."""
    where = f"iteration {status['iteration']}, stage {status['stage']}" if status.get("stage") else ""
    html = (f"<p><b>{status['run_dir']}</b>: {status['status']} — {status['iterations_done']} of "
            f"{status['iterations'] or '?'} iterations complete{'; ' + where if where else ''}"
            f"{' (process ' + str(status['pid']) + ')' if status.get('pid') else ''}</p>")
    if status.get("stopped_by_rule"):
        html += (f"<p class='spin-stop-rule'>the stop rule ended the run after iteration {status['iterations_done'] - 1}"
                 " (not better on the validation rows); Continue with a higher stop patience to go on</p>")
    best, chosen = status.get("best_iteration"), status.get("chosen")  # (chosen: RunDir.chosen_model)
    if best is not None:
        named = ("the starting model" if not chosen or chosen == "start" else f"iteration {chosen.split()[-1]}"
                 if chosen.startswith("iter") else f"SFT continued ({chosen})")
        html += f"<p class='spin-best' data-best='{best}'>best on the validation rows: {named}</p>"
    if status.get("error"):
        html += f"<p class='spin-error'>{status['error']}</p>"
    if progress and status["status"] != "finished":
        html += progress_bar(progress, status["status"] == "running")
    return html


def progress_bar(p: dict, running: bool) -> str:
    total = p.get("total")
    counts = f"{p['done']}/{total} {p['unit']}" if total is not None else f"{p['done']} {p['unit']}"
    rate = f", {p['rate']:.2f} {p['unit']}/s" if p.get("rate") else ""
    left = f", about {p['remaining_s']:.0f} s left" if running and p.get("remaining_s") is not None else ""
    iteration = "start" if p.get("iteration") is None else f"iteration {p['iteration']}"
    # no value attribute while nothing is counted yet: the bar shows work under way without a share
    value = f" value='{p['done']}'" if p["done"] and total else ""
    return (f"<div class='spin-bar' data-stage='{p['stage']}'>{'' if running else 'last progress: '}{iteration} · "
            f"{p['stage']}: {counts}{rate}{left}<progress max='{total or 1}'{value}></progress></div>")


# -- Inspect ----------------------------------------------------------------------------------------------------
def inspect_tab(ws: Path, run_dd):
    with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect") as tab:
        with gr.Row():
            which = gr.Dropdown(label="Held-out samples of (opens on the chosen model)", choices=[],
                                elem_id="inspect-which")
            search = gr.Textbox(label="Search (any column)", elem_id="inspect-search")
        table = gr.HTML(elem_id="inspect-table")
        summary = gr.JSON(label="Summary", elem_id="inspect-summary")

    def inspect(run_dir, sample_set, query):
        if not run_dir or not sample_set:
            return {table: "", summary: None}
        try:
            rows = h.samples(ws, run_dir, sample_set, query or "")
            return {table: samples_html(rows), summary: h.summary(ws, run_dir, sample_set)}
        except Exception as e:
            return {table: error_md(e), summary: None}

    gr.on([which.change, search.change], inspect, [run_dd, which, search], [table, summary], trigger_mode="always_last")
    return tab, which


def samples_html(rows: list[dict]) -> str:
    """Held-out samples as chats: the prompt's turns (system, user, assistant), then the real, the opponent's and
    the new model's responses side by side."""
    if not rows:
        return "<p>No samples.</p>"
    turn = lambda role, text: (f"<div class='spin-turn' data-role='{role}'><b>{role}</b>"
                               f"<div class='spin-text'>{html.escape(text)}</div></div>")
    blocks = []
    for r in rows:
        prompt = "".join(turn(m["role"], m["content"]) for m in h.prompt_turns(r["prompt"]))
        answers = "".join(f"<div class='spin-answer'>{turn(name, r[key])}</div>" for key, name in
                          (("real", "real response"), ("opponent", "opponent"), ("model", "new model")))
        blocks.append(f"<div class='spin-sample'>{prompt}<div class='spin-answers'>{answers}</div></div>")
    return "".join(blocks)


# -- Compare ----------------------------------------------------------------------------------------------------
def compare_tab(ws: Path, run_dd):
    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        with gr.Row():
            which = gr.Dropdown(label="Model (opens on the one the stop rule chose)", choices=[],
                                elem_id="compare-which")
            max_new = gr.Slider(8, 512, value=128, step=8, label="New tokens per reply (greedy)",
                                elem_id="compare-max-new")
        with gr.Row():
            chat_start = gr.Chatbot(label="Starting model", elem_id="chat-start", height=380)
            chat_iter = gr.Chatbot(label="The selected model", elem_id="chat-iter", height=380)
        with gr.Row():
            message = gr.Textbox(label="Message", scale=4, elem_id="chat-input")
            send_btn = gr.Button("Send", scale=1, elem_id="chat-send")
            clear_btn = gr.Button("Clear", scale=1)

    def add_message(text, left, right):
        turn = {"role": "user", "content": text}
        return {message: "", chat_start: (left or []) + [turn], chat_iter: (right or []) + [turn]}

    sent = gr.on([message.submit, send_btn.click], add_message, [message, chat_start, chat_iter],
                 [message, chat_start, chat_iter])
    def reply_start(run_dir, iteration, history, max_new_tokens):
        yield from reply(ws, run_dir, "start", history, max_new_tokens)

    def reply_iteration(run_dir, iteration, history, max_new_tokens):
        yield from reply(ws, run_dir, iteration, history, max_new_tokens)

    sent.then(reply_start, [run_dd, which, chat_start, max_new], chat_start)
    sent.then(reply_iteration, [run_dd, which, chat_iter, max_new], chat_iter)
    clear_btn.click(lambda: {chat_start: [], chat_iter: []}, None, [chat_start, chat_iter])
    return tab, which


def reply(ws: Path, run_dir, which, history, max_new_tokens):
    """Stream a model's answer into its chat ("start" or "iter N")."""
    history = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]
    if not history or history[-1]["role"] != "user":
        yield history
        return
    try:
        if not run_dir or not which:
            raise h.AppError("choose a run directory and an iteration with a trained adapter")
        text = ""
        for text in h.chat_reply(ws, run_dir, which, history, max_new_tokens):
            yield history + [{"role": "assistant", "content": text}]
        if not text.strip():
            yield history + [{"role": "assistant", "content": "(no text: the model's reply was only special "
                                                              "tokens, or it ended at once)"}]
    except Exception as e:
        yield history + [{"role": "assistant", "content": f"Error: {h.user_message(e)}"}]


def text_of(content) -> str:
    """A chat message's text (the Chatbot may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


# -- Export -----------------------------------------------------------------------------------------------------
def export_tab(ws: Path, run_dd):
    from ..export import EXPORT_DTYPES
    from ..gguf_export import GGUF_TYPES

    with gr.Tab("Export", id="export", elem_id="tab-export") as tab:
        which = gr.Dropdown(label="Model (best: the one the stop rule chose on the validation rows)", choices=[],
                            elem_id="export-which")
        with gr.Row():
            dtype = gr.Dropdown(list(EXPORT_DTYPES), value="bfloat16", label="Merged model: weight type",
                                elem_id="export-dtype")
            gguf_type = gr.Dropdown(list(GGUF_TYPES), value="q8_0", label="GGUF: type (llama.cpp, Ollama)",
                                    elem_id="export-gguf-type")
        with gr.Accordion("Also push to the Hugging Face Hub (optional)", open=False):
            with gr.Row():
                repo = gr.Textbox(label="Hub repository (OWNER/NAME; empty: no push)", elem_id="export-hub-repo")
                token = gr.Textbox(label="Hub token (empty: HF_TOKEN or the saved login)", type="password",
                                   elem_id="export-hub-token")
                private = gr.Checkbox(label="private repository", elem_id="export-hub-private")
        with gr.Row():
            adapter_btn = gr.Button("Export the adapter (zip)", elem_id="export-adapter")
            merged_btn = gr.Button("Export the merged model (folder)", elem_id="export-merged")
            gguf_btn = gr.Button("Export one GGUF file", elem_id="export-gguf")
        msg = gr.Markdown(elem_id="export-msg")
        download = gr.File(label="Download", interactive=False)

    def export(kind, run_dir, iteration, dtype, gguf_type, repo, token, private):
        try:
            if not run_dir or not iteration:
                raise h.AppError("choose a run directory and an iteration with a trained adapter")
            out = h.export(ws, run_dir, iteration, kind=kind, dtype=dtype, gguf_type=gguf_type,
                           push_repo=repo, token=token, private=private)
            note = h.export_note(ws, run_dir, iteration)  # a rejected iteration exported: said again with the result
        except Exception as e:
            return {msg: error_md(e), download: None}
        pushed = f"; pushed to https://huggingface.co/{repo.strip()}" if repo and repo.strip() else ""
        note = f"\n\n{note}" if note else ""
        if kind == "merged":  # a folder: no single file to download
            return {msg: f"wrote the merged {dtype} model to `{out}`{pushed}{note}", download: None}
        return {msg: f"wrote `{out}`{pushed}{note}", download: str(out)}

    def warn(run_dir, iteration):  # before any export: a rejected iteration, or what "the starting model" is here
        try:
            return h.export_note(ws, run_dir, iteration) if run_dir and iteration else ""
        except Exception as e:
            return error_md(e)

    which.change(warn, [run_dd, which], msg)

    inputs = [run_dd, which, dtype, gguf_type, repo, token, private]
    for kind, button in (("adapter", adapter_btn), ("merged", merged_btn), ("gguf", gguf_btn)):
        button.click(lambda *values, kind=kind: export(kind, *values), inputs, [msg, download])
    return tab, which


# -- launching --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spin-lite app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public share link (off unless given)")
    parser.add_argument("--auth", default=os.environ.get("SPIN_LITE_APP_AUTH"), metavar="USER:PASSWORD",
                        help="ask for this username and password; on the command line other users see it in `ps`, "
                             "so prefer SPIN_LITE_APP_AUTH=USER:PASSWORD or --auth-file")
    parser.add_argument("--auth-file", metavar="FILE", help="read USER:PASSWORD from the first line of FILE")
    parser.add_argument("--workspace", default=os.environ.get("SPIN_LITE_WORKSPACE", "."),
                        help="folder for uploads, configs, run directories and exports (default: the current folder)")
    args = parser.parse_args(argv)
    if args.auth_file:
        try:
            lines = Path(args.auth_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--auth-file {args.auth_file}: {e}")
        args.auth = lines[0].strip() if lines else ""
        if not args.auth:
            parser.error(f"--auth-file {args.auth_file} is empty; it holds USER:PASSWORD")
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth takes USER:PASSWORD")
        args.auth = (user, password)
    args.workspace = Path(args.workspace).expanduser().resolve()
    if not args.workspace.is_dir():
        parser.error(f"--workspace {args.workspace} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """`spin-lite app ARGS` (and `python app.py ARGS`): build the page for the workspace and serve it."""
    from .. import quiet
    quiet.apply()  # the chat tab's model loading: no library noise a user cannot act on (runs: the CLI's own)
    args = parse_args(argv)
    build_demo(args.workspace).queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=args.auth or None,
        allowed_paths=[str(args.workspace / h.EXPORTS)], css=CSS, ssr_mode=False)
    return 0
