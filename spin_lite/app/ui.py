"""The spin_lite web app: set up, run, watch, inspect, compare and export SPIN runs from a browser.

    spin-lite app                                  # http://127.0.0.1:7860, workspace: the current folder
    SPIN_LITE_APP_AUTH=alice:secret spin-lite app --workspace ~/spin --port 8000   # or --auth-file FILE
    spin-lite app --host 0.0.0.0                   # every interface: only on a network you trust

A thin shell over the app's handler modules (workspace, form, preview, processes, views, chat, export): each
tab is built by its own function (ui_setup, ui_run, ui_models), each button calls one handler, and each event
returns its updates by component. A run is the CLI's `spin-lite run CONFIG` in a process of its own, which goes on when the page or the
app is closed. Setting names and defaults are the config's (spin_lite.config); the Setup tab opens on the preset
recommended for this machine (form.recommended_preset) and shows the equivalent CLI command. Uploads, configs,
run directories and exports stay in the workspace folder; a typed path outside it is refused. Listens on
127.0.0.1 unless --host says otherwise; a public share link only with --share.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app makes no outside connections of its own

import gradio as gr

from . import export as export_h
from . import form, processes, views
from .ui_models import compare_tab, export_tab, inspect_tab
from .ui_run import run_tab
from .ui_setup import setup_tab
from .workspace import EXPORTS, error_md, run_name

CSS = (".spin-bar progress { width: 100%; height: 14px; } .spin-error { color: #b91c1c; }"
       " .spin-best { color: #15803d; font-weight: 600; }"
       " .spin-sample { border: 1px solid #d4d4d8; border-radius: 6px; padding: 6px 10px; margin: 8px 0; }"
       " .spin-turn { margin: 4px 0; } .spin-text { white-space: pre-wrap; }"
       " .spin-answers { display: flex; gap: 12px; } .spin-answer { flex: 1; border-top: 1px dashed #a1a1aa; }"
       " .spin-log { max-height: 22em; overflow-y: auto; display: flex; flex-direction: column-reverse;"
       " border: 1px solid #d4d4d8; border-radius: 6px; padding: 4px 8px; }"
       " .spin-log pre { margin: 0; white-space: pre-wrap; font-size: 0.85em; } .spin-log-title { font-size: 0.9em; }"
       " #results-table table { font-size: 0.85em; }")


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
            export, export_dd, export_msg = export_tab(ws, run_dd)

        def run_choices(selected=None):
            runs = views.list_runs(ws)
            return gr.update(choices=runs, value=selected or views.opening_run(ws, runs))

        def start(*values):
            """Check and launch the form's run. A generator: at the click, before the checks (a large model or data
            set takes a minute), the Run tab turns to the run being started, so it never shows the previous run as if
            it were this one; then the launch's message, or the refusal."""
            try:
                cfg = form.config_from_form(list(values))
                rel = run_name(ws, cfg.run_dir)
                yield {run_dd: gr.update(value=rel), run.msg: f"checking the model and data of {rel} before starting it"}
                message = processes.start_run(ws, cfg)
            except Exception as e:  # a refusal has its own line (the form's problems line gives way to it): the
                yield {setup.start_error: error_md(e), setup.problems: "", run.msg: error_md(e)}  # launch's stays
                return
            yield {setup.start_msg: message, setup.start_error: "", run.msg: message, run_dd: run_choices(cfg.run_dir)}

        # "multiple": a second click is answered too (a refusal while the run goes on), not dropped
        setup.start_btn.click(start, setup.fields, [setup.start_msg, setup.start_error, setup.problems, run.msg, run_dd],
                              trigger_mode="multiple", api_name="start"
                              ).then(run.show, run_dd, run.view)  # a new run: everything redrawn
        refresh_btn.click(run_choices, run_dd, run_dd, api_name="refresh_runs")
        demo.load(run_choices, None, run_dd)
        run_dd.input(lambda: "", None, run.msg)  # a message of Continue or Abort belongs to the run it was about
        run_dd.change(run.show, run_dd, run.view)
        tab_choices = [sample_dd, chat_dd, export_dd, export_msg]
        for first, event in zip((True, False, False, False), (run_dd.change, inspect.select, compare.select,
                                                              export.select)):
            event(lambda r: iteration_choices(ws, r, sample_dd, chat_dd, export_dd, export_msg), run_dd, tab_choices,
                  api_name="model_menus" if first else None)
    return demo


def iteration_choices(ws, run_dir, sample_dd, chat_dd, export_dd, export_msg) -> dict:
    """The models of the selected run in Inspect, Compare and Export (views.model_menus), each opened on the chosen
    one, and Export's note on the model its menu opens on: this run's, also when the menu's value ("best") stays the
    same and no change of it would redraw the note."""
    try:
        menus = views.model_menus(ws, run_dir) if run_dir else {}
    except Exception as e:  # noqa: BLE001 - said on the Export tab; the menus stay empty
        menus, note = {}, error_md(e)
    else:
        value = menus.get("export", ([], None))[1]
        try:
            note = export_h.export_note(ws, run_dir, value) if value else ""
        except Exception as e:  # noqa: BLE001
            note = error_md(e)
    pick = lambda tab: (lambda choices, value: gr.update(choices=choices, value=value))(*menus.get(tab, ([], None)))
    return {sample_dd: pick("inspect"), chat_dd: pick("compare"), export_dd: pick("export"), export_msg: note}


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
    # show_error: what Gradio itself refuses before a handler runs (a chat history or a file of the wrong shape sent
    # through the API) is answered with its reason, not a generic error; the handlers answer everything else
    build_demo(args.workspace).queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=args.auth or None,
        allowed_paths=[str(args.workspace / EXPORTS)], css=CSS, ssr_mode=False, show_error=True)
    return 0
