"""Supervised fine-tuning (SFT) of one LoRA adapter: SPIN's starting model, and the "SFT continued" baseline.

    spin-lite sft examples/configs/experiment_sft.yaml                        # base model -> run_dir/adapter
    spin-lite sft examples/configs/experiment_sft.yaml model.adapter=runs/sft/adapter run_dir=runs/sft-more --steps 30
    spin-lite run examples/configs/experiment_spin.yaml model.adapter=runs/sft/adapter   # SPIN from the SFT model

It reads the same YAML config as a SPIN run and the same data (spin_lite.data.load_splits: the same formats,
chat template and held-out rows, which are chosen by `seed`: keep `seed` and `data` equal to the SPIN run's,
or the SFT model will have trained on SPIN's held-out rows). Settings used: run_dir, seed, model, data, lora,
and from train: learning_rate (its first value), epochs, micro_batch_size, gradient_accumulation_steps,
warmup_ratio, lr_scheduler, weight_decay, max_grad_norm, gradient_checkpointing. The SPIN-only settings
(beta, loss_type, generation, eval) are ignored.

The adapter starts as a trainable copy of model.adapter when one is set (to continue an SFT model), else fresh.
The loss of an optimizer step is the mean negative log-likelihood per response token over the step's rows:
    -sum_i log p(y_i | x_i) / sum_i |y_i|     (prompt and padding masked out, the closing EOS counted)

    run_dir/
      config.yaml        the resolved config
      train_log.jsonl    one line per optimizer step
      step-000006/       adapter snapshots at the steps asked for with `save_at`
      adapter/           the trained adapter, standard PEFT layout (PeftModel.from_pretrained, vLLM, TGI)
      metrics.json       steps, last epoch's train loss, held-out logp/token before and after; written last
A run whose metrics.json exists is complete: running the same command again only reads it. A run stopped
before that starts over (SFT here is short; SPIN's trainer is the one with step checkpoints).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import yaml

from .config import ConfigError, SpinConfig
from .data import Encoded, load_splits
from .evaluate import score
from .logprobs import collate, sequence_logprobs
from .model import load_base, load_tokenizer, with_adapter
from .state import atomic_write_json, atomic_write_text, read_json, replace_dir
from .train import check_step, epoch_order, lr_schedule


def run_sft(cfg: SpinConfig, steps: int | None = None, save_at: tuple[int, ...] = (), log=print) -> dict:
    """Train run_dir/adapter by SFT on the training rows; returns (and writes) metrics.json.

    steps: optimizer steps to take (default: train.epochs passes over the rows; more steps than one pass
    continue into further epochs). save_at: steps after which to also save the adapter as step-NNNNNN/.
    """
    root = Path(cfg.run_dir)
    settings = cfg.to_dict() | {"sft_steps": steps, "sft_save_at": sorted(save_at)}
    done = read_json(root / "metrics.json")
    if done is not None:
        previous = yaml.safe_load((root / "config.yaml").read_text())
        if previous != settings:
            raise ConfigError(f"SFT run {root} is complete with different settings; use a new run_dir")
        log(f"sft: {root} is complete ({done['steps']} steps); nothing to do")
        return done
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", yaml.safe_dump(settings, sort_keys=False))

    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, cfg.seed)
    train_rows, eval_rows, report = splits.train, splits.test, splits.report
    log(f"sft data: {len(train_rows)} training and {len(eval_rows)} held-out rows ({report.describe()})")
    torch.manual_seed(cfg.seed)  # the initialisation of a fresh adapter
    model = with_adapter(load_base(cfg.model), cfg.lora, cfg.model.adapter)
    pad, bs = tokenizer.pad_token_id, cfg.train.micro_batch_size * 2
    before = heldout_logp_per_token(model, eval_rows, pad, bs)

    began = time.time()
    records = train_sft(model, train_rows, cfg, pad, root, steps, save_at)
    tmp = root / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, root / "adapter")

    steps_per_epoch = math.ceil(len(train_rows) / (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps))
    last_epoch = records[-steps_per_epoch:]
    metrics = {"steps": len(records), "start_adapter": cfg.model.adapter,
               "train_loss": sum(r["loss"] for r in last_epoch) / len(last_epoch),
               "heldout_logp_per_token_before": before,
               "heldout_logp_per_token": heldout_logp_per_token(model, eval_rows, pad, bs),
               "train_rows": len(train_rows), "heldout_rows": len(eval_rows), "train_s": round(time.time() - began, 1)}
    atomic_write_json(root / "metrics.json", metrics)
    log(f"sft: {metrics['steps']} steps, train loss {metrics['train_loss']:.3f}, held-out logp/token "
        f"{before:.3f} -> {metrics['heldout_logp_per_token']:.3f}; adapter in {root / 'adapter'}")
    return metrics


def train_sft(model, rows: list[Encoded], cfg: SpinConfig, pad_id: int, out_dir: Path, steps: int | None = None,
              save_at: tuple[int, ...] = ()) -> list[dict]:
    """Fit the model's trainable (LoRA) parameters to the rows' responses; returns the step records."""
    from tqdm.auto import tqdm
    t = cfg.train
    per_step = t.micro_batch_size * t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total_steps = steps or steps_per_epoch * t.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_at(0), weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t.lr_scheduler, total_steps, t.warmup_ratio)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = next(model.parameters()).device

    model.train()
    records = []
    with open(out_dir / "train_log.jsonl", "w", encoding="utf-8") as log_file, \
            tqdm(total=total_steps, desc="sft", unit="step") as bar:
        for step in range(total_steps):
            epoch, k = divmod(step, steps_per_epoch)
            order = epoch_order(len(rows), cfg.seed, 0, epoch)
            step_rows = [rows[i] for i in order[k * per_step:(k + 1) * per_step]]
            step_tokens = sum(len(r.response_ids) for r in step_rows)  # the loss is a mean over these
            began, loss = time.perf_counter(), 0.0
            for m in range(0, len(step_rows), t.micro_batch_size):
                micro = step_rows[m:m + t.micro_batch_size]
                batch = collate([r.prompt_ids for r in micro], [r.response_ids for r in micro], pad_id).to(device)
                logps, _ = sequence_logprobs(model, batch)
                micro_loss = -logps.sum() / step_tokens
                micro_loss.backward()
                loss += float(micro_loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            check_step(loss, grad_norm, t.max_loss, step + 1, "sft")
            step_lr = scheduler.get_last_lr()[0]  # the rate this step runs at
            optimizer.step()
            check_step(0.0, 1.0, t.max_loss, step + 1, "sft", params)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "epoch": epoch, "loss": loss, "grad_norm": grad_norm,
                      "lr": step_lr, "tokens_per_s": step_tokens / (time.perf_counter() - began)}
            records.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step + 1 in save_at:
                model.save_pretrained(out_dir / f"step-{step + 1:06d}")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return records


def heldout_logp_per_token(model, rows: list[Encoded], pad_id: int, batch_size: int) -> float | None:
    """Mean log-likelihood per response token of the held-out rows (nats; None without held-out rows)."""
    if not rows:
        return None
    logps, counts = score(model, [r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id, batch_size)
    return sum(logps) / sum(counts)
