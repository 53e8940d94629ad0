"""SFT data: read rows, check them, turn them into (prompt, response) token ids with the chat template.

A row is either a chat (`messages`: a list of {role, content}; the last assistant turn is the response and
everything before it the prompt) or a prompt/response pair of text columns. The prompt is rendered with the
tokenizer's chat template and `add_generation_prompt=True`, exactly as the opponent sees it when it
generates; the response is what follows it when the whole conversation is rendered, closed by
exactly one end-of-turn token (`encode_conversation`).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """The data cannot be used; the message names the file, the row and the field."""


@dataclass
class Example:
    row: int
    """Row number in the source (0-based), for messages and for joining generations back."""
    prompt: list[dict]
    """Chat messages before the response."""
    response: str
    """The human response text."""


@dataclass
class Encoded:
    row: int
    prompt_ids: list[int]
    response_ids: list[int]
    """Response tokens; ends with one end-of-turn token (`end_of_turn_ids`) unless `response_truncated`."""
    prompt_truncated: bool = False
    response_truncated: bool = False


@dataclass
class DataReport:
    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def describe(self) -> str:
        return (f"{self.rows} rows, {len(self.skipped)} skipped, {self.prompts_truncated} prompts and "
                f"{self.responses_truncated} responses truncated")


# -- reading ----------------------------------------------------------------------------------------
def read_rows(path: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """The first `limit` (default: all) rows of a local JSON/JSONL/Parquet/CSV file, or of a hub dataset's split."""
    p = Path(path)
    if p.suffix.lower() in LOCAL_SUFFIXES or p.exists():
        if not p.is_file():
            raise DataError(f"data file {path} does not exist")
        try:
            return _read_local(p)[:limit]
        except DataError:
            raise
        except Exception as e:  # unreadable or malformed file: say which and why
            raise DataError(f"could not read data file {path}: {type(e).__name__}: {e}") from None
    try:
        import datasets
        return datasets.load_dataset(path, split=split if limit is None else f"{split}[:{limit}]").to_list()
    except Exception as e:
        raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: "
                        f"{type(e).__name__}: {str(e)[:300]}") from None


def _read_local(p: Path) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p} line {n} is not valid JSON: {e}") from None
        return rows
    if suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} layout
        if not isinstance(data, list):
            raise DataError(f"{p} must hold a list of rows (or one key mapping to a list)")
        return data
    if suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()


# -- checking ---------------------------------------------------------------------------------------
def parse_row(row, index: int, cfg: DataConfig) -> Example:
    """One raw row as an Example; raises ValueError naming the field that is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"is a {type(row).__name__}, not an object with fields")
    if cfg.messages_field in row and row[cfg.messages_field] is not None:
        return _parse_chat(row[cfg.messages_field], index, cfg.messages_field)
    missing = [f for f in (cfg.prompt_field, cfg.response_field) if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"missing field {missing[0]!r} (expected {cfg.messages_field!r}, or "
                         f"{cfg.prompt_field!r} and {cfg.response_field!r})")
    prompt, response = row[cfg.prompt_field], row[cfg.response_field]
    _check_text(prompt, cfg.prompt_field)
    _check_text(response, cfg.response_field)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return Example(index, messages + [{"role": "user", "content": prompt}], response)


def _parse_chat(messages, index: int, name: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {name!r} must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"field {name!r} message {k} must have a 'role' and a 'content'")
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"field {name!r} has no assistant message to use as the response")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise ValueError(f"field {name!r} has no user message before the last assistant message")
    _check_text(messages[last]["content"], f"{name}[{last}].content")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return Example(index, prompt, messages[last]["content"])


def _check_text(value, name: str):
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")


# -- tokenizing -------------------------------------------------------------------------------------
# Tokens that close an assistant turn in the common chat templates, besides the tokenizer's EOS: ChatML (Qwen,
# SmolLM), Llama 3, Phi-3, Gemma, Command-R. A model whose EOS is its template's end of turn needs none of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>")
PLACEHOLDER_PROMPT = [{"role": "user", "content": "Hi"}]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end a response: the EOS, then each known end-of-turn token that the chat template writes and
    the tokenizer reads as one token.

    The one home of this knowledge: a response is closed by the first of them that the template writes, and
    generation stops on any of them.
    """
    template, ids = tokenizer.chat_template or "", [tokenizer.eos_token_id]
    template = " ".join(template.values()) if isinstance(template, dict) else template  # named templates
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in template and token_id is not None and token_id not in ids \
                and tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]:
            ids.append(token_id)
    return ids


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it before answering: chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the whole conversation rendered by the chat template, split by position.

    The prompt is the rendering with the generation prompt, as the opponent sees it; the response is what
    follows it in the rendering of messages + the response as an assistant turn, tokenized in context
    (SentencePiece tokenizers give text on its own a leading word-boundary piece that never follows a
    prompt), up to and including the first end-of-turn token; template text after it (ChatML's newline) is
    dropped. End-of-turn tokens typed at the end of the text are not doubled; a template that closes the
    turn with none gets the EOS. A template whose prompt tokens are not a prefix of the conversation's
    raises ValueError: its responses cannot be scored as the model generates them.
    """
    stops = end_of_turn_ids(tokenizer)
    stop_texts = [t for t in tokenizer.convert_ids_to_tokens(stops) if t]
    text = response.rstrip()
    while typed := next((t for t in stop_texts if text.endswith(t)), None):
        text = text[: -len(typed)].rstrip()
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if not full_text.startswith(prompt_text) or full_ids[: len(prompt_ids)] != prompt_ids:
        seam = slice(max(len(prompt_ids) - 2, 0), len(prompt_ids))
        where = ("its text" if not full_text.startswith(prompt_text) else
                 f"its tokens: the prompt ends {tokenizer.convert_ids_to_tokens(prompt_ids[seam])}, the "
                 f"conversation has {tokenizer.convert_ids_to_tokens(full_ids[seam])} there")
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render this conversation as "
                         f"the generation prompt followed by the response ({where}), so the response cannot be "
                         "scored as the model would generate it; use a template whose generation prompt is a "
                         "prefix of the conversation")
    rest = full_ids[len(prompt_ids):]
    end = next((k for k, t in enumerate(rest) if t in stops), None)
    return prompt_ids, rest[: end + 1] if end is not None else rest + [tokenizer.eos_token_id]


def encode_response(tokenizer, text: str, prompt: list[dict] | None = None) -> list[int]:
    """The response's tokens after `prompt` (default: a one-line user turn), closed by one end-of-turn token."""
    return encode_conversation(tokenizer, prompt or PLACEHOLDER_PROMPT, text)[1]


def encode_example(ex: Example, tokenizer, cfg: DataConfig) -> Encoded:
    prompt_ids, response_ids = encode_conversation(tokenizer, ex.prompt, ex.response)
    if len(prompt_ids) >= cfg.max_length:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens, no room for a response within "
                         f"data.max_length={cfg.max_length}")
    enc = Encoded(ex.row, prompt_ids, response_ids)
    if len(prompt_ids) > cfg.max_prompt_length:
        enc.prompt_ids, enc.prompt_truncated = prompt_ids[-cfg.max_prompt_length:], True
    room = cfg.max_length - len(enc.prompt_ids)
    if len(enc.response_ids) > room:
        enc.response_ids, enc.response_truncated = enc.response_ids[:room], True
    return enc


