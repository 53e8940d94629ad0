"""SFT data: read rows, check them, turn them into (prompt, response) token ids with the chat template.

A row is a chat (`messages`: a list of {role, content}; the last assistant turn is the response and
everything before it the prompt), a ShareGPT chat (`conversations` of {from, value}), an Alpaca row
(instruction, optional input, output) or a prompt/response pair of text columns (parse_row). The prompt is rendered with the
tokenizer's chat template and `add_generation_prompt=True`, exactly as the opponent sees it when it
generates; the response is what follows it when the whole conversation is rendered, closed by
exactly one end-of-turn token (`encode_conversation`).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DataConfig, where

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
MAX_LISTED_ERRORS = 20
SAMPLE_PREFIX = "sample:"
SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLES = ("demo",)
"""`sample:demo` is spin_lite/samples/demo_sft.jsonl (a copy of examples/data/demo_sft.jsonl)."""
SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "assistant": "assistant", "system": "system"}
"""ShareGPT's `from` values as chat roles (others are passed on as they are)."""


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
def local_file(path: str) -> Path | None:
    """The local file that `path` names, or None for a hub dataset id.

    `sample:NAME` is data shipped inside spin_lite (spin_lite/samples/NAME_sft.jsonl). Any other relative path
    is taken from the working directory, as axolotl, litgpt and TRL take theirs.
    """
    if path.startswith(SAMPLE_PREFIX):
        name = path[len(SAMPLE_PREFIX):]
        if name not in SAMPLES:
            raise DataError(f"unknown sample data {path!r}; the samples are: "
                            + ", ".join(SAMPLE_PREFIX + s for s in SAMPLES))
        return SAMPLES_DIR / f"{name}_sft.jsonl"
    p = Path(path).expanduser()
    return p if p.suffix.lower() in LOCAL_SUFFIXES or p.exists() else None


def read_rows(path: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """The first `limit` (default: all) rows of a local JSON/JSONL/Parquet/CSV file, or of a hub dataset's split.

    `split` is any datasets split expression ("train", "train_sft[:2200]", "train[10%:]"); `limit` applies to
    the rows it selects.
    """
    p = local_file(path)
    if p is not None:
        if not p.is_file():
            raise DataError(f"data file {path} does not exist ({where(p)})")
        try:
            return _read_local(p)[:limit]
        except DataError:
            raise
        except Exception as e:  # unreadable or malformed file: say which and why
            raise DataError(f"could not read data file {path}: {type(e).__name__}: {e}") from None
    import datasets
    try:
        datasets.ReadInstruction.from_spec(split)
    except Exception as e:
        raise DataError(f"data split {split!r} of {path} is not a split expression (e.g. train, train_sft[:2200], "
                        f"train[:10%]): {e}") from None
    try:
        rows = datasets.load_dataset(path, split=split)
        return (rows if limit is None else rows.select(range(min(limit, len(rows))))).to_list()
    except Exception as e:
        looked = "" if "/" not in path and "." not in path else (
            f"; it is not a local file or folder either ({where(Path(path).expanduser())})")
        raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: "
                        f"{type(e).__name__}: {str(e)[:300]}{looked}") from None


