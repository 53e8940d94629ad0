"""The training loop, one for SPIN and SFT (`fit`); what differs is the objective passed in.

SPIN (`spin_objective`, `train_adapter`): a pair is a dict with `prompt_ids`, `real_ids`, `gen_ids` and the frozen
opponent's summed log-probs `opponent_real`, `opponent_gen` (computed once per iteration, before training:
spin_lite.run); the policy scores real and generated responses in one forward pass; loss: spin_lite.loss.
SFT (`sft_objective`, spin_lite.sft): a row is an Encoded (prompt and response ids); loss: the responses' negative
log-likelihood per token.
The loop: for each optimizer step, its share of items in micro batches -> forward -> loss -> backward; then clip,
check for divergence, step, log, and every `save_every` steps an atomic checkpoint that a resumed run continues
from exactly. Data-parallel (torchrun/accelerate): DistributedDataParallel over the adapter's parameters.
A model that computes in float16 (a T4 has no bfloat16) trains with dynamic loss scaling (`loss_scaler`): the
LoRA weights and AdamW's state stay in float32, and a step whose gradients overflow is skipped and logged.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ConfigError, SpinConfig, TrainSettings
from .kernels import fused_kernels
from .logprobs import (Batch, Packed, collate, mixed_precision, pack, packed_logprobs, sequence_logprobs, to_device,
                       why_not_packed)
from .loss import spin_loss
from .state import _confine_write, atomic_write_text, fault_point, open_append, recover_dir, replace_dir


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient was not finite, or beyond train.max_loss: training stopped before that step."""


def lr_schedule(optimizer, kind: str, total_steps: int, warmup_ratio: float):
    """Warmup then decay, as a LambdaLR. A positive warmup_ratio gives at least one warmup step, and no step
    runs at rate 0: warmup step k (0-based) of w runs at (k + 1) / (w + 1) of the peak; then linear decay to
    1 / (total - w) of it at the last step, cosine to above 0, or constant."""
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0
    warmup = min(warmup, max(total_steps - 1, 0))

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (k - warmup) / max(total_steps - warmup, 1)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress  # linear

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_step(loss: float, grad_norm: float, max_loss: float, step: int, where: str, weights_finite: bool = True,
               lr_setting: str = "train.learning_rate"):
    """Raise TrainingDiverged when a step's loss or gradient norm is not finite, the loss exceeds max_loss, the
    gradient vanished while the loss did not (norm exactly 0: the model saturated, as after a far too large
    step), or the step left a trainable parameter not finite (`weights_finite`: `_all_finite`, read).
    `lr_setting`: the setting whose rate the training ran at, which the message says to lower."""
    problem = None
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > max_loss:
        problem = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}, train.max_loss={max_loss:g}"
    elif grad_norm == 0.0 and loss > 0:
        problem = f"the gradient vanished (norm 0 at loss {loss:.4g}): the model saturated"
    elif not weights_finite:
        problem = "an adapter weight is not finite"
    if problem:
        raise TrainingDiverged(
            f"{where}: training diverged at step {step} ({problem}). Nothing of this iteration after its last "
            f"checkpoint was saved, and earlier iterations are untouched; lower {lr_setting} and start a "
            "new run_dir (or continue this one with the same settings to retry from the checkpoint).")


LOSS_SCALE_INIT = 2.0 ** 16  # torch's default: the scale halves at each overflow and doubles after 2,000 clean steps
MAX_SKIPPED_IN_A_ROW = 20  # then the scale has fallen 2**20-fold: the gradients are not finite at any scale


def loss_scaler(model):
    """A dynamic loss scaler where `model` computes in float16, else None (bfloat16 and float32 have float32's
    range). float16's smallest normal number is 6e-5 and its largest 65,504: unscaled, small activation
    gradients underflow to 0; scaled, some overflow, and a step whose gradients hold an inf or NaN is skipped
    and the scale halved (torch.amp.GradScaler, on the CPU as on CUDA)."""
    float16 = any(p.dtype == torch.float16 for p in model.parameters()) or any(
        getattr(m, "compute_dtype", None) == torch.float16 for m in model.modules())  # a 4-bit base
    device = next(model.parameters()).device.type
    return torch.amp.GradScaler(device, init_scale=LOSS_SCALE_INIT) if float16 else None


