"""How long a run will take, before it starts: each stage's work (from the data and the settings) times a
throughput measured here, on this machine, with the run's own model.

    spin-lite estimate CONFIG [key=value ...]     # the app's Setup tab: "Estimate the time"

The probe loads the model as a run does (base + a fresh trainable adapter), then times, after one warm-up each:
a generation batch's prefill and each further decoding step (the eager engine), one scoring forward pass of a
batch, and one training micro batch (forward and backward of micro_batch_size real/generated pairs). Prompts and
real responses have the data's mean lengths, generated responses the token cap. Generation is counted to its token
cap (answers that end earlier make it faster), so the estimate is an upper bound there; it leaves out loading the
model and writing files.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .config import SpinConfig

PROBE_TOKENS = 8  # decoding steps timed: the time per step is (8 steps - 1 step) / 7, without the prompt's pass
PROBE_REPEATS = 2  # timed calls of each kind, after one warm-up; the fastest is kept (less noise from other jobs)


@dataclass
class Throughput:
    """Seconds per unit of work, measured on this machine (`probe`)."""
    prefill_s: float  # a batch of generation.batch_size prompts read, and its first token
    decode_step_s: float  # each further token of that batch
    score_batch_s: float  # one forward pass of 2 x micro_batch_size sequences, no gradient
    train_micro_s: float  # forward + backward of micro_batch_size pairs (2 x micro_batch_size sequences)
    device: str


@dataclass
class StageEstimate:
    stage: str
    work: str  # what the stage does in one iteration, in its own units
    first_s: float  # seconds in iteration 0
    later_s: float  # seconds in each later iteration (previous pairs mixed in)


def _timed(fn) -> float:
    fn()  # warm-up: lazy initialisation, allocator, kernels
    best = math.inf
    for _ in range(PROBE_REPEATS):
        began = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return best


def probe(cfg: SpinConfig, prompt_len: int, response_len: int) -> Throughput:
    """Time the three kinds of work with the run's model and sequences of the given mean lengths."""
    from .generate import decode
    from .logprobs import collate, sequence_logprobs
    from .model import build_model, device, load_base

    model = build_model(load_base(cfg.model), cfg.lora, [], trainable=True)
    where = next(model.parameters()).device
    prompt, response = [1] * max(prompt_len, 1), [1] * max(response_len, 1)
    micro = cfg.train.micro_batch_size
    generated = [1] * max(cfg.generation.max_new_tokens, 1)  # the opponent's answers: counted at their cap
    batch = collate([prompt] * 2 * micro, [response] * micro + [generated] * micro, pad_id=0).to(where)
    gen_batch = cfg.generation.batch_size

    def decoding(new_tokens: int):  # the eager engine's loop, greedy, with no stop id: exactly new_tokens steps
        with torch.no_grad():
            decode(model, [prompt] * gen_batch, [], 0, new_tokens, lambda scores, rows, active: scores.argmax(-1),
                   lambda *finished: None)

    steps = max(min(cfg.generation.max_new_tokens, PROBE_TOKENS), 2)

    def score_batch():
        with torch.no_grad():
            sequence_logprobs(model, batch)

    def train_micro():
        logps, _ = sequence_logprobs(model, batch)
        logps.sum().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    prefill = _timed(lambda: decoding(1))
    step = max((_timed(lambda: decoding(steps)) - prefill) / (steps - 1), 1e-6)
    scored = _timed(score_batch)
    model.train()
    trained = _timed(train_micro)
    return Throughput(prefill, step, scored, trained, str(device()))


def stage_work(cfg: SpinConfig, n_train: int, n_val: int, n_test: int) -> dict:
    """Units of work per stage in iteration 0 and in a later one (spin_lite.run's stages)."""
    g, t = cfg.generation, cfg.train
    prompts = n_train + n_val + n_test  # the opponent answers every training, validation and test prompt
    previous = n_train if t.mix_previous else 0  # from iteration 1: the previous iteration's pairs again
    held_out = (n_val + n_test) if cfg.eval.enabled else 0
    eval_batches = (math.ceil(n_val / g.batch_size) + math.ceil(n_test / g.batch_size)) if cfg.eval.enabled else 0
    return {
        "generate": {"batches": math.ceil(prompts / g.batch_size), "tokens": g.max_new_tokens},
        "score": {"first": 2 * prompts, "later": 2 * (prompts + previous)},  # real and generated, every pair
        "train": {"first": t.steps_per_epoch(n_train) * t.epochs,
                  "later": t.steps_per_epoch(n_train + previous) * t.epochs, "micro": t.gradient_accumulation_steps},
        # greedy answers, and the real and generated responses scored; in iteration 0 the starting model too
        "evaluate": {"batches": eval_batches, "tokens": cfg.eval.max_new_tokens or g.max_new_tokens,
                     "sequences": 2 * held_out, "start_sequences": held_out},
    }


