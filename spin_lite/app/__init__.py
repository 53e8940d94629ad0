"""The web app: `spin-lite app` (pip install "spin-lite[app]"), or `python app.py` in a checkout.

What the app does, as plain functions over a workspace folder (no Gradio), by concern:
    workspace.py  confinement to the workspace, safe writes, run directory names, the page's error text
    form.py       the settings form <-> a config; the presets and the recommended one; the topics of "Advanced"
    preview.py    before a run: the model check (the CLI's), the data as the model sees it, the time estimate
    processes.py  start, continue and abort runs (a checked copy of the config launched), and their status
    views.py      what a run shows: the run list, progress, metrics, results table, log, samples, model menus
    chat.py       Compare: chat with a run's models
    export.py     Export: the CLI's `spin-lite export` in its own process
The Gradio page (the `app` extra), one builder per tab:
    ui.py         the page and `main`, which serves it; ui_setup.py, ui_run.py, ui_models.py: the tabs

Importing this package loads neither Gradio nor a model; `spin_lite.app.ui` needs the `app` extra.
"""


def main(argv: list[str] | None = None) -> int:
    """`spin-lite app ARGS`."""
    from .ui import main as serve
    return serve(argv)
