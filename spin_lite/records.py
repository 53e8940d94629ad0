"""The records of a run directory: one typed, validated record for every JSON file it holds, and the one reader of
them (read_record, read_records; spin_lite.state.read_json and read_jsonl call them).

A run directory's files are written by the engine, but read back after kills, by other versions of spin_lite, and
after whatever a user (or an upload through the app) put there. Each is read through the record of its place in the
run directory (RECORDS, by folder and name), whose fields' types and ranges are checked, so that a damaged file is a
named refusal, RunRecordError, whose message names the file, the field and what was expected:

    runs/demo/iter-01/summary.json: field train.steps: expected a whole number, got "6"

and never a KeyError or TypeError in whichever view touched it first. The records use pydantic (already installed
with Gradio, and declared in pyproject.toml): strict types (no "6" read as 6, no true as 1), ranges where a value has
one (a rate in [0, 1], a count >= 0), finite numbers, and the error location of a nested field, at little code.

The records are tolerant in one direction only: a field that an earlier version did not write, or that a run made by
hand (the tests) leaves out, may be missing, and fields a later version adds are kept; a field that is there must have
its type and range. Which model a run chose is checked against the models the run has by spin_lite.state.RunDir
(check_choice), which knows them.

    state.json, progress.json, summary.json        RunState, RunProgress, RunSummary
    proto.jsonl                                    ProtoResponse (tspin's proto-synthetic responses)
    eval-start.json, eval-base.json                StartEvaluation
    iter-NN/  summary.json, eval.json, train_metrics.json, samples.jsonl, train_log.jsonl, pairs.jsonl
              IterationSummary, Evaluation, TrainMetrics, Sample, StepRecord, Pair
    control-NN/ (control-ARM-NN/)  summary.json, eval.json, samples.jsonl, train_log.jsonl
                 ControlSummary, Evaluation, Sample, StepRecord
    sft/  summary.json, train_log.jsonl            SftSummary, StepRecord
    app-run.json                                   AppProcess (spin_lite.app.processes: the process the app started)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator


class RunRecordError(ValueError):
    """A file of a run directory that cannot be read as its record: not JSON, or a field of the wrong type or range,
    or a choice naming a model the run does not have. `field` is None when the file as a whole is wrong."""

    def __init__(self, path: Path | str, field: str | None, expected: str, got: object = None, line: int | None = None):
        self.path, self.field, self.expected, self.got, self.line = Path(path), field, expected, got, line
        where = f"{path}" + (f" line {line}" if line is not None else "")
        what = f"field {field}: expected {expected}" if field else f"expected {expected}"
        super().__init__(f"{where}: {what}" + ("" if got is None else f", got {_shown(got)}")
                         + ". The file is damaged or was edited: restore it, or move the run directory aside and "
                           "start a new one")


def _shown(value, n: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) or len(value) < n else json.dumps(value[:n]) + "..."
    return text if len(text) <= n + 5 else text[:n] + "..."


# -- field types, declared once --------------------------------------------------------------------------------
Share = Annotated[float, Field(ge=0, le=1)]  # a rate over rows: ended, repetitive, match, task, margin accuracy
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
# "start", "iter N", "control N" (SFT continued), or "control-ARM N" (a control arm's, e.g. "control-spin 2")
MODEL_KEY = r"start|iter \d{1,4}|control(-[a-z]+)? \d{1,4}"
ModelKey = Annotated[str, StringConstraints(pattern=rf"^({MODEL_KEY})$")]


class Record(BaseModel):
    """Strict types (JSON's: no "6" for 6, no true for 1), finite numbers; unknown fields kept (a later version's)."""
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class Metrics(Record):
    """A model's metrics on a set of rows (spin_lite.evaluate: its module docstring defines each)."""
    logp_per_token: float | None = None
    margin_accuracy: Share | None = None
    tie_share: Share | None = None
    spin_loss: float | None = None
    sample_tokens: Annotated[float, Field(ge=0)] | None = None
    ended_rate: Share | None = None
    repetition_rate: Share | None = None
    length_ratio: Annotated[float, Field(ge=0)] | None = None
    match_rate: Share | None = None
    task_accuracy: Share | None = None


class RowScore(Record):
    """One row's scores (spin_lite.evaluate.row_scores): the paired test reads these."""
    logp: float
    tokens: Annotated[float, Field(ge=0)]  # (a count, stored as the float the scorer summed it in)
    ended: bool | None = None
    repetitive: bool | None = None
    match: bool | None = None
    task: bool | None = None


RowScores = dict[str, RowScore]


class Sample(Record):
    """A held-out row side by side (samples.jsonl, eval-start.json's samples): prompt, real, opponent, model."""
    key: str | None = None
    prompt: str | None = None  # (each present in every sample the engine writes; a sample made by hand may lack one)
    real: str | None = None
    opponent: str | None = None
    model: str | None = None
    model_tokens: Count | None = None
    model_truncated: bool | None = None
    scores: dict | None = None