def estimate(cfg: SpinConfig, n_train: int, n_val: int, n_test: int, speed: Throughput) -> list[StageEstimate]:
    w = stage_work(cfg, n_train, n_val, n_test)
    per_sequence = speed.score_batch_s / (2 * cfg.train.micro_batch_size)
    answering = lambda batches, tokens: batches * (speed.prefill_s + (tokens - 1) * speed.decode_step_s)
    gen = answering(w["generate"]["batches"], w["generate"]["tokens"])
    train = lambda steps: steps * w["train"]["micro"] * speed.train_micro_s
    e = w["evaluate"]
    answers = answering(e["batches"], e["tokens"])
    ev = answers + e["sequences"] * per_sequence
    ev_first = ev + answers + e["start_sequences"] * per_sequence  # the starting model is evaluated once
    # the SFT stage and the control arm (spin_lite.control): SFT steps on the real responses alone, half a SPIN
    # micro batch's sequences, so half its time; each model they make is evaluated like an iteration's
    sft_step = w["train"]["micro"] * speed.train_micro_s / 2
    extra = []
    if cfg.sft.enabled:
        steps = cfg.sft.steps or cfg.train.steps_per_epoch(n_train) * cfg.sft.epochs
        extra.append(StageEstimate("sft", f"{steps} SFT steps (and the model before it evaluated once)",
                                   steps * sft_step + answers + e["start_sequences"] * per_sequence, 0.0))
    if cfg.sft.control:
        control = lambda steps: steps * sft_step + answers + e["start_sequences"] * per_sequence
        extra.append(StageEstimate("control", f"{w['train']['first']} SFT steps (later iterations "
                                   f"{w['train']['later']}), evaluated", control(w["train"]["first"]),
                                   control(w["train"]["later"])))
    return extra + [
        StageEstimate("generate", f"{w['generate']['batches']} batches x up to {w['generate']['tokens']} tokens",
                      gen, gen),
        StageEstimate("score", f"{w['score']['first']} sequences (later iterations {w['score']['later']})",
                      w["score"]["first"] * per_sequence, w["score"]["later"] * per_sequence),
        StageEstimate("train", f"{w['train']['first']} steps (later iterations {w['train']['later']})",
                      train(w["train"]["first"]), train(w["train"]["later"])),
        StageEstimate("evaluate", f"{e['batches']} batches x up to {e['tokens']} tokens (+ the start model once)",
                      ev_first, ev),
    ]


def total_s(stages: list[StageEstimate], iterations: int) -> float:
    return sum(s.first_s + max(iterations - 1, 0) * s.later_s for s in stages)


def fmt_s(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_run(cfg: SpinConfig, log=print) -> tuple[list[StageEstimate], str]:
    """Load the data as a run does, probe this machine, and return the stages' estimates with a summary line."""
    from .data import load_splits
    from .model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, cfg.seed)
    if not splits.train:
        raise ValueError(f"{cfg.data.path} leaves no training rows after the test and validation rows")
    prompt_len = round(sum(len(e.prompt_ids) for e in splits.train) / len(splits.train))
    response_len = round(sum(len(e.response_ids) for e in splits.train) / len(splits.train))
    log(f"estimate: probing this machine with {cfg.model.name} ({prompt_len}-token prompts, {response_len}-token "
        "responses)")
    speed = probe(cfg, prompt_len, response_len)
    stages = estimate(cfg, len(splits.train), len(splits.val), len(splits.test), speed)
    line = (f"about {fmt_s(total_s(stages, cfg.iterations))} for {cfg.iterations} iteration(s) on {speed.device} "
            f"({len(splits.train)} training, {len(splits.val)} validation, {len(splits.test)} test rows), "
            "not counting model loading; generation counted to its token cap")
    return stages, line


def format_estimate(stages: list[StageEstimate], line: str) -> str:
    rows = [f"{'stage':<10} {'work per iteration':<48} {'iteration 0':>12} {'each later':>12}"]
    rows += [f"{s.stage:<10} {s.work:<48} {fmt_s(s.first_s):>12} {fmt_s(s.later_s):>12}" for s in stages]
    return "\n".join(rows + [line])
