"""The web app: `spin-lite app` (pip install "spin-lite[app]"), or `python app.py` in a checkout.

    handlers.py   what the app does, as plain functions over a workspace folder (no Gradio)
    ui.py         the Gradio page: one builder per tab, events wired to the handlers; `main` serves it

Importing this package loads neither Gradio nor a model; `spin_lite.app.ui` needs the `app` extra.
"""


def main(argv: list[str] | None = None) -> int:
    """`spin-lite app ARGS`."""
    from .ui import main as serve
    return serve(argv)
