"""Evaluation without a judge, on the validation rows (what the stop rule chooses on) and on the test rows
(what is reported; nothing that chooses reads them). Metrics of a model on a set of rows:

  logp_per_token    mean log-likelihood per token of the real responses (nats; higher is closer to the data)
  margin_accuracy   share of pairs where the model prefers the real response over its opponent's, in the SPIN
                    sense: log p(y)/p_t(y) > log p(y')/p_t(y')  (None for the starting model)
  spin_loss         the SPIN loss of those pairs against the iteration's own opponent (None for the start)
  ended_rate        share of greedy answers that end (a stop token before the cap): a model that never stops
                    answering scores 0 however likely it finds the real responses
  repetition_rate   share of greedy answers in which some word trigram occurs 3 or more times (degeneration)
  length_ratio      mean greedy answer length / mean real response length (tokens)
  sample_tokens     mean length of the greedy answers (tokens)
  match_rate        share of greedy answers matching eval.match_regex, when one is set
  task_accuracy     share of greedy answers whose eval.answer_regex answer equals the real response's, when set

`compare` is the stop rule's test of one model against another on the validation metrics.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from .config import SpinConfig
from .generate import generate_batch
from .logprobs import collate, sequence_logprobs
from .loss import spin_loss


@torch.no_grad()
def score(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int,
          progress=None):
    """(summed log-probs, token counts) of each response given its prompt, as Python lists."""
    model.eval()
    device = next(model.parameters()).device
    logps, counts = [], []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id).to(device)
        lp, n = sequence_logprobs(model, batch)
        logps += lp.tolist()
        counts += n.tolist()
        if progress is not None:
            progress(len(logps))
    return logps, counts


def evaluate(model, tokenizer, items: list[dict], cfg: SpinConfig, beta: float | None = None,
             stop_ids: list[int] | None = None, progress=None) -> tuple[dict, list[dict]]:
    """Metrics and side-by-side samples on `items` (dicts with key, prompt_ids, real_ids and, after the starting
    model, the opponent's gen_ids, opponent_real, opponent_gen; `beta`: the iteration's, for spin_loss).
    `progress(done)` is called with the number of items whose greedy answer is written."""
    pad, bs = tokenizer.pad_token_id, cfg.train.micro_batch_size * 2
    prompts = [it["prompt_ids"] for it in items]
    real_logps, real_counts = score(model, prompts, [it["real_ids"] for it in items], pad, bs)
    metrics = {"logp_per_token": sum(real_logps) / max(sum(real_counts), 1), "margin_accuracy": None,
               "spin_loss": None}
    if items and "opponent_real" in items[0]:
        gen_logps, _ = score(model, prompts, [it["gen_ids"] for it in items], pad, bs)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)
        pairs = spin_loss(as_tensor(real_logps), as_tensor(gen_logps), as_tensor([it["opponent_real"] for it in items]),
                          as_tensor([it["opponent_gen"] for it in items]), beta or cfg.beta_at(0), cfg.train.loss_type)
        metrics["margin_accuracy"] = pairs.accuracy.mean().item()
        metrics["spin_loss"] = pairs.losses.mean().item()

    samples = []
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    stops = stop_ids or tokenizer.eos_token_id
    for i in range(0, len(items), cfg.generation.batch_size):
        chunk = items[i:i + cfg.generation.batch_size]
        outs = generate_batch(model, [it["prompt_ids"] for it in chunk], cfg.generation, stops, pad,
                              seed=cfg.seed, max_new_tokens=max_new, do_sample=False)
        for it, (ids, truncated) in zip(chunk, outs):
            samples.append({
                "key": it["key"],
                "prompt": tokenizer.decode(it["prompt_ids"], skip_special_tokens=False),
                "real": tokenizer.decode(it["real_ids"], skip_special_tokens=True),
                "opponent": tokenizer.decode(it["gen_ids"], skip_special_tokens=True) if "gen_ids" in it else None,
                "model": tokenizer.decode(ids, skip_special_tokens=True),
                "model_tokens": len(ids), "model_truncated": truncated})
        if progress is not None:
            progress(len(samples))
    metrics |= answer_metrics(samples, [len(it["real_ids"]) for it in items], cfg)
    return metrics, samples


def answer_metrics(samples: list[dict], real_lengths: list[int], cfg: SpinConfig) -> dict:
    """The metrics of the greedy answers (see the module docstring)."""
    n = max(len(samples), 1)
    metrics = {"sample_tokens": sum(s["model_tokens"] for s in samples) / n,
               "ended_rate": sum(not s["model_truncated"] for s in samples) / n,
               "repetition_rate": sum(is_repetitive(s["model"]) for s in samples) / n,
               "length_ratio": (sum(s["model_tokens"] for s in samples) / max(sum(real_lengths), 1))}
    if cfg.eval.match_regex:
        pattern = re.compile(cfg.eval.match_regex)
        metrics["match_rate"] = sum(bool(pattern.search(s["model"].strip())) for s in samples) / n
    if cfg.eval.answer_regex:
        pattern = re.compile(cfg.eval.answer_regex)
        answer = lambda text: (lambda m: m.group(1).strip() if m else None)(pattern.search(text))
        metrics["task_accuracy"] = sum(answer(s["model"]) is not None and answer(s["model"]) == answer(s["real"])
                                       for s in samples) / n
    return metrics


def is_repetitive(text: str, times: int = 3) -> bool:
    """Whether some word trigram occurs `times` or more times in the text (a looping, degenerate answer)."""
    words = text.lower().split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return bool(trigrams) and max(trigrams.values()) >= times


# (metric, +1 where higher is better, -1 where lower is): besides log-likelihood, which must rise, none of
# these may get worse for a model to count as better.
GUARDED = (("ended_rate", +1), ("repetition_rate", -1), ("match_rate", +1), ("task_accuracy", +1))


def compare(new: dict, old: dict) -> list[str]:
    """Why the model with validation metrics `new` is not better than the one with `old`; [] when it is.

    Better means: a higher log-likelihood per token of the real responses, and no guarded metric worse (a
    model that stops ending its answers, or starts repeating itself, is worse whatever its likelihood)."""
    reasons = []
    if not new["logp_per_token"] > old["logp_per_token"]:
        reasons.append(f"validation logp/token did not rise ({old['logp_per_token']:.3f} -> "
                       f"{new['logp_per_token']:.3f})")
    for key, sign in GUARDED:
        if new.get(key) is not None and old.get(key) is not None and sign * (new[key] - old[key]) < 0:
            reasons.append(f"validation {key} got worse ({old[key]:.2f} -> {new[key]:.2f})")
    return reasons
