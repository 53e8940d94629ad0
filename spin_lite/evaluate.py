"""Evaluation without a judge, on the validation rows (what the stop rule chooses on) and on the test rows
(what is reported; nothing that chooses reads them). Metrics of a model on a set of rows:

  logp_per_token    mean log-likelihood per token of the real responses (nats; higher is closer to the data)
  margin_accuracy   share of the informative pairs where the model prefers the real response over its opponent's,
                    in the SPIN sense: log p(y)/p_t(y) > log p(y')/p_t(y')  (None for the starting model, and when
                    every pair is a tie)
  tie_share         share of pairs that are ties (spin_lite.loss.TIE_NATS): the opponent's answer is the real one,
                    or the margin is float noise; they carry no signal and are left out of margin_accuracy
  spin_loss         the SPIN loss of those pairs against the iteration's own opponent (None for the start)
  ended_rate        share of greedy answers that end (a stop token before the cap): a model that never stops
                    answering scores 0 however likely it finds the real responses
  repetition_rate   share of greedy answers in which some word trigram occurs 3 or more times (degeneration)
  length_ratio      mean greedy answer length / mean real response length (tokens)
  sample_tokens     mean length of the greedy answers (tokens)
  match_rate        share of greedy answers matching eval.match_regex, when one is set
  task_accuracy     share of greedy answers whose eval.answer_regex answer equals the real response's, when set

Each evaluated row also keeps its own scores (`row_scores`, keyed by row key such as "val:12"): the real
response's summed log-likelihood and token count, and the greedy answer's ended / repetitive / match / task flags.
logp_per_token and the rates above are their aggregates, so a paired test over rows (`paired_compare`) can say
whether a difference between two models on the same rows is more than the rows' noise.

`judge` is the stop rule's test of one model against another on the validation rows: the paired test when both
have per-row scores, else `compare`, the aggregate test of runs made before per-row scores were stored.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import SpinConfig
from .generate import generate_batch
from .logprobs import collate, mixed_precision, sequence_logprobs
from .loss import spin_loss


@torch.no_grad()
def score(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int,
          progress=None, autocast: str = "never"):
    """(summed log-probs, token counts) of each response given its prompt, as Python lists. `autocast`
    (train.autocast): the precision training scores the policy in, so the opponent's log-probs match them."""
    model.eval()
    device = next(model.parameters()).device
    logps, counts = [], []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id).to(device)
        with mixed_precision(model, autocast):
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
    real_logps, real_counts = score(model, prompts, [it["real_ids"] for it in items], pad, bs,
                                    autocast=cfg.train.autocast)
    metrics = {"logp_per_token": sum(real_logps) / max(sum(real_counts), 1), "margin_accuracy": None,
               "spin_loss": None}
    if items and "opponent_real" in items[0]:
        gen_logps, _ = score(model, prompts, [it["gen_ids"] for it in items], pad, bs, autocast=cfg.train.autocast)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)
        proto = None  # tspin's historical term, where the pairs carry the starting model's responses
        if cfg.train.loss_type == "tspin" and all("proto_ids" in it for it in items):
            proto = as_tensor(score(model, prompts, [it["proto_ids"] for it in items], pad, bs)[0])
        pairs = spin_loss(as_tensor(real_logps), as_tensor(gen_logps), as_tensor([it["opponent_real"] for it in items]),
                          as_tensor([it["opponent_gen"] for it in items]), beta or cfg.beta_at(0), cfg.train.loss_type,
                          dpop_lambda=cfg.train.dpop_lambda, policy_proto=proto,
                          history_weight=cfg.train.history_weight, space_mu=cfg.train.space_mu)
        pairs.identical = torch.tensor([it["gen_ids"] == it["real_ids"] for it in items])
        metrics["margin_accuracy"] = pairs.accuracy  # over the informative pairs; None when all are ties
        metrics["tie_share"] = pairs.tie.mean().item()
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
    for s, logp, tokens in zip(samples, real_logps, real_counts):  # the per-row scores behind the metrics
        s["scores"] = {"logp": logp, "tokens": tokens} | answer_flags(s, cfg)
    return metrics, samples