class StartEvaluation(Record):
    """eval-start.json (the starting model) and eval-base.json (the model before the SFT stage): test metrics
    (`metrics`), validation metrics, samples, and the per-row scores."""
    metrics: Metrics | None = None
    val: Metrics | None = None
    samples: list[Sample] = []
    val_rows: RowScores | None = None
    test_rows: RowScores | None = None


class Evaluation(Record):
    """iter-NN/eval.json and control-NN/eval.json: test and validation metrics, and the per-row scores. An eval.json
    made before validation rows existed holds the test metrics alone, read as {"test": ...}."""
    test: Metrics | None = None
    val: Metrics | None = None
    val_rows: RowScores | None = None
    test_rows: RowScores | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        if isinstance(data, dict) and "test" not in data and "logp_per_token" in data:
            return {"test": data}
        return data


class TrainMetrics(Record):
    """train_metrics.json and an iteration summary's `train`: the last epoch's mean step metrics, and the steps."""
    loss: float | None = None
    accuracy: Share | None = None
    steps: Count | None = None
    skipped_steps: Count | None = None


class Selection(Record):
    """A stop-rule verdict (an iteration's or a control's summary.json `selection`; spin_lite.run.SpinRun.selection).
    `better` is the paired rule's "chosen"; a verdict without it (the aggregate rule) has `accepted` alone."""
    accepted: bool
    better: bool | None = None
    compared_with: str | None = None  # (readers say "the model before it" where a verdict made by hand lacks it)
    reasons: list[str] | None = None
    rule: Literal["paired", "aggregate"] | None = None
    confidence: Annotated[float, Field(gt=0, lt=1)] | None = None
    rows: Count | None = None
    rejected_in_a_row: Count | None = None
    stop: bool | None = None


class Versus(Record):
    """The final comparison of SPIN's choice with the control arm's (a control summary's `versus`, summary.json's
    `comparison`); whether `winner` is a model of the run is RunDir.check_choice's question."""
    spin: ModelKey
    control: ModelKey | None = None
    winner: ModelKey
    against: ModelKey | None = None
    verdict: dict | None = None
    line: str = ""


class IterationSummary(Record):
    """iter-NN/summary.json, written last: the iteration is complete. `iteration` is the folder's number."""
    iteration: Count
    train: TrainMetrics | None = None
    eval: Metrics | None = None
    val: Metrics | None = None
    selection: Selection | None = None


class ControlSummary(Record):
    """control-NN/summary.json, written last: the control is complete. `control` is the folder's number."""
    control: Count
    arm: str | None = None  # which control arm: "sft", or "spin" (SPIN's rate; folder control-spin-NN)
    steps: Count | None = None
    cumulative_steps: Count | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    train: dict | None = None
    eval: Metrics | None = None
    val: Metrics | None = None
    selection: Selection | None = None
    versus: Versus | None = None


class SftSummary(Record):
    """sft/summary.json, written last: the SFT stage is done."""
    steps: Count | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    start_adapter: str | None = None
    train_loss: float | None = None
    train_rows: Count | None = None


class RunSummary(Record):
    """summary.json of the run, written when a run ends: its chosen model, the final comparison, the table."""
    chosen: ModelKey | None = None
    comparison: Versus | None = None
    best_iteration: Annotated[int, Field(ge=-1)] | None = None
    best_control: Annotated[int, Field(ge=-1)] | None = None
    models: list[dict] = []


class RunState(Record):
    """state.json: where the run is, for display (RunDir.set_state)."""
    iteration: Count | None = None
    stage: str | None = None
    status: Literal["running", "finished", "stopped", "failed"] | None = None
    updated: float | None = None
    best_iteration: Annotated[int, Field(ge=-1)] | None = None
    chosen: ModelKey | None = None
    error: str | None = None


class RunProgress(Record):
    """progress.json: the running stage's progress (spin_lite.state.Progress)."""
    iteration: Count | None = None
    stage: str
    done: Count = 0
    total: Count | None = None
    rate: Annotated[float, Field(ge=0)] | None = None
    updated: float | None = None


class StepRecord(Record):
    """One line of a train_log.jsonl: one optimizer step (spin_lite.train.fit)."""
    step: Annotated[int, Field(ge=1)]
    loss: float
    accuracy: Share | None = None
    margin: float | None = None


class Pair(Record):
    """One line of pairs.jsonl: a prompt, the real and the generated response (token ids), the opponent's scores."""
    key: str
    split: str
    prompt_ids: list[int]
    real_ids: list[int]
    gen_ids: list[int]
    gen_truncated: bool
    opponent_real: float | None = None
    opponent_gen: float | None = None


class ProtoResponse(Record):
    """One line of proto.jsonl: the starting model's own response to a training prompt (token ids), by row key."""
    key: str
    ids: list[int]


class AppProcess(Record):
    """app-run.json: the process the app launched for a run (spin_lite.app.processes) and how it ended."""
    pid: int
    command: list[str] = []
    started: float | None = None
    process_start: int | None = None
    returncode: int | None = None
    ended: float | None = None
    aborted: bool | None = None


