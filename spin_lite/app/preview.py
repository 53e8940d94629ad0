"""What the Setup tab shows before a run: the model check, the data as the model sees it, the time estimate.

    check_model(workspace, cfg)      the CLI's check (spin_lite.preflight): ModelError naming the folder tried,
                                     the hub's timeout, HF_HUB_OFFLINE; no minute of hub retries
    preview_data(workspace, cfg)     the first rows: prompt (chat template applied), response, token counts and
                                     problem first, the file's own columns last
    estimate_time(workspace, cfg)    each stage's time on this machine (spin_lite.estimate)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import SpinConfig
from ..data import encode_example, parse_row, read_rows
from .workspace import resolved

PREVIEW_RAW_CHARS = 120  # of one raw value in the preview: enough to recognise the fields, kept short (shown last)
# The preview's columns, in the order the page shows them: what the model sees and what is wrong first.
PREVIEW_COLUMNS = ["row", "problem", "prompt", "response", "prompt tokens", "response tokens", "raw columns"]


def check_model(workspace, cfg: SpinConfig):
    """The base model and starting adapter of `cfg` exist, as the CLI checks them before a run (preflight): a
    local folder named relative to the workspace, else a hub id looked up once with a short timeout, and at
    once when HF_HUB_OFFLINE is set. ModelError says which folder was tried and what to do."""
    from ..preflight import check_model as preflight

    preflight(resolved(workspace, cfg), base=Path(workspace).resolve(), base_name="the workspace")


def raw_columns(row) -> str:
    """A data row as the file has it, one `column: value` line per column (values cut to PREVIEW_RAW_CHARS)."""
    if not isinstance(row, dict):
        return repr(row)[:PREVIEW_RAW_CHARS]
    lines = []
    for key, value in row.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        lines.append(f"{key}: {text if len(text) <= PREVIEW_RAW_CHARS else text[:PREVIEW_RAW_CHARS] + '…'}")
    return "\n".join(lines)


def preview_data(workspace, cfg: SpinConfig, rows: int = 5) -> tuple[list[dict], str]:
    """The first `rows` rows as the model sees them (the chat template applied, PREVIEW_COLUMNS) beside the
    file's own columns (last, cut), and a message on the data: its row count, its columns and the format read.

    A row that cannot be used shows its error in the `problem` column. The model is checked first
    (check_model): a mistyped name is the CLI's message, not a tokenizer's error after a minute of retries.
    """
    from ..data import row_format
    from ..model import load_tokenizer

    check_model(workspace, cfg)
    cfg = resolved(workspace, cfg)
    tokenizer = load_tokenizer(cfg.model)
    raw = read_rows(cfg.data.path, cfg.data.split)
    table, bad = [], 0
    for i, row in enumerate(raw[:rows]):
        try:
            enc = encode_example(parse_row(row, i, cfg.data), tokenizer, cfg.data)
        except ValueError as e:
            bad += 1
            table.append({"row": i, "problem": str(e), "prompt": "", "response": "", "prompt tokens": 0,
                          "response tokens": 0, "raw columns": raw_columns(row)})
            continue
        notes = [n for n, cut in (("prompt cut to data.max_prompt_length", enc.prompt_truncated),
                                  ("response cut to data.max_length", enc.response_truncated)) if cut]
        table.append({"row": i, "problem": "; ".join(notes), "prompt": tokenizer.decode(enc.prompt_ids),
                      "response": tokenizer.decode(enc.response_ids), "prompt tokens": len(enc.prompt_ids),
                      "response tokens": len(enc.response_ids), "raw columns": raw_columns(row)})
    message = f"{len(raw)} rows in {cfg.data.path}"
    if raw and isinstance(raw[0], dict):
        try:
            shape = f"read as {row_format(raw[0], cfg.data)}"
        except ValueError:
            shape = "in no format spin_lite reads"
        message += f"; columns {', '.join(raw[0])} ({shape}, data.format: {cfg.data.format})"
    message += f"; the first {len(table)} as the model sees them, the file's own columns last."
    if bad:
        message += (f" {bad} of them cannot be used (see the problem column); fix the data, data.format or the "
                    "field names (data.messages_field, data.prompt_field, data.response_field)"
                    + (", or set data.skip_bad_rows to skip such rows." if bad < len(table) else
                       ": no row shown can be used, so skipping bad rows would leave none of them."))
    return table, message


def estimate_time(workspace, cfg: SpinConfig) -> str:
    """Each stage's estimated time for this config on this machine (spin_lite.estimate), as a markdown table."""
    from ..estimate import estimate_run, fmt_s

    stages, line = estimate_run(resolved(workspace, cfg), log=lambda *_: None)
    rows = ["| stage | work per iteration | iteration 0 | each later iteration |", "|---|---|---|---|"]
    rows += [f"| {s.stage} | {s.work} | {fmt_s(s.first_s)} | {fmt_s(s.later_s)} |" for s in stages]
    return "\n".join(rows) + f"\n\nEstimate: {line}."
