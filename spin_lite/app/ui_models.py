"""The tabs on a run's models: Inspect (held-out samples as chats), Compare (chat with the starting model and
another one side by side) and Export (adapter, merged model or GGUF, optionally pushed to the Hub). Each model menu
opens on the model the stop rule chose (views.model_menus, filled by ui.iteration_choices).
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from . import chat, views
from . import export as export_h
from .workspace import AppError, error_md, user_message


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
            rows = views.samples(ws, run_dir, sample_set, query or "")
            return {table: samples_html(rows, sample_set), summary: views.summary(ws, run_dir, sample_set)}
        except Exception as e:
            return {table: error_md(e), summary: None}

    gr.on([which.change, search.change], inspect, [run_dd, which, search], [table, summary], trigger_mode="always_last")
    return tab, which


def model_column(which: str) -> str:
    """The name of the responses of the model a sample set is of ("start", "iter N", "control N")."""
    which = str(which)
    if which == "start":
        return "starting model"
    if which.startswith("control"):
        return f"{which} (SFT continued)"
    return f"new model ({which})"


def samples_html(rows: list[dict], which: str = "") -> str:
    """Held-out samples as chats: the prompt's turns (system, user, assistant), then the real response, the
    opponent's (the model the iteration played against; none for the start and a control) and the responses of the
    model the set is of (model_column) side by side."""
    if not rows:
        return "<p>No samples.</p>"
    turn = lambda role, text: (f"<div class='spin-turn' data-role='{html.escape(role)}'><b>{html.escape(role)}</b>"
                               f"<div class='spin-text'>{html.escape(text)}</div></div>")
    columns = [("real", "real response"), ("opponent", "opponent"), ("model", model_column(which))]
    if not any(r.get("opponent") for r in rows):  # the start and a control have no opponent: no empty column
        columns.remove(("opponent", "opponent"))
    blocks = []
    for r in rows:
        prompt = "".join(turn(m["role"], m["content"]) for m in views.prompt_turns(r["prompt"]))
        answers = "".join(f"<div class='spin-answer'>{turn(name, r[key])}</div>" for key, name in columns)
        blocks.append(f"<div class='spin-sample'>{prompt}<div class='spin-answers'>{answers}</div></div>")
    return "".join(blocks)


# -- Compare ----------------------------------------------------------------------------------------------------
def compare_tab(ws: Path, run_dd):
    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        with gr.Row():
            which = gr.Dropdown(label="Model (opens on the one the stop rule chose)", choices=[],
                                elem_id="compare-which")
            max_new = gr.Number(128, label="New tokens per reply (greedy)",
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
            raise AppError("choose a run directory and an iteration with a trained adapter")
        text = ""
        for text in chat.chat_reply(ws, run_dir, which, history, max_new_tokens):
            yield history + [{"role": "assistant", "content": text}]
        if not text.strip():
            yield history + [{"role": "assistant", "content": "(no text: the model's reply was only special "
                                                              "tokens, or it ended at once)"}]
    except Exception as e:
        yield history + [{"role": "assistant", "content": f"Error: {user_message(e)}"}]


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
                raise AppError("choose a run directory and an iteration with a trained adapter")
            out = export_h.export(ws, run_dir, iteration, kind=kind, dtype=dtype, gguf_type=gguf_type,
                           push_repo=repo, token=token, private=private)
            note = export_h.export_note(ws, run_dir, iteration)  # a rejected iteration exported: said again with the result
        except Exception as e:
            return {msg: error_md(e), download: None}
        pushed = f"; pushed to https://huggingface.co/{repo.strip()}" if repo and repo.strip() else ""
        note = f"\n\n{note}" if note else ""
        if kind == "merged":  # a folder: no single file to download
            return {msg: f"wrote the merged {dtype} model to `{out}`{pushed}{note}", download: None}
        return {msg: f"wrote `{out}`{pushed}{note}", download: str(out)}

    def warn(run_dir, iteration):  # before any export: a rejected iteration, or what "the starting model" is here
        try:
            return export_h.export_note(ws, run_dir, iteration) if run_dir and iteration else ""
        except Exception as e:
            return error_md(e)

    which.change(warn, [run_dd, which], msg)

    inputs = [run_dd, which, dtype, gguf_type, repo, token, private]
    for kind, button in (("adapter", adapter_btn), ("merged", merged_btn), ("gguf", gguf_btn)):
        button.click(lambda *values, kind=kind: export(kind, *values), inputs, [msg, download], api_name=f"export_{kind}")
    return tab, which, msg
