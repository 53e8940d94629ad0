"""The spin_lite web app: set up, run, watch, inspect, compare and export SPIN runs from a browser.

    python app.py                                  # http://127.0.0.1:7860, workspace: the current folder
    SPIN_LITE_APP_AUTH=alice:secret python app.py --workspace ~/spin --port 8000   # or --auth-file FILE
    spin-lite app --host 0.0.0.0                   # every interface: only on a network you trust

A thin shell over spin_lite.app_handlers: each button calls one of its functions, and a run is the CLI's
`spin-lite run CONFIG` in a process of its own, which goes on when the page or the app is closed. Setting
names and defaults are the config's (spin_lite.config); the Setup tab shows the equivalent CLI command.
Uploads, configs, run directories and exports stay in the workspace folder; a typed path outside it is
refused. Listens on 127.0.0.1 unless --host says otherwise; a public share link only with --share.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app makes no outside connections of its own

import gradio as gr
import pandas as pd

from spin_lite import app_handlers as h
from spin_lite.config import SpinConfig

SECTIONS = [("Run", ""), ("Model", "model."), ("Data", "data."), ("LoRA / QLoRA", "lora."),
            ("Generation (the opponent's responses)", "generation."), ("SPIN training", "train."),
            ("Held-out evaluation", "eval.")]
# The x axis of the per-iteration plots, in this order (not alphabetical); the plot shows those present.
MODEL_ORDER = ["start"] + [f"iter {t}" for t in range(100)]
SAMPLE_COLUMNS = ["prompt", "real", "opponent", "model"]
PREVIEW_COLUMNS = ["row", "prompt", "response", "prompt_tokens", "response_tokens", "problem"]
# No plot has a `color` series: a native plot fixes its colour domain at its first data, so series that
# appear later (a new iteration, another run directory) would not be drawn.
STEP_PLOTS = ["loss", "margin", "accuracy"]
ITERATION_PLOTS = {"logp_per_token": "held-out log-prob per token of the real responses",
                   "margin_accuracy": "held-out margin accuracy", "match_rate": "held-out match rate (eval.match_regex)"}
CSS = ".spin-bar progress { width: 100%; height: 14px; } .spin-error { color: #b91c1c; }"


def error_md(e: BaseException) -> str:
    return f"<span class='spin-error'>**Error:** {h.user_message(e)}</span>"


def setting_input(s: h.Setting, value):
    """The form input of one config setting: its name as label, its documentation and default as info."""
    shown = "none" if s.default is None else h.yaml_value(s.default)
    common = dict(label=s.key, info=f"{s.help} Default: {shown}.", elem_id="cfg-" + s.key.replace(".", "-"),
                  min_width=240)
    if s.choices:
        return gr.Dropdown(s.choices, value=value, **common)
    if s.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if s.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if s.kind == "int" else None, **common)
    return gr.Textbox(value=value, max_lines=1, **common)


def frame(rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns) if rows or columns else pd.DataFrame()


def plot_frame(rows: list[dict]) -> pd.DataFrame | None:
    """A plot's data; None while there is none (a native plot keeps the column types of its first frame,
    and an empty frame has none)."""
    return pd.DataFrame(rows) if rows else None


def progress_html(status: dict, bars: list[dict]) -> str:
    where = (f"iteration {status['iteration']}, stage {status['stage']}" if status.get("stage") else "")
    head = (f"<p><b>{status['run_dir']}</b>: {status['status']} — {status['iterations_done']} of "
            f"{status['iterations'] or '?'} iterations complete{'; ' + where if where else ''}"
            f"{' (process ' + str(status['pid']) + ')' if status.get('pid') else ''}</p>")
    if status.get("error"):
        head += f"<p class='spin-error'>{status['error']}</p>"
    for b in bars:
        unit = "batches" if b["kind"] == "generate" else "steps"
        head += (f"<div class='spin-bar' data-kind='{b['kind']}'>{b['name']}: {b['n']}/{b['total']} {unit}, "
                 f"{b['elapsed']} elapsed, {b['remaining']} left"
                 f"<progress max='{b['total']}' value='{b['n']}'></progress></div>")
    return head


def build_demo(workspace: str | Path) -> gr.Blocks:
    ws = Path(workspace).resolve()
    specs = h.settings()
    defaults = h.form_values(SpinConfig())

    with gr.Blocks(title="spin_lite") as demo:
        gr.Markdown(f"# spin_lite: SPIN self-play fine-tuning with LoRA\nWorkspace: `{ws}`")
        with gr.Row():
            run_dd = gr.Dropdown(label="Run directory (in the workspace)", choices=[], allow_custom_value=True,
                                 elem_id="run-dir", scale=4)
            refresh_btn = gr.Button("Refresh run list", scale=1)
        with gr.Tabs():
            # -- Setup ------------------------------------------------------------------------------------
            with gr.Tab("Setup", id="setup", elem_id="tab-setup"):
                with gr.Row():
                    with gr.Column(scale=3):
                        fields = []
                        for title, prefix in SECTIONS:
                            with gr.Accordion(title, open=True):
                                if prefix == "data.":
                                    upload = gr.File(label="Upload a data file (.jsonl, .json, .csv, .parquet): "
                                                           "it is copied to the workspace's uploads/ folder",
                                                     file_types=[".jsonl", ".json", ".csv", ".parquet"],
                                                     elem_id="data-upload", height=100)
                                with gr.Row():
                                    for s, value in zip(specs, defaults):
                                        if (s.key.startswith(prefix) if prefix else "." not in s.key):
                                            fields.append(setting_input(s, value))
                                if prefix == "data.":
                                    preview_btn = gr.Button("Preview the first rows as the model sees them",
                                                            elem_id="preview-data")
                                    preview_msg = gr.Markdown(elem_id="preview-msg")
                                    preview_df = gr.Dataframe(frame([], PREVIEW_COLUMNS),
                                                              label="Data preview (chat template applied)",
                                                              wrap=True, elem_id="preview-table", interactive=False)
                    with gr.Column(scale=2):
                        setup_msg = gr.Markdown(elem_id="setup-msg")
                        config_msg = gr.Markdown(elem_id="config-problems")
                        yaml_code = gr.Code(label="Config (YAML)", language="yaml", interactive=False,
                                            elem_id="yaml-preview")
                        cli_code = gr.Code(label="The same run from the command line", language="shell",
                                           interactive=False, elem_id="cli-preview")
                        with gr.Row():
                            save_path = gr.Textbox("configs/spin.yaml", label="Config file (in the workspace)",
                                                   elem_id="config-path", scale=3)
                            save_btn = gr.Button("Save config", elem_id="save-config", scale=1)
                            load_btn = gr.Button("Load config", elem_id="load-config", scale=1)
                        config_upload = gr.File(label="Load a config file from this computer", file_types=[".yaml", ".yml"],
                                                height=100, elem_id="config-upload")
                        config_download = gr.File(label="Saved config", interactive=False)
                        start_btn = gr.Button("Start this run", variant="primary", elem_id="start-run")

            # -- Run --------------------------------------------------------------------------------------
            with gr.Tab("Run", id="run", elem_id="tab-run"):
                with gr.Row():
                    continue_btn = gr.Button("Continue the selected run", elem_id="continue-run")
                    more_iters = gr.Number(0, precision=0, label="Total iterations for Continue (0: as configured)",
                                           elem_id="continue-iterations")
                    abort_btn = gr.Button("Abort the selected run", variant="stop", elem_id="abort-run")
                run_msg = gr.Markdown(elem_id="run-msg")
                status_html = gr.HTML(elem_id="run-status")
                with gr.Row():
                    step_plots = [gr.LinePlot(x="global_step", y=y, title=f"training {y} per step",
                                              x_title="optimizer step (all iterations)",
                                              elem_id=f"plot-{y}", height=260) for y in STEP_PLOTS]
                with gr.Row():
                    iteration_plots = [gr.LinePlot(x="model", y=y, title=title, sort=MODEL_ORDER, elem_id=f"plot-{y}",
                                                   height=260) for y, title in ITERATION_PLOTS.items()]
                results_df = gr.Dataframe(label="Results per iteration", interactive=False, elem_id="results-table")
                log_box = gr.Textbox(label="Log (run.log, last lines)", lines=14, max_lines=14, autoscroll=True,
                                     interactive=False, elem_id="run-log")
                overview_df = gr.Dataframe(label="All run directories in the workspace", interactive=False,
                                           elem_id="runs-overview")
                timer = gr.Timer(2.0)

            # -- Inspect ----------------------------------------------------------------------------------
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect") as inspect_tab:
                with gr.Row():
                    sample_dd = gr.Dropdown(label="Held-out samples of", choices=[], elem_id="inspect-which")
                    search_box = gr.Textbox(label="Search (any column)", elem_id="inspect-search")
                samples_df = gr.Dataframe(frame([], SAMPLE_COLUMNS), wrap=True, column_widths=["25%"] * 4,
                                          interactive=False, label="Prompt, real response, opponent's response, "
                                                                   "new model's response", elem_id="inspect-table")
                summary_json = gr.JSON(label="Summary", elem_id="inspect-summary")

            # -- Compare ----------------------------------------------------------------------------------
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                with gr.Row():
                    chat_dd = gr.Dropdown(label="Iteration's adapter", choices=[], elem_id="compare-which")
                    max_new = gr.Slider(8, 512, value=128, step=8, label="New tokens per reply (greedy)",
                                        elem_id="compare-max-new")
                with gr.Row():
                    chat_start = gr.Chatbot(label="Starting model", elem_id="chat-start", height=380)
                    chat_iter = gr.Chatbot(label="After the selected iteration", elem_id="chat-iter", height=380)
                with gr.Row():
                    chat_in = gr.Textbox(label="Message", scale=4, elem_id="chat-input")
                    send_btn = gr.Button("Send", scale=1, elem_id="chat-send")
                    clear_btn = gr.Button("Clear", scale=1)

            # -- Export -----------------------------------------------------------------------------------
            with gr.Tab("Export", id="export", elem_id="tab-export") as export_tab:
                export_dd = gr.Dropdown(label="Iteration", choices=[], elem_id="export-which")
                with gr.Row():
                    adapter_btn = gr.Button("Export the adapter (zip)", elem_id="export-adapter")
                    merged_btn = gr.Button("Export the merged 16-bit model (folder)", elem_id="export-merged")
                export_msg = gr.Markdown(elem_id="export-msg")
                export_file = gr.File(label="Download", interactive=False)

        # -- Setup events -------------------------------------------------------------------------------------
        def show_config(*values):
            try:
                cfg = h.config_from_form(list(values))
            except Exception as e:
                return gr.update(), gr.update(), error_md(e)
            return cfg.to_yaml(), h.cli_command(ws, cfg), ""

        gr.on([f.change for f in fields], show_config, fields, [yaml_code, cli_code, config_msg],
              trigger_mode="always_last", show_progress="hidden")
        demo.load(show_config, fields, [yaml_code, cli_code, config_msg])

        data_path = fields[[s.key for s in specs].index("data.path")]

        def preview(*values):
            try:
                rows, message = h.preview_data(ws, h.config_from_form(list(values)))
                return frame(rows, PREVIEW_COLUMNS), message
            except Exception as e:
                return frame([], PREVIEW_COLUMNS), error_md(e)

        def uploaded(file):
            if not file:
                return gr.update(), ""
            try:
                return h.save_upload(ws, file), ""
            except Exception as e:
                return gr.update(), error_md(e)

        preview_btn.click(preview, fields, [preview_df, preview_msg])
        upload.upload(uploaded, upload, [data_path, preview_msg]).then(preview, fields, [preview_df, preview_msg])

        def save(path, *values):
            try:
                cfg = h.config_from_form(list(values))
                target = h.save_config(ws, cfg, path)
                copy = Path(tempfile.mkdtemp(prefix="spin-config-")) / target.name  # the download's own copy
                copy.write_text(target.read_text())
                return f"saved {target.relative_to(ws)}", str(copy)
            except Exception as e:
                return error_md(e), None

        def load(path):
            try:
                cfg = h.open_config(ws, path)
                return [f"loaded {path}", *h.form_values(cfg)]
            except Exception as e:
                return [error_md(e), *[gr.update() for _ in fields]]

        def load_uploaded(file):
            if not file:
                return [gr.update(), *[gr.update() for _ in fields]]
            try:
                return load(h.save_upload(ws, file))
            except Exception as e:
                return [error_md(e), *[gr.update() for _ in fields]]

        save_btn.click(save, [save_path, *fields], [setup_msg, config_download])
        load_btn.click(load, save_path, [setup_msg, *fields])
        config_upload.upload(load_uploaded, config_upload, [setup_msg, *fields])

        # -- Run events ---------------------------------------------------------------------------------------
        def run_choices(selected=None):
            runs = h.list_runs(ws)
            value = selected or (runs[0] if runs else None)
            return gr.update(choices=runs, value=value)

        def start(*values):
            try:
                cfg = h.config_from_form(list(values))
                message = h.start_run(ws, cfg)
            except Exception as e:
                return error_md(e), error_md(e), gr.update()
            return message, message, run_choices(cfg.run_dir)

        def log_text(run_dir):
            text = h.run_log(ws, run_dir)
            return text or "(no run.log: this run was not started from the app; its files are shown above)"

        def show_run(run_dir, seen=None):
            """The Run tab for `run_dir`. Plots and tables are sent only when their files changed (`seen`:
            the signature last sent), so a plot is not redrawn every tick."""
            overview = frame(h.runs_overview(ws))
            if not run_dir:
                return ["<p>No run directory selected.</p>", *[None] * 7, "", overview, None]
            try:
                head = [progress_html(h.run_status(ws, run_dir), h.progress(ws, run_dir))]
                tail = [log_text(run_dir), overview]
                signature = h.metrics_signature(ws, run_dir)
                if signature == seen:
                    return head + [gr.skip()] * 7 + tail + [seen]
                steps = h.step_metrics(ws, run_dir)
                per_iter = h.iteration_metrics(ws, run_dir)
                step_frame = plot_frame(steps)
                return head + [step_frame] * 3 + [
                    *[plot_frame([r for r in per_iter if r.get(y) is not None]) for y in ITERATION_PLOTS],
                    frame(per_iter)] + tail + [signature]
            except Exception as e:
                return [error_md(e), *[None] * 7, "", gr.skip(), None]

        seen = gr.State(None)
        run_view = [status_html, *step_plots, *iteration_plots, results_df, log_box, overview_df, seen]

        def act(action, *args):
            try:
                return action(ws, *args)
            except Exception as e:
                return error_md(e)

        # "multiple": a second click is answered too (a refusal while the run goes on), not dropped
        start_btn.click(start, fields, [setup_msg, run_msg, run_dd], trigger_mode="multiple").then(
            show_run, run_dd, run_view)  # a new run: everything redrawn
        continue_btn.click(lambda r, n: act(h.continue_run, r, n), [run_dd, more_iters], run_msg,
                           trigger_mode="multiple")
        abort_btn.click(lambda r: act(h.abort_run, r), run_dd, run_msg).then(show_run, [run_dd, seen], run_view)
        timer.tick(show_run, [run_dd, seen], run_view, show_progress="hidden", trigger_mode="always_last")
        refresh_btn.click(run_choices, run_dd, run_dd)
        run_dd.change(show_run, run_dd, run_view)
        demo.load(run_choices, None, run_dd)

        # -- Inspect, Compare and Export choices follow the selected run ------------------------------------
        def choices(run_dir):
            try:
                sets = h.sample_sets(ws, run_dir) if run_dir else []
                iters = [f"iter {t}" for t in h.adapter_iterations(ws, run_dir)] if run_dir else []
            except Exception:
                sets, iters = [], []
            pick = lambda options: gr.update(choices=options, value=options[-1] if options else None)
            return pick(sets), pick(iters), pick(iters)

        def inspect(run_dir, which, query):
            if not run_dir or not which:
                return frame([], SAMPLE_COLUMNS), None
            try:
                return (frame(h.samples(ws, run_dir, which, query or ""), SAMPLE_COLUMNS),
                        h.summary(ws, run_dir, which))
            except Exception as e:
                return frame([], SAMPLE_COLUMNS), {"error": h.user_message(e)}

        for event in (run_dd.change, inspect_tab.select, compare_tab.select, export_tab.select):
            event(choices, run_dd, [sample_dd, chat_dd, export_dd])
        gr.on([sample_dd.change, search_box.change], inspect, [run_dd, sample_dd, search_box],
              [samples_df, summary_json], trigger_mode="always_last")

        # -- Compare events -----------------------------------------------------------------------------------
        def add_message(message, left, right):
            turn = {"role": "user", "content": message}
            return "", (left or []) + [turn], (right or []) + [turn]

        def reply(which_of):
            def stream(run_dir, which, history, max_new_tokens):
                history = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]
                if not history or history[-1]["role"] != "user":
                    yield history
                    return
                target = "start" if which_of == "start" else which
                try:
                    if not run_dir or not target:
                        raise h.AppError("choose a run directory and an iteration with a trained adapter")
                    text = ""
                    for text in h.chat_reply(ws, run_dir, target, history, max_new_tokens):
                        yield history + [{"role": "assistant", "content": text}]
                    if not text.strip():
                        yield history + [{"role": "assistant", "content": "(no text: the model's reply was only "
                                                                          "special tokens, or it ended at once)"}]
                except Exception as e:
                    yield history + [{"role": "assistant", "content": f"Error: {h.user_message(e)}"}]
            return stream

        sent = gr.on([chat_in.submit, send_btn.click], add_message, [chat_in, chat_start, chat_iter],
                     [chat_in, chat_start, chat_iter])
        sent.then(reply("start"), [run_dd, chat_dd, chat_start, max_new], chat_start)
        sent.then(reply("iteration"), [run_dd, chat_dd, chat_iter, max_new], chat_iter)
        clear_btn.click(lambda: ([], []), None, [chat_start, chat_iter])

        # -- Export events ------------------------------------------------------------------------------------
        def export(run_dir, which, merged):
            try:
                if not run_dir or not which:
                    raise h.AppError("choose a run directory and an iteration with a trained adapter")
                out = h.export(ws, run_dir, int(which.split()[-1]), merged)
            except Exception as e:
                return error_md(e), None
            if merged:
                return f"wrote the merged 16-bit model to `{out}`", None
            return f"wrote `{out}`", str(out)

        adapter_btn.click(lambda r, w: export(r, w, False), [run_dd, export_dd], [export_msg, export_file])
        merged_btn.click(lambda r, w: export(r, w, True), [run_dd, export_dd], [export_msg, export_file])
    return demo


def text_of(content) -> str:
    """A chat message's text (the Chatbot may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