# -- which record each file is: (folder pattern, file name) -> record; "" is the run directory itself -----------
RECORDS: dict[tuple[str, str], type[Record]] = {
    ("", "state.json"): RunState, ("", "progress.json"): RunProgress, ("", "summary.json"): RunSummary,
    ("", "eval-start.json"): StartEvaluation, ("", "eval-base.json"): StartEvaluation,
    ("", "app-run.json"): AppProcess, ("", "proto.jsonl"): ProtoResponse,
    ("iter", "summary.json"): IterationSummary, ("iter", "eval.json"): Evaluation,
    ("iter", "train_metrics.json"): TrainMetrics, ("iter", "samples.jsonl"): Sample,
    ("iter", "train_log.jsonl"): StepRecord, ("iter", "pairs.jsonl"): Pair,
    ("control", "summary.json"): ControlSummary, ("control", "eval.json"): Evaluation,
    ("control", "samples.jsonl"): Sample, ("control", "train_log.jsonl"): StepRecord,
    ("sft", "summary.json"): SftSummary, ("sft", "train_log.jsonl"): StepRecord,
}
FOLDER = re.compile(r"(iter|control)(?:-[a-z]+)?-(\d{2,4})")  # iter-NN, control-NN, control-ARM-NN
# The field that names a stage folder's number, which must be the folder's own.
NUMBERED = {IterationSummary: "iteration", ControlSummary: "control"}


def record_of(path: Path) -> type[Record] | None:
    """The record of a run directory's file, by its folder and name; None for a file that has none (one outside a
    run directory's layout is read as plain JSON)."""
    folder = FOLDER.fullmatch(path.parent.name)
    kind = folder[1] if folder else "sft" if path.parent.name == "sft" else ""
    return RECORDS.get((kind, path.name))


def read_record(path: Path, default=None):
    """The JSON of `path` checked against its record (record_of), as parsed (a dict); `default` when there is no
    file. RunRecordError when it cannot be read, is not JSON, or does not fit its record."""
    path = Path(path)
    if not path.exists():
        return default
    data = _parse(path, _text(path))
    record = record_of(path)
    if record is not None:
        check(record, data, path)
    return data


def read_records(path: Path) -> list[dict]:
    """The lines of a JSON-lines file (one JSON object a line), each checked against the file's record; [] when
    there is no file."""
    path = Path(path)
    if not path.exists():
        return []
    record = record_of(path)
    rows = []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if line.strip():
            rows.append(_parse(path, line, number))
            if record is not None:
                check(record, rows[-1], path, number)
            elif not isinstance(rows[-1], dict):
                raise RunRecordError(path, None, "a JSON object ({...}) on each line", rows[-1], number)
    return rows


def check(record: type[Record], data, path: Path, line: int | None = None) -> Record:
    """`data` validated as `record`, or RunRecordError naming the first field that does not fit."""
    if not isinstance(data, dict):
        raise RunRecordError(path, None, f"a JSON object ({{...}}) as {record.__name__} holds it", data, line)
    try:
        value = record.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        raise RunRecordError(path, _field(error["loc"]) or None, _expected(error), _got(error), line) from None
    number = NUMBERED.get(record)
    folder = FOLDER.fullmatch(path.parent.name)
    if number and folder and getattr(value, number) != int(folder[2]):
        raise RunRecordError(path, number, f"{int(folder[2])}, the number of its folder {path.parent.name}",
                             getattr(value, number), line)
    return value


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunRecordError(path, None, "UTF-8 text (JSON); the file holds other bytes") from None
    except OSError as e:
        raise RunRecordError(path, None, f"a readable file ({e.strerror or e})") from None


def _parse(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except ValueError as e:  # (json.JSONDecodeError, and a number too long for int())
        raise RunRecordError(path, None, f"JSON ({getattr(e, 'msg', str(e))[:80]})", line=line) from None


def _field(loc: tuple) -> str:
    """pydantic's error location as a dotted field: ("train", "steps") -> "train.steps", ("samples", 3, "real") ->
    "samples[3].real"; the branch names of a union (float | None) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("float", "int", "str", "bool", "list", "dict", "none", "function-after", "constrained-str") \
                or part.startswith(("function-", "constrained-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


# What a pydantic error type expected, in the words of the message.
EXPECTED = {"int_type": "a whole number", "int_from_float": "a whole number", "float_type": "a number",
            "bool_type": "true or false", "string_type": "text (a JSON string)", "list_type": "a list",
            "dict_type": "a JSON object ({...})", "model_type": "a JSON object ({...})",
            "model_attributes_type": "a JSON object ({...})", "finite_number": "a finite number",
            "missing": "a value (the field is missing)",
            "string_pattern_mismatch": "a model: start, iter N or control N"}


def _expected(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
              "less_than": "< {lt}"}
    if kind in bounds:
        return "a number " + bounds[kind].format(**{k: f"{v:g}" if isinstance(v, (int, float)) else v
                                                   for k, v in ctx.items()})
    if kind == "literal_error":
        return "one of " + str(ctx.get("expected", ""))
    return EXPECTED.get(kind, error["msg"].removeprefix("Input should be "))


def _got(error: dict):
    return None if error["type"] == "missing" else error.get("input")
