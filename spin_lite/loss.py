"""The SPIN loss, a pure function over per-sequence log-probabilities.

For a pair (x, y real, y' generated), with the policy p being trained and the frozen opponent p_t:
    logratio_real = log p(y|x)  - log p_t(y|x)       (nats; below 0: the real response lost likelihood)
    logratio_gen  = log p(y'|x) - log p_t(y'|x)
    reward_real = beta * logratio_real,  reward_gen = beta * logratio_gen
    u = reward_real - reward_gen                         (the margin)
    loss = log(1 + exp(-u))  (logistic)   or   max(0, 1 - u)  (hinge)
Two objectives that keep the real responses' likelihood ("likelihood displacement": a DPO-style margin can grow
while log p(y|x) of the real response falls, as the project's runs saw):
    apo_zero:  loss = (1 - sigmoid(reward_real)) + sigmoid(reward_gen)
        (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7; TRL's loss_type="apo_zero", for data
        whose answers are better than the model's, SPIN's case): the real response's likelihood is pushed up and the
        generated one's down, each on its own, so a growing margin cannot come from lowering both.
    dpop:      loss = log(1 + exp(-beta * (logratio_real - logratio_gen - dpop_lambda * max(0, -logratio_real))))
        (Pal et al. 2024, "Smaug", DPO-Positive; lambda 50 there): the logistic loss with a penalty wherever the
        real response's log-prob fell below the opponent's.
Any of them can take the likelihood anchor:
    loss += sft_weight * nll_real,  nll_real = -log p(y|x) / |y|   (iterative RPO, TRL's loss_type=["sigmoid", "sft"])
Log-probabilities are sums over the response tokens (spin_lite.logprobs.sequence_logprobs); |y| is the number
of those tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from .config import LossType

LOSS_TYPES = get_args(LossType)  # declared once, in spin_lite.config


@dataclass
class SpinLossOutput:
    losses: torch.Tensor
    """Per-pair loss, shape [B]; differentiable."""
    reward_real: torch.Tensor
    """beta * (policy - opponent) log-prob of the real response, [B], detached."""
    reward_gen: torch.Tensor
    """Same for the generated response, [B], detached."""
    nll_real: torch.Tensor
    """Negative log-likelihood per token of the real response, -log p(y|x) / |y|, [B], detached (nats)."""
    logratio_real: torch.Tensor
    """log p(y|x) - log p_t(y|x) of the real response, [B], detached (nats; reward_real without beta)."""
    logratio_gen: torch.Tensor
    """Same for the generated response, [B], detached."""

    @property
    def margin(self) -> torch.Tensor:
        return self.reward_real - self.reward_gen

    @property
    def accuracy(self) -> torch.Tensor:
        """1 where the real response gets the higher reward; ties count as wrong."""
        return (self.margin > 0).float()


def spin_loss(policy_real: torch.Tensor, policy_gen: torch.Tensor, opponent_real: torch.Tensor,
              opponent_gen: torch.Tensor, beta: float, loss_type: str = "logistic", sft_weight: float = 0.0,
              real_tokens: torch.Tensor | None = None, dpop_lambda: float = 50.0) -> SpinLossOutput:
    """SPIN loss per pair. All log-prob inputs are summed response log-probs of shape [B] (nats);
    real_tokens [B] counts the real responses' tokens (needed for the anchor; default 1 each); dpop_lambda is
    the weight of the dpop penalty (used by loss_type "dpop" only; Pal et al. use 50)."""
    real_ratio = policy_real - opponent_real
    gen_ratio = policy_gen - opponent_gen
    u = beta * (real_ratio - gen_ratio)
    if loss_type == "logistic":
        losses = F.softplus(-u)  # log(1 + exp(-u)), stable for large |u|
    elif loss_type == "hinge":
        losses = torch.relu(1 - u)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * real_ratio)) + torch.sigmoid(beta * gen_ratio)
    elif loss_type == "dpop":  # the penalty inside the logistic, scaled by beta, as Pal et al. write it
        losses = F.softplus(-(u - beta * dpop_lambda * torch.relu(-real_ratio)))
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    nll_real = -policy_real / (real_tokens if real_tokens is not None else 1.0)
    if sft_weight:
        losses = losses + sft_weight * nll_real
    return SpinLossOutput(losses, (beta * real_ratio).detach(), (beta * gen_ratio).detach(), nll_real.detach(),
                          real_ratio.detach(), gen_ratio.detach())