def prepare(rows: list, tokenizer, cfg: DataConfig, source: str) -> tuple[list[Encoded], DataReport]:
    """Check and encode every row; bad rows raise one DataError listing them, or are skipped when asked."""
    report, encoded, errors = DataReport(rows=len(rows)), [], []
    for i, row in enumerate(rows):
        try:
            enc = encode_example(parse_row(row, i, cfg), tokenizer, cfg)
        except ValueError as e:
            message = f"{source} row {i}: {e}"
            (report.skipped if cfg.skip_bad_rows else errors).append(message)
            continue
        encoded.append(enc)
        report.prompts_truncated += enc.prompt_truncated
        report.responses_truncated += enc.response_truncated
    if errors:
        listed = errors[:MAX_LISTED_ERRORS] + ([f"... and {len(errors) - MAX_LISTED_ERRORS} more"]
                                              if len(errors) > MAX_LISTED_ERRORS else [])
        raise DataError(f"{len(errors)} bad row(s) in {source} (set data.skip_bad_rows=true to skip them):\n  - "
                        + "\n  - ".join(listed))
    if not encoded:
        raise DataError(f"{source} has no usable rows")
    return encoded, report


def load_splits(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[Encoded], list[Encoded], DataReport]:
    """(train, held-out, report). Held-out rows come from `eval_path` or are drawn from `path` with `seed`."""
    limit = None if cfg.max_examples is None else cfg.max_examples + (0 if cfg.eval_path else cfg.eval_size)
    rows = read_rows(cfg.path, cfg.split, limit)
    examples, report = prepare(rows, tokenizer, cfg, cfg.path)
    if cfg.eval_path:
        eval_is_file = Path(cfg.eval_path).suffix.lower() in LOCAL_SUFFIXES
        if not eval_is_file and (Path(cfg.path).suffix.lower() in LOCAL_SUFFIXES or Path(cfg.path).exists()):
            raise DataError(f"data.eval_path={cfg.eval_path!r} names a split, but data.path {cfg.path} is a local "
                            "file with one split: give a held-out file, or leave eval_path empty to hold out "
                            "data.eval_size rows")
        eval_source = cfg.eval_path if eval_is_file else cfg.path
        eval_split = cfg.split if eval_source == cfg.eval_path else cfg.eval_path
        held_out, eval_report = prepare(read_rows(eval_source, eval_split, cfg.eval_size), tokenizer, cfg,
                                        cfg.eval_path)
        report.skipped += eval_report.skipped
        train = examples
    else:
        if cfg.eval_size >= len(examples):
            raise DataError(f"data.eval_size={cfg.eval_size} leaves no training rows out of {len(examples)}")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        held = set(order[: cfg.eval_size])
        held_out = [e for k, e in enumerate(examples) if k in held]
        train = [e for k, e in enumerate(examples) if k not in held]
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    return train, held_out, report