def epoch_order(n: int, seed: int, iteration: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1009 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# -- what is minimised: SPIN and SFT differ only here ---------------------------------------------------------
@dataclass
class Objective:
    """A training objective over items (SPIN pairs or SFT rows).

    batch(items) -> the sequences to score; loss(items, logps, counts) -> (per-item losses [n] that sum into the
    step's loss, per-item metrics to log); norm(step_items) -> what the step's summed loss is divided by;
    record(sums, n) -> the step's logged values from the metrics summed over its n items (default: their means)."""
    name: str
    batch: Callable[[list], Batch]
    loss: Callable[[list, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    norm: Callable[[list], float]
    record: Callable[[dict, int], dict] = lambda sums, n: {k: v / n for k, v in sums.items()}


def with_proto(pairs: list, loss_type: str) -> bool:
    """Whether these pairs are scored with their proto-synthetic responses too (tspin from iteration 1 on: the pairs
    carry `proto_ids`, the starting model's own samples; spin_lite.run attaches them)."""
    return loss_type == "tspin" and any("proto_ids" in p for p in pairs)


def spin_objective(beta: float, settings: TrainSettings, pad_id: int, packed: bool = False) -> Objective:
    """The SPIN loss (+ the likelihood anchor) per pair, averaged over the step's pairs. `packed`: each pair scored
    as one row [prompt | real | generated (| proto)] (train.pack_pairs); the scorer returns the same layout."""
    def batch(pairs):  # 2B sequences: B real responses, then B generated ones, same prompts (+ B proto: tspin)
        prompts, responses = [p["prompt_ids"] for p in pairs], [p["real_ids"] for p in pairs] + [p["gen_ids"] for p in pairs]
        if packed and all(prompts):  # (a pair with an empty prompt has nothing to share: scored apart)
            third = with_proto(pairs, settings.loss_type)
            return pack(prompts, [[p["real_ids"], p["gen_ids"]] + ([p.get("proto_ids", p["gen_ids"])] if third else [])
                                  for p in pairs], pad_id)
        if with_proto(pairs, settings.loss_type):
            return collate(prompts * 3, responses + [p.get("proto_ids", p["gen_ids"]) for p in pairs], pad_id)
        return collate(prompts * 2, responses, pad_id)

    def loss(pairs, logps, counts):
        n = len(pairs)
        opponent = lambda key: to_device(torch.tensor([p[key] for p in pairs], dtype=logps.dtype), logps.device)
        out = spin_loss(logps[:n], logps[n:2 * n], opponent("opponent_real"), opponent("opponent_gen"), beta,
                        settings.loss_type, settings.sft_weight, counts[:n].to(logps.dtype), settings.dpop_lambda,
                        logps[2 * n:] if len(logps) > 2 * n else None, settings.history_weight, settings.space_mu)
        out.identical = torch.tensor([p["gen_ids"] == p["real_ids"] for p in pairs])
        # logratio_real below 0 is likelihood displacement: the real responses lost likelihood to the opponent;
        # margin is the current advantage (reward_real - reward_gen), history tspin's historical one
        metrics = {"loss": out.losses.detach(), "reward_real": out.reward_real, "reward_gen": out.reward_gen,
                   "logratio_real": out.logratio_real, "logratio_gen": out.logratio_gen,
                   "margin": out.margin, "correct": out.correct, "tie": out.tie, "nll_real": out.nll_real,
                   "logp_real": logps[:n].detach(), "logp_gen": logps[n:2 * n].detach()}
        if out.history is not None:
            metrics |= {"history": out.history, "logp_proto": logps[2 * n:].detach()}
        return out.losses, metrics

    def record(sums, n):  # margin accuracy over the informative pairs; ties are counted apart (spin_lite.loss)
        means = {k: v / n for k, v in sums.items() if k not in ("correct", "tie")}
        informative = n - sums["tie"]
        return means | {"accuracy": sums["correct"] / informative if informative > 0.5 else None,
                        "tie_share": sums["tie"] / n, "informative": round(informative)}

    return Objective("spin", batch, loss, lambda pairs: len(pairs), record)


def sft_objective(pad_id: int) -> Objective:
    """Negative log-likelihood of the responses, per response token over the step's rows:
    -sum_i log p(y_i | x_i) / sum_i |y_i|."""
    def loss(rows, logps, counts):
        return -logps, {"nll": -logps.detach(), "tokens": counts.to(logps.dtype)}

    return Objective("sft", lambda rows: collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id),
                     loss, lambda rows: sum(len(r.response_ids) for r in rows),
                     lambda sums, n: {"loss": sums["nll"] / sums["tokens"]})  # per token over the step, not per row


class _Scorer(torch.nn.Module):
    """The model's summed response log-probs as a module's forward, so that DistributedDataParallel sees the
    forward it must hook (spin_lite.logprobs calls the model's parts, not its forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch | Packed):
        if isinstance(batch, Packed):  # [B, K] -> every row's first response, then every row's second, ...
            logps, counts = packed_logprobs(self.model, batch)
            return logps.T.reshape(-1), counts.T.reshape(-1)
        return sequence_logprobs(self.model, batch)


# -- the loop -------------------------------------------------------------------------------------------------
def fit(model, items: list, objective: Objective, settings: TrainSettings, out_dir: Path, *, lr: float, seed: int,
        order_key: int = 0, steps: int | None = None, save_at: tuple[int, ...] = (), rank: int = 0,
        world_size: int = 1, progress=None, desc: str = "train", tracker=None, log_extra: dict | None = None,
        lr_setting: str = "train.learning_rate") -> list[dict]:
    """Train the model's trainable (LoRA) parameters on `items`; returns the step records.

    Steps: `steps`, or settings.epochs passes; the data order of each epoch comes from (seed, order_key, epoch).
    Every step takes micro_batch_size x gradient_accumulation_steps items; with `world_size` > 1 each process takes
    a share of them and DistributedDataParallel averages the gradients, so N processes take the same steps on the
    same items as one. Writes out_dir/train_log.jsonl, checkpoints to out_dir/checkpoint/ every save_every steps
    and resumes from there exactly; `save_at` steps also leave the adapter in out_dir/step-NNNNNN/.
    """
    # One function on purpose, like torchtune's recipes: the step reads top to bottom (accumulate, unscale, clip,
    # guard, step, log, checkpoint); resuming, the DDP wrapper and the micro batches are helpers below.
    from peft import get_peft_model_state_dict
    from tqdm.auto import tqdm

    s = settings
    per_step, steps_per_epoch = s.rows_per_step, s.steps_per_epoch(len(items))
    total_steps = steps or steps_per_epoch * s.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    scheduler = lr_schedule(optimizer, s.lr_scheduler, total_steps, s.warmup_ratio)
    scaler = loss_scaler(model)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    ckpt, log_path = out_dir / "checkpoint", out_dir / "train_log.jsonl"
    start, records = _resume(model, optimizer, scheduler, scaler, ckpt, log_path, rank, world_size)
    if start and rank == 0:
        print(f"{desc}: resumed from the checkpoint at step {start} of {total_steps}", flush=True)
    scorer = _scorer(model, world_size)
    device = next(model.parameters()).device

    model.train()
    with fused_kernels(model, s.fused_kernels):  # (undone after the last step, or on an error)
        skipped_in_a_row = 0
        # The host reads the device once a step (`_read_step`, where it waits for the device): the step's metrics,
        # gradient norm, and whether the step before left every weight finite (`weights`, computed on the device after
        # each optimizer step and read with the next step's figures, or before anything is saved).
        weights = None
        bar = tqdm(total=total_steps, initial=start, desc=desc, unit="step", disable=rank != 0)
        for step in range(start, total_steps):
            epoch, k = divmod(step, steps_per_epoch)
            order = epoch_order(len(items), seed, order_key, epoch)
            step_items = [items[i] for i in order[k * per_step:(k + 1) * per_step]]
            began = time.perf_counter()
            sums, tokens = _accumulate(scorer, objective, step_items, s.micro_batch_size, rank, world_size, device,
                                       scaler, lambda: mixed_precision(model, s.autocast))
            if scaler is not None:
                scaler.unscale_(optimizer)  # the gradients in their own units, for clipping and the guard
            norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            sums, tokens, grad_norm, finite = _read_step(sums, tokens, norm, weights)
            check_step(0.0, 1.0, s.max_loss, step, desc, finite, lr_setting)  # the step before left every weight finite
            # with loss scaling a non-finite gradient is an overflow: the step is skipped and the scale lowered, not
            # divergence; the guard then applies only to a run of such steps
            skipped = scaler is not None and not math.isfinite(grad_norm)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(f"{desc}: training diverged at step {step + 1} ({skipped_in_a_row} steps in a "
                                       "row with non-finite float16 gradients, at every loss scale)")
            record = {"step": step + 1, "epoch": epoch, **objective.record(sums, len(step_items))}
            if not skipped:
                check_step(record["loss"], grad_norm, s.max_loss, step + 1, desc, lr_setting=lr_setting)
            record.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],  # the rate this step runs at
                          tokens_per_s=tokens / (time.perf_counter() - began), **(log_extra or {}))
            if scaler is not None:
                record.update(skipped=skipped, loss_scale=scaler.get_scale())  # the scale this step ran at
                scaler.step(optimizer)  # no step where a gradient is not finite
                scaler.update()  # halves the scale after such a step, doubles it after 2,000 clean ones
            else:
                optimizer.step()
            if not skipped:  # a skipped step leaves the weights, AdamW and the learning-rate schedule as they were
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            weights = _all_finite(params)  # not read here: with the next step's figures, or before a save
            saves = step + 1 in save_at or ((step + 1) % s.save_every == 0 and step + 1 < total_steps)
            if saves or step + 1 == total_steps:  # nothing not finite is saved (on every process: they stop together)
                check_step(0.0, 1.0, s.max_loss, step + 1, desc, bool(weights), lr_setting)
            records.append(record)
            if rank == 0:
                with open_append(log_path) as f:
                    f.write(json.dumps(record) + "\n")
                if tracker:
                    tracker(record)
                if progress is not None:
                    progress(step + 1, total_steps)
                if step + 1 in save_at:
                    _confine_write(out_dir / f"step-{step + 1:06d}")  # (no link planted since launch)
                    model.save_pretrained(out_dir / f"step-{step + 1:06d}", selected_adapters=["default"])
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "accuracy") if record.get(k) is not None})
            if (step + 1) % s.save_every == 0 and step + 1 < total_steps and rank == 0:
                _save_checkpoint(model, optimizer, scheduler, step + 1, ckpt, get_peft_model_state_dict, scaler)
            fault_point("train_step", step + 1)
        bar.close()
    if s.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    if world_size > 1:
        dist.barrier()  # rank 0 has written the last step's log line
    return records


def _resume(model, optimizer, scheduler, scaler, ckpt: Path, log_path: Path, rank: int, world_size: int):
    """(the step to start from, the log records up to it): the checkpoint's adapter, optimizer, schedule, loss
    scale and RNG are restored where there is one; log lines after it are dropped, their steps redone."""
    from peft import set_peft_model_state_dict

    if rank == 0:
        recover_dir(ckpt)
    if world_size > 1:
        dist.barrier()
    start = 0
    if (ckpt / "trainer_state.pt").exists():
        # on the CPU first: the tensors were saved from rank 0's device, perhaps on another machine;
        # load_state_dict moves the optimizer's state to each parameter's device
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    records = [r for r in map(json.loads, _read_lines(log_path)) if r["step"] <= start]
    if rank == 0:  # replaced whole: the other ranks may be reading it, and any whole version gives them `records`
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
    return start, records


def _scorer(model, world_size: int):
    """The module whose forward scores a batch: wrapped in DistributedDataParallel for a data-parallel run, where
    the frozen base is the same everywhere and only the adapter is synchronised (rank 0's, broadcast at the start)."""
    scorer = _Scorer(model)
    if world_size > 1:
        frozen = [name for name, p in scorer.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            scorer, frozen + [name for name, _ in scorer.named_buffers()])
        scorer = torch.nn.parallel.DistributedDataParallel(scorer)
    return scorer


def _accumulate(scorer, objective: Objective, step_items: list, micro_size: int, rank: int, world_size: int,
                device, scaler, precision=contextlib.nullcontext) -> tuple[dict[str, float], int]:
    """Forward and backward over this process's share of a step's items, a micro batch at a time; returns the
    step's metric sums and token count over all processes. The forward and the loss run in `precision()`
    (spin_lite.logprobs.mixed_precision: bfloat16 autocast or nothing), the backward outside it."""
    mine, norm = step_items[rank::world_size], objective.norm(step_items)
    # every process runs as many micro batches as the busiest one (DDP all-reduces once per backward);
    # one with fewer items repeats its first item (or the step's) with weight 0
    micros = math.ceil(math.ceil(len(step_items) / world_size) / micro_size)
    tokens, sums = 0, {}
    for m in range(micros):
        micro = mine[m * micro_size:(m + 1) * micro_size]
        weight = 1.0 if micro else 0.0
        micro = micro or (mine or step_items)[:1]
        batch = objective.batch(micro)
        tokens += (batch.tokens if batch.tokens is not None else int(batch.attention_mask.sum())) if weight else 0
        batch = batch.to(device)
        sync = m == micros - 1 or world_size == 1
        with contextlib.nullcontext() if sync else scorer.no_sync():
            with precision():
                logps, counts = scorer(batch)
                losses, metrics = objective.loss(micro, logps, counts)
            # the step's mean on all processes; DDP averages over processes, hence * world_size
            loss = losses.sum() * weight * world_size / norm
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in metrics.items():  # summed on the device; `_read_step` reads them once a step
            total = value.detach().double().sum() * weight  # (float64, as the Python sums it replaces)
            sums[name] = sums[name] + total if name in sums else total
    if world_size > 1:
        sums, tokens = _all_reduce_sums(sums, tokens, device)
    return sums, tokens


def train_adapter(model, pairs: list[dict], cfg: SpinConfig, iteration: int, out_dir: Path, pad_id: int,
                  rank: int = 0, world_size: int = 1, progress=None) -> dict:
    """SPIN's training phase of iteration t: `fit` with the SPIN objective on the scored pairs; returns the last
    epoch's mean metrics."""
    if cfg.train.pack_pairs and (why := why_not_packed(model)):
        raise ConfigError(f"train.pack_pairs: true needs a model that scores packed rows, and this one cannot: {why}. "
                          "Set train.pack_pairs: false")
    objective = spin_objective(cfg.beta_at(iteration), cfg.train, pad_id, packed=cfg.train.pack_pairs)
    records = fit(model, pairs, objective, cfg.train, out_dir,
                  lr=cfg.lr_at(iteration), seed=cfg.seed, order_key=iteration, rank=rank, world_size=world_size,
                  progress=progress, desc=f"train iter {iteration}", log_extra={"beta": cfg.beta_at(iteration)},
                  tracker=_tracker(cfg, out_dir, iteration) if rank == 0 else None)
    last_epoch = records[-cfg.train.steps_per_epoch(len(pairs)):]
    keys = [k for k in ("loss", "margin", "history", "reward_real", "reward_gen", "logratio_real", "logratio_gen",
                        "nll_real", "tie_share")
            if all(k in r for r in last_epoch)]  # logs of runs made before a metric existed lack it
    skipped = {"skipped_steps": sum(r["skipped"] for r in records)} if records and "skipped" in records[-1] else {}
    means = {k: sum(r[k] for r in last_epoch) / len(last_epoch) for k in keys}
    return means | {"accuracy": epoch_accuracy(last_epoch), "steps": len(records)} | skipped


def epoch_accuracy(records: list[dict]) -> float | None:
    """Margin accuracy over the informative pairs of these steps (each step's accuracy weighted by its informative
    pairs); a log written before ties were counted apart has plain per-step accuracies, averaged as they were."""
    if not all("informative" in r for r in records):
        values = [r["accuracy"] for r in records if r.get("accuracy") is not None]
        return sum(values) / len(values) if values else None
    informative = sum(r["informative"] for r in records)
    return sum(r["accuracy"] * r["informative"] for r in records if r["informative"]) / informative if informative \
        else None


def _save_checkpoint(model, optimizer, scheduler, step: int, ckpt: Path, get_state, scaler=None):
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    _confine_write(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_state(model).items()},
              tmp / "adapter_model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": torch.get_rng_state(), "step": step}, tmp / "trainer_state.pt")
    replace_dir(tmp, ckpt)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _all_reduce_sums(sums: dict[str, torch.Tensor], tokens: int, device) -> tuple[dict[str, torch.Tensor],
                                                                                  torch.Tensor]:
    """The step's metric sums and token count over all processes (for the log, as one process writes it), still on
    the device: `_read_step` reads them."""
    names = sorted(sums)
    values = torch.stack([sums[n].double() for n in names] + [torch.tensor(float(tokens), dtype=torch.float64,
                                                                           device=device)])
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(names, values[:-1])), values[-1]


