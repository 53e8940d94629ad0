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
Two objectives built against SPIN's vanishing advantage (once the opponent's samples approach the data, the margin u
goes to 0 and the gap-based loss stops telling models apart; spin_lite counts those pairs as ties):
    tspin:     loss = l(beta * (log p(y|x) - log p(y'|x))) + history_weight * l(beta * (log p(y'|x) - log p(y0|x)))
        (T-SPIN, Wang et al., NeurIPS 2025, arXiv 2601.08198, eq. 7 and its Appendix D code; l(z) = log(1 + exp(-z))).
        y0 is the proto-synthetic response: the starting model's own sample for the prompt, generated once (iteration
        0's generations, run_dir/proto.jsonl) and kept for every iteration. The first term is the current advantage
        of the real response over the opponent's, the second the historical advantage of the opponent's response over
        the proto-synthetic one, which does not vanish when the first does. Reference-free: the reward is
        beta x log p (the paper's alpha; its entropy constraint makes the reward the likelihood used at generation),
        no opponent log-prob enters the loss. The paper: alpha = 1, history weight 0.1 (0 at iteration 0, where y0 is
        y': spin_lite drops the term there, as y0 and y' are the same samples).
    space:     loss = -log sigma_mu(reward_real) - mu * log sigma_{1/mu}(-reward_gen),  sigma_mu(x) = 1/(1 + mu e^-x)
                    = softplus(-(reward_real - ln mu)) + mu * softplus(reward_gen - ln mu)
        (SPACE, Wang et al., NeurIPS 2025, arXiv 2512.07175, its objective; mu the noise ratio, 1 in the paper):
        noise-contrastive estimation, the real response classified against the opponent's samples on its absolute
        reward, each reward pushed on its own (real up, generated down) rather than their gap. The paper's reward is
        the log-ratio unscaled, which is beta 1 here.
Any of them can take the likelihood anchor:
    loss += sft_weight * nll_real,  nll_real = -log p(y|x) / |y|   (iterative RPO; the real response's NLL per token of
    that response, each pair weighted alike: TRL's loss_type=["sigmoid", "sft"] averages per token over the batch)
Log-probabilities are sums over the response tokens (spin_lite.logprobs.sequence_logprobs); |y| is the number
of those tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from .config import LossType

LOSS_TYPES = get_args(LossType)  # declared once, in spin_lite.config
# A pair whose two log-ratios differ by at most this many nats is a tie. Summed float32 log-probs of the same
# sequence scored in two batches differ by about 1e-5 nats; a margin that small says nothing about the pair.
TIE_NATS = 1e-3


@dataclass
class SpinLossOutput:
    losses: torch.Tensor
    """Per-pair loss, shape [B]; differentiable."""
    reward_real: torch.Tensor
    """The real response's reward, [B], detached: beta * (policy - opponent) log-prob; for tspin (reference-free)
    beta * the policy's log-prob."""
    reward_gen: torch.Tensor
    """Same for the generated response, [B], detached."""
    nll_real: torch.Tensor
    """Negative log-likelihood per token of the real response, -log p(y|x) / |y|, [B], detached (nats)."""
    logratio_real: torch.Tensor
    """log p(y|x) - log p_t(y|x) of the real response, [B], detached (nats; reward_real without beta)."""
    logratio_gen: torch.Tensor
    """Same for the generated response, [B], detached."""
    gap: torch.Tensor
    """[B], detached: the unscaled quantity whose sign says which response the loss ranks first (nats): the log-ratio
    gap logratio_real - logratio_gen, or for the reference-free tspin log p(y|x) - log p(y'|x)."""
    history: torch.Tensor | None = None
    """tspin: the historical advantage beta * (log p(y'|x) - log p(y0|x)), [B], detached; None otherwise."""
    identical: torch.Tensor | None = None
    """Optional [B] bool: the generated response is the real one token for token (a tie by construction)."""

    @property
    def margin(self) -> torch.Tensor:
        return self.reward_real - self.reward_gen

    @property
    def tie(self) -> torch.Tensor:
        """[B] float, 1 where the pair carries no signal: the generated response is the real one, or `gap` is at
        most TIE_NATS (at the start of an iteration the policy is the opponent, and every
        margin is float noise). A tie is neither right nor wrong: it is counted apart (`tie_share`)."""
        tie = self.gap.abs() <= TIE_NATS
        if self.identical is not None:
            tie = tie | self.identical.to(tie.device)
        return tie.float()

    @property
    def correct(self) -> torch.Tensor:
        """[B] float, 1 where the real response gets the higher reward and the pair is not a tie."""
        return ((self.margin > 0) & (self.tie == 0)).float()

    @property
    def accuracy(self) -> float | None:
        """Margin accuracy over the informative pairs (ties left out): correct / (pairs - ties); None when every
        pair is a tie. Counting ties as wrong, as before, put SPIN's accuracy at chance where the opponent's answers
        were the real ones (6-12 of 32 test pairs on the round-3 data sets)."""
        informative = float((1 - self.tie).sum())
        return float(self.correct.sum()) / informative if informative else None


def spin_loss(policy_real: torch.Tensor, policy_gen: torch.Tensor, opponent_real: torch.Tensor,
              opponent_gen: torch.Tensor, beta: float, loss_type: str = "logistic", sft_weight: float = 0.0,
              real_tokens: torch.Tensor | None = None, dpop_lambda: float = 50.0,
              policy_proto: torch.Tensor | None = None, history_weight: float = 0.1,
              space_mu: float = 1.0) -> SpinLossOutput:
    """SPIN loss per pair. All log-prob inputs are summed response log-probs of shape [B] (nats);
    real_tokens [B] counts the real responses' tokens (needed for the anchor; default 1 each); dpop_lambda is
    the weight of the dpop penalty (used by loss_type "dpop" only; Pal et al. use 50); policy_proto [B], the
    policy's log-probs of the proto-synthetic responses, and history_weight, the weight of their term (tspin only:
    without policy_proto, at iteration 0 where they are the generated responses, the term is left out); space_mu,
    SPACE's noise ratio (space only)."""
    real_ratio = policy_real - opponent_real
    gen_ratio = policy_gen - opponent_gen
    u = beta * (real_ratio - gen_ratio)
    reward_real, reward_gen, gap, history = beta * real_ratio, beta * gen_ratio, real_ratio - gen_ratio, None
    if loss_type == "logistic":
        losses = F.softplus(-u)  # log(1 + exp(-u)), stable for large |u|
    elif loss_type == "hinge":
        losses = torch.relu(1 - u)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(reward_real)) + torch.sigmoid(reward_gen)
    elif loss_type == "dpop":  # the penalty inside the logistic, scaled by beta, as Pal et al. write it
        losses = F.softplus(-(u - beta * dpop_lambda * torch.relu(-real_ratio)))
    elif loss_type == "tspin":  # reference-free: the rewards are beta x the policy's own log-probs
        reward_real, reward_gen, gap = beta * policy_real, beta * policy_gen, policy_real - policy_gen
        losses = F.softplus(-(reward_real - reward_gen))  # the current advantage
        if policy_proto is not None:
            history = reward_gen - beta * policy_proto  # the historical advantage
            losses = losses + history_weight * F.softplus(-history)
    elif loss_type == "space":  # -log sigma_mu(r) = softplus(-(r - ln mu)); -log sigma_{1/mu}(-r) = softplus(r - ln mu)
        log_mu = math.log(space_mu)
        losses = F.softplus(-(reward_real - log_mu)) + space_mu * F.softplus(reward_gen - log_mu)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    nll_real = -policy_real / (real_tokens if real_tokens is not None else 1.0)
    if sft_weight:
        losses = losses + sft_weight * nll_real
    return SpinLossOutput(losses, reward_real.detach(), reward_gen.detach(), nll_real.detach(), real_ratio.detach(),
                          gen_ratio.detach(), gap.detach(), None if history is None else history.detach())
