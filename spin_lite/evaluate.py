"""Held-out evaluation: how far the model has moved toward the human responses, measured without a judge.

Metrics on the held-out rows (never trained on):
  margin_accuracy   share of held-out pairs where the model prefers the real response over the opponent's,
                    in the SPIN sense: log p(y)/p_t(y) > log p(y')/p_t(y')   (None for the starting model)
  logp_per_token    mean log-likelihood per token of the real responses (nats; higher is closer to the data)
  match_rate        share of greedy samples matching eval.match_regex, when one is set
  sample_tokens     mean length of the greedy samples
"""
from __future__ import annotations

import re

import torch

from .config import SpinConfig
from .generate import generate_batch
from .logprobs import collate, sequence_logprobs


@torch.no_grad()
def score(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int):
    """(summed log-probs, token counts) of each response given its prompt, as Python lists."""
    model.eval()
    device = next(model.parameters()).device
    logps, counts = [], []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id).to(device)
        lp, n = sequence_logprobs(model, batch)
        logps += lp.tolist()
        counts += n.tolist()
    return logps, counts


def evaluate(model, tokenizer, items: list[dict], cfg: SpinConfig) -> tuple[dict, list[dict]]:
    """Metrics and side-by-side samples on held-out `items` (dicts with key, prompt_ids, real_ids and,
    after the starting model, the opponent's gen_ids, opponent_real, opponent_gen)."""
    pad, bs = tokenizer.pad_token_id, cfg.train.micro_batch_size * 2
    prompts = [it["prompt_ids"] for it in items]
    real_logps, real_counts = score(model, prompts, [it["real_ids"] for it in items], pad, bs)
    metrics = {"logp_per_token": sum(real_logps) / max(sum(real_counts), 1), "margin_accuracy": None}
    if items and "opponent_real" in items[0]:
        gen_logps, _ = score(model, prompts, [it["gen_ids"] for it in items], pad, bs)
        wins = [(pr - it["opponent_real"]) - (pg - it["opponent_gen"]) > 0
                for it, pr, pg in zip(items, real_logps, gen_logps)]
        metrics["margin_accuracy"] = sum(wins) / len(wins)

    samples = []
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens
    for i in range(0, len(items), cfg.generation.batch_size):
        chunk = items[i:i + cfg.generation.batch_size]
        outs = generate_batch(model, [it["prompt_ids"] for it in chunk], cfg.generation, tokenizer.eos_token_id,
                              pad, seed=cfg.seed, max_new_tokens=max_new, do_sample=False)
        for it, (ids, truncated) in zip(chunk, outs):
            samples.append({
                "key": it["key"],
                "prompt": tokenizer.decode(it["prompt_ids"], skip_special_tokens=False),
                "real": tokenizer.decode(it["real_ids"], skip_special_tokens=True),
                "opponent": tokenizer.decode(it["gen_ids"], skip_special_tokens=True) if "gen_ids" in it else None,
                "model": tokenizer.decode(ids, skip_special_tokens=True),
                "model_tokens": len(ids), "model_truncated": truncated})
    metrics["sample_tokens"] = sum(s["model_tokens"] for s in samples) / max(len(samples), 1)
    if cfg.eval.match_regex:
        pattern = re.compile(cfg.eval.match_regex)
        metrics["match_rate"] = sum(bool(pattern.search(s["model"].strip())) for s in samples) / max(len(samples), 1)
    return metrics, samples
