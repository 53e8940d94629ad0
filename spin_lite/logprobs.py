"""Summed log-probabilities of responses given their prompts: the quantity the SPIN loss compares.

A batch holds sequences `prompt + response`, right-padded. Only response tokens are scored: the prompt and
the padding are masked out by position (never by token id: many tokenizers pad with their EOS token, and
the response's closing EOS must be counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens, 0 for padding."""
    response_mask: torch.Tensor
    """[B, T] 1 where the token belongs to the response (closing EOS included)."""

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Right-padded batch of `prompt + response` sequences with the response mask."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    response = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :n] = 1
        response[i, len(p):n] = 1
    return Batch(ids, attention, response)


def sequence_logprobs(model, batch: Batch, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs [B], number of response tokens [B]).

    The full-vocabulary log-softmax is taken `chunk` positions at a time in float32, so the float32 copy of
    the logits never exists for the whole sequence at once.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    # token t is predicted by the logits at position t - 1
    logits, targets, mask = logits[:, :-1], batch.input_ids[:, 1:], batch.response_mask[:, 1:]
    pieces = []
    for start in range(0, logits.shape[1], chunk):
        part = logits[:, start:start + chunk].float()
        picked = part.gather(-1, targets[:, start:start + chunk, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(part, dim=-1))
    token_logps = torch.cat(pieces, dim=1)
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)