WORKSPACE = os.environ.get("SPIN_LITE_WORKSPACE", ".")
demo = build_demo(WORKSPACE)


def main(argv: list[str] | None = None) -> int:
    global demo
    from spin_lite import quiet
    quiet.apply()  # the chat tab's model loading: no library noise a user cannot act on (runs: the CLI's own)
    parser = argparse.ArgumentParser(prog="spin-lite app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public share link (off unless given)")
    parser.add_argument("--auth", default=os.environ.get("SPIN_LITE_APP_AUTH"), metavar="USER:PASSWORD",
                        help="ask for this username and password; on the command line other users see it in `ps`, "
                             "so prefer SPIN_LITE_APP_AUTH=USER:PASSWORD or --auth-file")
    parser.add_argument("--auth-file", metavar="FILE", help="read USER:PASSWORD from the first line of FILE")
    parser.add_argument("--workspace", default=WORKSPACE,
                        help="folder for uploads, configs, run directories and exports (default: the current folder)")
    args = parser.parse_args(argv)
    auth = None
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
        auth = (user, password)
    ws = Path(args.workspace).expanduser().resolve()
    if not ws.is_dir():
        parser.error(f"--workspace {ws} is not a folder")
    if ws != Path(WORKSPACE).resolve():
        demo = build_demo(ws)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        allowed_paths=[str(ws / h.EXPORTS)], css=CSS, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
