"""Compare: chat with the starting model and the model after an iteration, greedy, streamed.

The two chats of the page load their models side by side (`_load_chat_model` keeps two), one load at a time.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from ..state import RunDir
from ..state import control_name
from .views import arm_of, number_of
from .workspace import AppError, run_config


def chat_model(workspace, run_dir: str, which: str):
    """(model, tokenizer): "start" is the run's starting model, "iter N" the model after iteration N, "control N"
    SFT continued, with the adapters RunDir.adapters_of names, built by model.build_model for inference."""
    cfg = run_config(workspace, run_dir)
    rd = RunDir(cfg.run_dir)
    n = -1 if which == "start" else number_of(which)
    if str(which).startswith("control"):  # SFT continued (at the SFT rate, or at SPIN's: "control-spin N")
        arm = arm_of(which)
        if n not in rd.trained_controls(arm):
            raise AppError(f"{control_name(n, arm)} of {run_dir} has no trained adapter")
        n = control_name(n, arm)
    elif n >= 0 and n not in rd.trained_iterations():
        raise AppError(f"iteration {n} of {run_dir} has no trained adapter")
    adapters = tuple(rd.adapters_of(n, cfg))
    stamp = tuple(os.path.getmtime(Path(a) / "adapter_config.json") if Path(a).exists() else 0 for a in adapters)
    with _LOADING:
        return _load_chat_model(dataclasses.astuple(cfg.model), cfg.mode, adapters, stamp)


MAX_NEW_TOKENS = 4096  # of one reply on the Compare tab

# The two chats load their models at the same time; transformers' loading is not thread-safe (its
# weight-initialisation switches are process-wide), and two loads at once gave a model random weights.
_LOADING = threading.Lock()


@lru_cache(maxsize=2)  # the two models side by side stay loaded between messages
def _load_chat_model(model_fields: tuple, mode: str, adapters: tuple, stamp: tuple):
    from ..config import LoraSettings, ModelConfig
    from ..model import build_model, load_base, load_tokenizer

    model_cfg = ModelConfig(*model_fields)
    # transformers + peft whatever backend the run trained on: an Unsloth model carries one adapter only
    model = build_model(load_base(model_cfg, backend="hf"), LoraSettings(), list(adapters), mode, trainable=False,
                        log=lambda *_: None)  # LoraSettings: read only for a trainable adapter
    return model.eval(), load_tokenizer(model_cfg)


def chat_reply(workspace, run_dir: str, which: str, messages: list[dict], max_new_tokens: int = 128) -> Iterator[str]:
    """The model's answer to a chat, greedy, streamed: yields the text so far."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float)) or \
            max_new_tokens != int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise AppError(f"new tokens per reply: a whole number from 1 to {MAX_NEW_TOKENS}, not {str(max_new_tokens)[:40]!r}")
    import torch
    from transformers import TextIteratorStreamer

    from ..data import encode_prompt

    model, tokenizer = chat_model(workspace, run_dir, which)
    prompt = torch.tensor([encode_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    failure = []

    def generate():
        try:
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=streamer,
                               max_new_tokens=int(max_new_tokens), do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        except Exception as e:  # reported to the page below, after the streamer is released
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if failure:
        raise failure[0]
    if not text:
        yield ""