def row_scores(samples: list[dict]) -> dict[str, dict]:
    """The per-row scores of `evaluate`'s samples, by row key: {"val:12": {"logp": summed log-likelihood of the real
    response (nats), "tokens": its token count, "ended", "repetitive", and "match" / "task" when those regexes are
    set: the greedy answer's flags}}. logp / tokens is the row's log-likelihood per token."""
    return {s["key"]: s["scores"] for s in samples}


def answer_metrics(samples: list[dict], real_lengths: list[int], cfg: SpinConfig) -> dict:
    """The metrics of the greedy answers (see the module docstring): shares of the rows' flags (answer_flags)."""
    n = max(len(samples), 1)
    flags = [answer_flags(s, cfg) for s in samples]
    metrics = {"sample_tokens": sum(s["model_tokens"] for s in samples) / n,
               "ended_rate": sum(f["ended"] for f in flags) / n,
               "repetition_rate": sum(f["repetitive"] for f in flags) / n,
               "length_ratio": (sum(s["model_tokens"] for s in samples) / max(sum(real_lengths), 1))}
    if cfg.eval.match_regex:
        metrics["match_rate"] = sum(f["match"] for f in flags) / n
    if cfg.eval.answer_regex:
        metrics["task_accuracy"] = sum(f["task"] for f in flags) / n
    return metrics


def answer_flags(sample: dict, cfg: SpinConfig) -> dict:
    """One greedy answer's flags: ended (a stop token before the cap), repetitive (is_repetitive), and, when
    eval.match_regex / eval.answer_regex are set, match (the answer matches) and task (its answer equals the real
    response's)."""
    flags = {"ended": not sample["model_truncated"], "repetitive": is_repetitive(sample["model"])}
    if cfg.eval.match_regex:
        flags["match"] = bool(re.search(cfg.eval.match_regex, sample["model"].strip()))
    if cfg.eval.answer_regex:
        pattern = re.compile(cfg.eval.answer_regex)
        answer = lambda text: (lambda m: m.group(1).strip() if m else None)(pattern.search(text))
        flags["task"] = answer(sample["model"]) is not None and answer(sample["model"]) == answer(sample["real"])
    return flags


def is_repetitive(text: str, times: int = 3) -> bool:
    """Whether some word trigram occurs `times` or more times in the text (a looping, degenerate answer)."""
    words = text.lower().split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return bool(trigrams) and max(trigrams.values()) >= times


# (metric, +1 where higher is better, -1 where lower is): besides log-likelihood, which must rise, none of
# these may get worse for a model to count as better. The aggregate rule, for runs without per-row scores.
GUARDED = (("ended_rate", +1), ("repetition_rate", -1), ("match_rate", +1), ("task_accuracy", +1))
# The validation metrics as the results table titles their columns (spin_lite.report.TABLE_COLUMNS reads these): each
# reason the stop rule gives names a column the reader sees.
VAL_COLUMNS = {"logp_per_token": "val logp/tok", "ended_rate": "val ended", "repetition_rate": "val repetitive",
               "match_rate": "val match", "task_accuracy": "val task acc"}


def compare(new: dict, old: dict) -> list[str]:
    """Why the model with validation metrics `new` is not better than the one with `old`; [] when it is.

    Better means: a higher log-likelihood per token of the real responses, and no guarded metric worse (a
    model that stops ending its answers, or starts repeating itself, is worse whatever its likelihood)."""
    reasons = []
    if not new["logp_per_token"] > old["logp_per_token"]:
        reasons.append(f"{VAL_COLUMNS['logp_per_token']} did not rise ({old['logp_per_token']:.3f} -> "
                       f"{new['logp_per_token']:.3f})")
    for key, sign in GUARDED:
        if new.get(key) is not None and old.get(key) is not None and sign * (new[key] - old[key]) < 0:
            reasons.append(f"{VAL_COLUMNS[key]} got worse ({old[key]:.2f} -> {new[key]:.2f})")
    return reasons


