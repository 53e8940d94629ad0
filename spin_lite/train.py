"""The training phase of one iteration: fit the new adapter with the SPIN loss on the scored pairs.

A pair is a dict with `prompt_ids`, `real_ids`, `gen_ids` and the frozen opponent's summed log-probs
`opponent_real`, `opponent_gen` (computed once per iteration, before training: spin_lite.run).
The loop: for each optimizer step, its share of pairs in micro batches -> policy log-probs of real and
generated responses in one forward pass -> SPIN loss -> backward; then clip, step, log, and every
`save_every` steps an atomic checkpoint that a resumed run continues from exactly.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import SpinConfig
from .logprobs import collate, sequence_logprobs
from .loss import spin_loss
from .state import fault_point, recover_dir, replace_dir


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


def check_step(loss: float, grad_norm: float, max_loss: float, step: int, where: str, params=()):
    """Raise TrainingDiverged when a step's loss or gradient norm is not finite, the loss exceeds max_loss, the
    gradient vanished while the loss did not (norm exactly 0: the model saturated, as after a far too large
    step), or a trainable parameter is not finite."""
    problem = None
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > max_loss:
        problem = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}, train.max_loss={max_loss:g}"
    elif grad_norm == 0.0 and loss > 0:
        problem = f"the gradient vanished (norm 0 at loss {loss:.4g}): the model saturated"
    elif not all(bool(torch.isfinite(p).all()) for p in params):
        problem = "an adapter weight is not finite"
    if problem:
        raise TrainingDiverged(
            f"{where}: training diverged at step {step} ({problem}). Nothing of this iteration after its last "
            "checkpoint was saved, and earlier iterations are untouched; lower train.learning_rate and start a "
            "new run_dir (or continue this one with the same settings to retry from the checkpoint).")


def epoch_order(n: int, seed: int, iteration: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1009 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def policy_batch(pairs: list[dict], pad_id: int):
    """One batch of 2B sequences: B real responses, then B generated ones, same prompts."""
    prompts = [p["prompt_ids"] for p in pairs]
    return collate(prompts + prompts, [p["real_ids"] for p in pairs] + [p["gen_ids"] for p in pairs], pad_id)


def train_adapter(model, pairs: list[dict], cfg: SpinConfig, iteration: int, out_dir: Path, pad_id: int,
                  rank: int = 0, world_size: int = 1, progress=None) -> dict:
    """Train the model's trainable (LoRA) parameters on `pairs`; returns the last epoch's mean metrics.

    Writes out_dir/train_log.jsonl and out_dir/checkpoint/, and resumes from that checkpoint if present.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    t = cfg.train
    beta, lr = cfg.beta_at(iteration), cfg.lr_at(iteration)
    # Pairs per optimizer step, whatever the number of processes: each process takes a share of every
    # step's pairs, so N processes run the same steps on the same pairs as one (data parallel).
    per_step = t.micro_batch_size * t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(pairs) / per_step)
    total_steps = steps_per_epoch * t.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t.lr_scheduler, total_steps, t.warmup_ratio)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    ckpt, log_path = out_dir / "checkpoint", out_dir / "train_log.jsonl"
    if rank == 0:
        recover_dir(ckpt)
    if world_size > 1:
        dist.barrier()
    start = 0
    if (ckpt / "trainer_state.pt").exists():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        if rank == 0:
            print(f"train iter {iteration}: resumed from the checkpoint at step {start} of {total_steps}", flush=True)
    if rank == 0:
        log_lines = [l for l in _read_lines(log_path) if json.loads(l)["step"] <= start]
        log_path.write_text("".join(log_lines), encoding="utf-8")  # drop steps after the checkpoint
    if world_size > 1:
        _broadcast_params(params)  # every process starts from rank 0's adapter, whatever its RNG did
    writer = _tracker(cfg, out_dir, iteration) if rank == 0 else None

    from tqdm.auto import tqdm
    model.train()
    bar = tqdm(total=total_steps, initial=start, desc=f"train iter {iteration}", unit="step", disable=rank != 0)
    for step in range(start, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(len(pairs), cfg.seed, iteration, epoch)
        step_pairs = [pairs[i] for i in order[k * per_step:(k + 1) * per_step]]
        mine = step_pairs[rank::world_size]
        began, tokens, sums = time.perf_counter(), 0, {}
        for m in range(0, len(mine), t.micro_batch_size):
            micro = mine[m:m + t.micro_batch_size]
            batch = policy_batch(micro, pad_id).to(_device(model))
            logps, counts = sequence_logprobs(model, batch)
            n = len(micro)
            out = spin_loss(logps[:n], logps[n:], _tensor(micro, "opponent_real", logps),
                            _tensor(micro, "opponent_gen", logps), beta, t.loss_type, t.sft_weight,
                            counts[:n].to(logps.dtype))
            # Mean over the step's pairs on all processes; DDP averages over processes, hence * world_size.
            (out.losses.sum() * world_size / len(step_pairs)).backward()
            tokens += int(batch.attention_mask.sum())
            for name, value in (("loss", out.losses.detach()), ("reward_real", out.reward_real),
                                ("reward_gen", out.reward_gen), ("margin", out.margin),
                                ("accuracy", out.accuracy), ("nll_real", out.nll_real),
                                ("logp_real", logps[:n].detach()),
                                ("logp_gen", logps[n:].detach())):
                sums[name] = sums.get(name, 0.0) + float(value.sum())
        if world_size > 1:
            _all_reduce_grads(params)
            sums, tokens = _all_reduce_sums(sums, tokens, params[0].device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        where = f"train iter {iteration}"
        check_step(sums["loss"] / len(step_pairs), grad_norm, t.max_loss, step + 1, where)
        step_lr = scheduler.get_last_lr()[0]  # the rate this step runs at
        optimizer.step()
        check_step(0.0, 1.0, t.max_loss, step + 1, where, params)  # the step left every weight finite
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "epoch": epoch, **{k: v / len(step_pairs) for k, v in sums.items()},
                  "grad_norm": grad_norm, "lr": step_lr, "beta": beta,
                  "tokens_per_s": tokens / (time.perf_counter() - began)}
        if rank == 0:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if writer:
                writer(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if progress is not None and rank == 0:
            progress(step + 1, total_steps)
        if (step + 1) % t.save_every == 0 and step + 1 < total_steps and rank == 0:
            _save_checkpoint(model, optimizer, scheduler, step + 1, ckpt, get_peft_model_state_dict)
        fault_point("train_step", step + 1)
    bar.close()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    if world_size > 1:
        dist.barrier()  # rank 0 has written the last step's log line
    last_epoch = [json.loads(l) for l in _read_lines(log_path)][-steps_per_epoch:]
    keys = [k for k in ("loss", "accuracy", "margin", "reward_real", "reward_gen", "nll_real")
            if all(k in r for r in last_epoch)]  # nll_real is missing from logs of runs before it existed
    return {k: sum(r[k] for r in last_epoch) / len(last_epoch) for k in keys} | {"steps": total_steps}


def _save_checkpoint(model, optimizer, scheduler, step: int, ckpt: Path, get_state):
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_state(model).items()},
              tmp / "adapter_model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": step}, tmp / "trainer_state.pt")
    replace_dir(tmp, ckpt)


def _tensor(pairs: list[dict], key: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([p[key] for p in pairs], dtype=like.dtype, device=like.device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _all_reduce_grads(params):
    """Average the LoRA gradients over processes, in one all-reduce of the flattened adapter gradients.

    A process with no pairs in this step (fewer pairs than processes) joins with zeros.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p).to(p.dtype)


def _all_reduce_sums(sums: dict[str, float], tokens: int, device) -> tuple[dict[str, float], int]:
    """The step's metric sums and token count over all processes (for the log, as one process writes it)."""
    names = ("loss", "reward_real", "reward_gen", "margin", "accuracy", "nll_real", "logp_real", "logp_gen")
    values = torch.tensor([sums.get(n, 0.0) for n in names] + [float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(names, values[:-1].tolist())), int(values[-1])


def _broadcast_params(params):
    for p in params:
        dist.broadcast(p.data, src=0)


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