def _read_local(p: Path) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":  # utf-8-sig: files saved by Excel and Windows editors start with a byte-order mark
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p} line {n} is not valid JSON: {e}") from None
        return rows
    if suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8-sig"))
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} layout
        if not isinstance(data, list):
            raise DataError(f"{p} must hold a list of rows (or one key mapping to a list)")
        return data
    if suffix == ".csv":
        with open(p, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()


# -- checking ---------------------------------------------------------------------------------------
def row_format(row: dict, cfg: DataConfig) -> str:
    """The layout of one row: `data.format`, or for auto the first layout whose columns the row has."""
    if cfg.format != "auto":
        return cfg.format
    if row.get(cfg.messages_field) is not None:
        return "chat"
    if row.get(SHAREGPT_FIELD) is not None:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if cfg.prompt_field in row or cfg.response_field in row:
        return "prompt_response"
    if "instruction" in row or "output" in row:
        return "alpaca"  # half an Alpaca row: reported as its missing field
    raise ValueError(f"has none of the columns of a known layout ({_columns(row)}); expected "
                     f"{cfg.messages_field!r} (chat), {SHAREGPT_FIELD!r} (ShareGPT), 'instruction' + 'output' "
                     f"(Alpaca) or {cfg.prompt_field!r} + {cfg.response_field!r}; {_mapping_hint(row)}")


def parse_row(row, index: int, cfg: DataConfig) -> Example:
    """One raw row as an Example; raises ValueError naming the field that is wrong.

    chat: `messages_field`, a list of {role, content} (or ShareGPT's {from, value}); the last assistant turn
    is the response, everything before it the prompt. sharegpt: the same in `conversations`. alpaca: the
    prompt is `instruction`, followed by a blank line and `input` when that is not empty; the response is
    `output`. prompt_response: `prompt_field` and `response_field`. Single-turn rows get `system_prompt`.
    """
    if not isinstance(row, dict):
        raise ValueError(f"is a {type(row).__name__}, not an object with fields")
    fmt = row_format(row, cfg)
    if fmt in ("chat", "sharegpt"):
        name = cfg.messages_field if fmt == "chat" else SHAREGPT_FIELD
        _require(row, [name], cfg, f"data.format={fmt} reads {name!r}" + (
            "; data.messages_field names another column" if fmt == "chat" else ""))
        return _parse_chat(row[name], index, name)
    if fmt == "alpaca":
        _require(row, ["instruction", "output"], cfg, "data.format=alpaca reads 'instruction', 'input' and 'output'")
        _check_fields(row, ["instruction", "output"], optional=["input"])
        extra = row.get("input")
        prompt = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
        return _single_turn(index, prompt, row["output"], cfg)
    _require(row, [cfg.prompt_field, cfg.response_field], cfg, _mapping_hint(row))
    _check_fields(row, [cfg.prompt_field, cfg.response_field])
    return _single_turn(index, row[cfg.prompt_field], row[cfg.response_field], cfg)


def _single_turn(index: int, prompt: str, response: str, cfg: DataConfig) -> Example:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return Example(index, messages + [{"role": "user", "content": prompt}], response)


def _require(row: dict, fields: list[str], cfg: DataConfig, hint: str):
    """Raise the missing-field error; its text depends only on the row's columns, so rows that share the
    problem share the message (and are listed once, with their count)."""
    missing = [f for f in fields if f not in row]  # a column there but null is reported by _text_problem
    if not missing:
        return
    if cfg.format != "auto":
        try:
            detected = row_format(row, replace(cfg, format="auto"))
        except ValueError:
            detected = cfg.format
        if detected != cfg.format:
            hint = f"data.format=auto reads these columns as {detected}; " + hint
    raise ValueError(f"missing field {missing[0]!r} (columns: {_columns(row)}; {hint})")


def _columns(row: dict) -> str:
    return ", ".join(repr(str(k)) for k in row) or "none"


def _mapping_hint(row: dict) -> str:
    names = [str(k) for k in row]
    if len(names) == 2:
        return f"to read these, set data.prompt_field={names[0]} data.response_field={names[1]}"
    return "name the columns with data.prompt_field=COLUMN data.response_field=COLUMN"


def _parse_chat(messages, index: int, name: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {name!r} must be a non-empty list of messages")
    turns, text_keys = [], []
    for k, m in enumerate(messages):
        sharegpt = isinstance(m, dict) and "role" not in m and "from" in m  # {from: human|gpt|system, value}
        role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or text_key not in m:
            raise ValueError(f"field {name!r} message {k} must have a 'role' and a 'content' (or 'from' and 'value')")
        _check_text(m[text_key], f"{name}[{k}].{text_key}", allow_empty=True)  # the file's own key, in messages
        turns.append({"role": SHAREGPT_ROLES.get(m["from"], m["from"]) if sharegpt else m["role"],
                      "content": m[text_key]})
        text_keys.append(text_key)
    last = max((k for k, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"field {name!r} has no assistant message to use as the response")
    if not any(m["role"] == "user" for m in turns[:last]):
        raise ValueError(f"field {name!r} has no user message before the last assistant message")
    _check_text(turns[last]["content"], f"{name}[{last}].{text_keys[last]}")
    return Example(index, turns[:last], turns[last]["content"])


def _check_fields(row: dict, required: list[str], optional: list[str] = ()):
    """One ValueError naming every bad text field of a single-turn row (an optional field may be absent or null),
    so that fixing the first one does not reveal the next."""
    problems = [_text_problem(row[name], name) for name in required]
    problems += [_text_problem(row[name], name, allow_empty=True) for name in optional if row.get(name) is not None]
    if any(problems):
        raise ValueError("; ".join(p for p in problems if p))


def _check_text(value, name: str, allow_empty: bool = False):
    if problem := _text_problem(value, name, allow_empty):
        raise ValueError(problem)


def _text_problem(value, name: str, allow_empty: bool = False) -> str | None:
    """What is wrong with a text field, named as the file names it (`output`, `conversations[1].value`)."""
    if value is None:
        return f"field {name!r} is null; it must hold text"
    if not isinstance(value, str):
        return f"field {name!r} must be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"field {name!r} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON escape "\ud800" with no pair
        return (f"field {name!r} is not valid Unicode text: {value[e.start]!r} at character {e.start} "
                "is half of a surrogate pair, which no tokenizer can encode")
    return None


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
    report, encoded, errors = DataReport(rows=len(rows)), [], {}
    for i, row in enumerate(rows):
        try:
            example = parse_row(row, i, cfg)
        except ValueError as e:
            problem = str(e)
        else:
            try:
                enc = encode_example(example, tokenizer, cfg)
            except ValueError as e:
                problem = str(e)
            except TypeError as e:  # the tokenizer refuses text (parse_row catches the known cases by field)
                problem = f"the tokenizer cannot encode it ({type(e).__name__}: {str(e)[:200]})"
            else:
                encoded.append(enc)
                report.prompts_truncated += enc.prompt_truncated
                report.responses_truncated += enc.response_truncated
                continue
        if cfg.skip_bad_rows:
            report.skipped.append(f"{source} row {i}: {problem}")
        else:
            errors.setdefault(problem, []).append(i)
    if errors:
        # rows that share a problem (a column missing from the whole file) are one line, with their count
        listed = [f"{source} row {ks[0]}: {problem}" if len(ks) == 1 else
                  f"{source} rows {', '.join(map(str, ks[:5]))}{' ...' if len(ks) > 5 else ''} ({len(ks)} rows): "
                  f"{problem}" for problem, ks in errors.items()]
        listed = listed[:MAX_LISTED_ERRORS] + ([f"... and {len(listed) - MAX_LISTED_ERRORS} more problems"]
                                              if len(listed) > MAX_LISTED_ERRORS else [])
        count = sum(map(len, errors.values()))
        # skipping helps only when some rows are good; when none is, the fix is in the lines below
        advice = (" (set data.skip_bad_rows=true to skip them)" if count < len(rows) else
                  ", every row it has (data.skip_bad_rows would leave none; the fix is in the data or its settings)")
        raise DataError(f"{count} bad row(s) in {source}{advice}:\n  - " + "\n  - ".join(listed))
    if not encoded:
        raise DataError(f"{source} has no usable rows")
    return encoded, report


@dataclass
class Splits:
    """The rows of a run, in three disjoint parts."""
    train: list[Encoded]
    """Trained on."""
    val: list[Encoded]
    """Validation: what the stop rule and the best iteration are chosen on."""
    test: list[Encoded]
    """Held-out test rows: reported on, never read by anything that chooses."""
    report: DataReport


def load_splits(cfg: DataConfig, tokenizer, seed: int) -> Splits:
    """Training, validation and test rows. The test rows come from `eval_path` (its first eval_size rows) or
    are drawn from `path` with `seed`; the validation rows likewise from `val_path`, or drawn next; the rest
    (at most max_examples) are the training rows."""
    drawn = (0 if cfg.eval_path else cfg.eval_size) + (0 if cfg.val_path else cfg.val_size)
    limit = None if cfg.max_examples is None else cfg.max_examples + drawn
    examples, report = prepare(read_rows(cfg.path, cfg.split, limit), tokenizer, cfg, cfg.path)
    if drawn >= len(examples):
        raise DataError(f"data.eval_size={cfg.eval_size} and data.val_size={cfg.val_size} leave no training rows "
                        f"out of the {len(examples)} rows of {cfg.path}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts = {}
    for name, path, size in (("test", cfg.eval_path, cfg.eval_size), ("val", cfg.val_path, cfg.val_size)):
        if path:
            parts[name] = _held_out_file(cfg, tokenizer, report, path, size, name)
        else:
            parts[name] = [examples[k] for k in sorted(order[:size])]
            order = order[size:]
    train = [examples[k] for k in sorted(order)]
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    splits = Splits(train, parts["val"], parts["test"], report)
    shared = shared_prompts(splits)
    if shared and not cfg.allow_shared_prompts:
        raise DataError(f"{len(shared)} prompt(s) are in more than one of the training, validation and test rows, so "
                        "the held-out rows are not held out: " + "; ".join(shared[:5]) + (" ..." if len(shared) > 5
                        else "") + ". Remove the duplicates (or set data.allow_shared_prompts=true to accept them)")
    return splits


def shared_prompts(splits: Splits) -> list[str]:
    """The prompts that occur in two or more of the splits (the same token ids after the chat template), each as
    "'<prompt start>' in train row 3 and test row 12". A model trained on a validation or test prompt is judged on
    what it saw: the choice and the report would both flatter it."""
    where: dict[tuple, list[str]] = {}
    for name, rows in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        for e in rows:
            where.setdefault(tuple(e.prompt_ids), []).append(f"{name} row {e.row}")
    found = []
    for places in where.values():
        if len({p.split()[0] for p in places}) > 1:
            found.append(" and ".join(places))
    return found


def _held_out_file(cfg: DataConfig, tokenizer, report: DataReport, path: str, size: int, name: str):
    """The first `size` rows of a held-out file, or of a split (named by `path`) of the hub dataset `cfg.path`."""
    setting = "data.eval_path" if name == "test" else "data.val_path"
    is_file = path.startswith(SAMPLE_PREFIX) or Path(path).suffix.lower() in LOCAL_SUFFIXES
    if not is_file and local_file(cfg.path) is not None:
        raise DataError(f"{setting}={path!r} names a split, but data.path {cfg.path} is a local file with one "
                        f"split: give a file, or leave {setting} empty to draw the rows from data.path")
    source, split = (path, cfg.split) if is_file else (cfg.path, path)
    rows, held_report = prepare(read_rows(source, split, size), tokenizer, cfg, path)
    report.skipped += held_report.skipped
    return rows