def _read_step(sums: dict[str, torch.Tensor], tokens, grad_norm: torch.Tensor, weights: torch.Tensor | None
               ) -> tuple[dict[str, float], int, float, bool]:
    """(metric sums, token count, gradient norm, did the step before leave every weight finite), read from the
    device in one transfer: the one point of a step where the host waits for the device. `tokens`: a host int, or
    a device tensor after `_all_reduce_sums`; `weights`: `_all_finite`'s flag, or None before the first step."""
    names = sorted(sums)
    parts = [sums[n].double() for n in names] + [grad_norm.double()]
    parts += [t.double() for t in (weights, tokens) if torch.is_tensor(t)]
    values = torch.stack([t.to(grad_norm.device) for t in parts]).tolist()
    finite = bool(values[len(names) + 1]) if weights is not None else True
    tokens = int(values[-1]) if torch.is_tensor(tokens) else tokens
    return dict(zip(names, values)), tokens, values[len(names)], finite


def _all_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of `params` is finite, as a device bool (no host read): one fused max-abs a tensor
    (inf for an inf, NaN for a NaN: the maximum propagates NaN, on CUDA as on the CPU) and one reduction."""
    return torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))]).isfinite().all()


def _tracker(cfg: SpinConfig, out_dir: Path, iteration: int):
    """A function logging a step record to TensorBoard or W&B, or None."""
    if cfg.train.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard" / f"iter-{iteration:02d}"))
        return lambda r: [tb.add_scalar(k, v, r["step"]) for k, v in r.items() if k != "step"] and tb.flush()
    if cfg.train.report_to == "wandb":
        import wandb
        run = wandb.run or wandb.init(project="spin_lite", name=Path(cfg.run_dir).name, config=cfg.to_dict())
        return lambda r: run.log({f"iter{iteration}/{k}": v for k, v in r.items()})
    return None