# The metrics the paired test reads: (metric, its per-row field, +1 where higher is better and -1 where lower is).
# logp/tok is a ratio over rows (summed log-likelihoods / summed tokens, as logp_per_token is computed); the others
# are shares of rows.
CHECKED = (("logp_per_token", "logp", +1), ("ended_rate", "ended", +1), ("repetition_rate", "repetitive", -1),
           ("match_rate", "match", +1), ("task_accuracy", "task", +1))
# Bootstrap resamples: the share of resamples beyond an interval's end is then known within about +-0.01 (two
# standard errors of a 5% share over 2,000 draws), and 2,000 resamples of 200 rows take milliseconds.
RESAMPLES = 2000


@dataclass
class Difference:
    """One metric of two models on the same rows: its values (old, new), the paired bootstrap's interval
    (low, high) for the difference new - old at the verdict's confidence, and p_worse, the share of resamples in
    which the new model is not worse (a one-sided bootstrap p-value for "worse"). `worse` is set by the verdict,
    after the Holm correction over the metrics that can veto."""
    metric: str
    old: float
    new: float
    low: float
    high: float
    sign: int  # +1: higher is better; -1: lower is
    p_worse: float = 1.0
    worse: bool = False

    @property
    def better(self) -> bool:
        """The whole interval lies on the good side of 0."""
        return min(self.sign * self.low, self.sign * self.high) > 0

    def describe(self, finding: str, confidence: float, rows: int) -> str:
        """E.g. "val repetitive got worse: 0.06 -> 0.38, difference +0.31, 90% interval [+0.12, +0.50] over 16 rows"."""
        f = ".3f" if self.metric == "logp_per_token" else ".2f"
        return (f"{VAL_COLUMNS[self.metric]} {finding}: {self.old:{f}} -> {self.new:{f}}, difference "
                f"{self.new - self.old:+{f}}, {confidence:.0%} interval [{self.low:+{f}}, {self.high:+{f}}] "
                f"over {rows} rows")


@dataclass
class Verdict:
    """A new model against an old one on the same validation rows. better: the deciding metric (`decided_by`:
    val logp/tok, or the task metric, eval.choose_by) is higher and no vetoing metric worse, each with the stated
    confidence; worse: some vetoing metric is worse (Holm-corrected over them); neither: no clear difference.
    reasons: why the new model is not better, with numbers ([] when it is). rule: "paired" (the paired bootstrap
    over rows) or "aggregate" (`compare` on the metrics alone, for runs without per-row scores, where better is
    "not worse", as that rule always had it)."""
    better: bool
    worse: bool
    reasons: list[str]
    rule: str
    confidence: float | None = None
    rows: int = 0
    differences: list[Difference] = field(default_factory=list)
    decided_by: str = "logp_per_token"

    def to_dict(self) -> dict:
        """For summary.json: the verdict, and each metric's old and new values, difference and interval."""
        diffs = {d.metric: {"old": round(d.old, 6), "new": round(d.new, 6), "difference": round(d.new - d.old, 6),
                            "low": round(d.low, 6), "high": round(d.high, 6), "p_worse": round(d.p_worse, 4),
                            "worse": d.worse} for d in self.differences}
        return {"better": self.better, "worse": self.worse, "reasons": self.reasons, "rule": self.rule,
                "confidence": self.confidence, "rows": self.rows, "differences": diffs, "decided_by": self.decided_by}


def holm(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's step-down correction: which of the hypotheses with these p-values are rejected, with the chance of
    any false rejection at most `alpha` (Holm 1979). Sorted ascending, p_(i) is rejected while p_(i) <= alpha /
    (m - i + 1) for every i up to it. Why Holm: it needs no assumption about how the metrics depend on each other
    (ended and repetitive rates move together), and it is uniformly more powerful than Bonferroni's alpha / m.
    Without it, the stop rule's four guarded rates at one-sided 5% each vetoed about 19% of unchanged models."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def paired_compare(new_rows: dict[str, dict], old_rows: dict[str, dict], confidence: float = 0.9,
                   resamples: int = RESAMPLES, seed: int = 0, decide_by: str = "logp_per_token") -> Verdict:
    """Whether the model with per-row scores `new_rows` (row_scores) is worse or better than the one with
    `old_rows`, on the rows both have, with the stated confidence.

    A paired bootstrap: the rows are drawn with replacement `resamples` times (one draw for both models, so a row
    hard for both cancels out), each metric is recomputed on each draw as the table computes it, and the interval
    of the difference new - old is the central `confidence` share of the draws.
    Better: the deciding metric `decide_by` (logp_per_token, or task_accuracy / match_rate where the run chooses by
    its task metric: eval.choose_by) has its whole interval on the good side of 0, a one-sided test at
    (1 + confidence) / 2, 0.95 for 0.9, and no metric is worse.
    Worse: the metrics that can veto are tested together, one-sided at 1 - (1 + confidence) / 2 = 5% for the family,
    by Holm's correction (`holm`). They are every checked metric, except log-likelihood when the task metric decides
    (at the plateau, SFT continued lowered val logp/tok while it raised correct answers: a task-decided choice
    reports the likelihood and is not vetoed by it).
    On 16 rows at 0.9, with 3 metrics compared, a rate is worse from 4 rows that all moved the bad way (3 no longer
    suffice: p 0.036 > 0.05 / 3), and from more when other rows moved the good way; a deciding metric is better only when the gain holds across most rows. The draws come from
    a fixed seed: the same scores always give the same verdict."""
    keys = sorted(set(new_rows) & set(old_rows))
    if not keys:
        raise ValueError("paired_compare: the two models share no scored rows")
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(resamples, len(keys)))
    differences = []
    for metric, name, sign in CHECKED:
        if not all(name in new_rows[k] and name in old_rows[k] for k in keys):
            continue  # a flag one of the models lacks (a regex set for one of them only) is not compared
        value = lambda rows: np.array([float(rows[k][name]) for k in keys])
        weight = lambda rows: np.array([float(rows[k]["tokens"]) if name == "logp" else 1.0 for k in keys])
        new_v, new_w, old_v, old_w = value(new_rows), weight(new_rows), value(old_rows), weight(old_rows)
        boot = new_v[draws].sum(1) / new_w[draws].sum(1) - old_v[draws].sum(1) / old_w[draws].sum(1)
        low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        differences.append(Difference(metric, float(old_v.sum() / old_w.sum()), float(new_v.sum() / new_w.sum()),
                                      float(low), float(high), sign, float(np.mean(sign * boot >= 0))))
    decider = next((d for d in differences if d.metric == decide_by), None)
    if decider is None and decide_by != "logp_per_token":  # the task flag is missing: fall back to likelihood
        decide_by, decider = "logp_per_token", next((d for d in differences if d.metric == "logp_per_token"), None)
    vetoing = [d for d in differences if not (d.metric == "logp_per_token" and decide_by != "logp_per_token")]
    for d, rejected in zip(vetoing, holm([d.p_worse for d in vetoing], (1 - confidence) / 2)):
        d.worse = rejected
    worse = [d for d in vetoing if d.worse]
    reasons = [d.describe("got worse", confidence, len(keys)) for d in worse]
    if decider is not None and not decider.better and not decider.worse:
        reasons.insert(0, decider.describe("did not rise clearly", confidence, len(keys)))
    return Verdict(better=not worse and decider is not None and decider.better, worse=bool(worse), reasons=reasons,
                   rule="paired", confidence=confidence, rows=len(keys), differences=differences, decided_by=decide_by)


def judge(new: dict, old: dict, new_rows: dict | None = None, old_rows: dict | None = None,
          confidence: float = 0.9, decide_by: str = "logp_per_token") -> Verdict:
    """The stop rule's test of the model with validation metrics `new` (and per-row scores `new_rows`) against the
    one with `old`: paired_compare when both have per-row scores on shared rows; else (a run made before they were
    stored) `compare` on the aggregates, where any reason makes the new model worse, as that rule always had it."""
    if new_rows and old_rows and set(new_rows) & set(old_rows):
        return paired_compare(new_rows, old_rows, confidence, decide_by=decide_by)
    reasons = compare(new, old)
    return Verdict(better=not reasons, worse=bool(reasons), reasons=reasons, rule="aggregate")
