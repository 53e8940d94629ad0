"""Supervised fine-tuning (SFT) of one LoRA adapter: SPIN's starting model, and the "SFT continued" baseline.
(A SPIN run does both itself with the `sft` settings: sft.enabled, an SFT stage before iteration 0, and
sft.control, the "SFT continued" control arm; both call train_sft. This command makes them on their own.)

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
before that continues from its last checkpoint (run_dir/checkpoint/, every train.save_every steps): SFT and
SPIN share one training loop (spin_lite.train.fit), with its checkpoints, exact resume and data-parallel runs.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from .config import ConfigError, SpinConfig
from .data import Encoded, load_splits
from .evaluate import score
from .model import load_base, load_tokenizer, with_adapter
from .state import RunDir, atomic_write_json, atomic_write_text, read_json, replace_dir
from .train import fit, sft_objective


def run_sft(cfg: SpinConfig, steps: int | None = None, save_at: tuple[int, ...] = (), log=print) -> dict:
    """Train run_dir/adapter by SFT on the training rows; returns (and writes) metrics.json.

    steps: optimizer steps to take (default: train.epochs passes over the rows; more steps than one pass
    continue into further epochs). save_at: steps after which to also save the adapter as step-NNNNNN/.
    A run stopped midway continues from its last checkpoint (every train.save_every steps) when run again.
    """
    root = RunDir(cfg.run_dir)
    settings = cfg.to_dict() | {"sft_steps": steps, "sft_save_at": sorted(save_at)}
    changed = root.changed_settings(settings, resumable={"run_dir", "train.report_to", "train.save_every"})
    if changed:
        raise ConfigError(f"SFT run {root.root} was started with other settings ({', '.join(changed)}); "
                          "use a new run_dir, or the same settings to continue")
    done = read_json(root.root / "metrics.json")
    if done is not None:
        log(f"sft: {root.root} is complete ({done['steps']} steps); nothing to do")
        return done
    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, cfg.seed)
    log(f"sft data: {len(splits.train)} training and {len(splits.test)} held-out rows ({splits.report.describe()})")
    root.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root.config_path, yaml.safe_dump(settings, sort_keys=False))
    torch.manual_seed(cfg.seed)  # the initialisation of a fresh adapter
    model = with_adapter(load_base(cfg.model), cfg.lora, cfg.model.adapter, log)
    pad, bs = tokenizer.pad_token_id, cfg.train.micro_batch_size * 2
    before = heldout_logp_per_token(model, splits.test, pad, bs)

    began = time.time()
    records = train_sft(model, splits.train, cfg, pad, root.root, steps, save_at)
    tmp = root.root / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    replace_dir(tmp, root.root / "adapter")
    shutil.rmtree(root.root / "checkpoint", ignore_errors=True)

    last_epoch = records[-cfg.train.steps_per_epoch(len(splits.train)):]
    metrics = {"steps": len(records), "start_adapter": cfg.model.adapter,
               "train_loss": sum(r["loss"] for r in last_epoch) / len(last_epoch),
               "heldout_logp_per_token_before": before,
               "heldout_logp_per_token": heldout_logp_per_token(model, splits.test, pad, bs),
               "train_rows": len(splits.train), "heldout_rows": len(splits.test),
               "train_s": round(time.time() - began, 1)}
    atomic_write_json(root.root / "metrics.json", metrics)
    log(f"sft: {metrics['steps']} steps, train loss {metrics['train_loss']:.3f}, held-out logp/token "
        f"{before:.3f} -> {metrics['heldout_logp_per_token']:.3f}; adapter in {root.root / 'adapter'}")
    return metrics


def train_sft(model, rows: list[Encoded], cfg: SpinConfig, pad_id: int, out_dir: Path, steps: int | None = None,
              save_at: tuple[int, ...] = (), *, lr: float | None = None, order_key: int = 0, desc: str = "sft",
              progress=None, lr_setting: str = "train.learning_rate") -> list[dict]:
    """Fit the model's trainable (LoRA) parameters to the rows' responses (spin_lite.train.fit with the SFT
    objective); returns the step records. lr: the peak rate (default: train.learning_rate's first value), and
    lr_setting the setting it comes from (a divergence message says to lower it); order_key: picks the data orders
    (a run's SFT stage and each of its controls use their own)."""
    return fit(model, rows, sft_objective(pad_id), cfg.train, Path(out_dir), lr=cfg.lr_at(0) if lr is None else lr,
               seed=cfg.seed, order_key=order_key, steps=steps, save_at=save_at, rank=int(os.environ.get("RANK", 0)),
               world_size=int(os.environ.get("WORLD_SIZE", 1)), progress=progress, desc=desc, lr_setting=lr_setting)


def heldout_logp_per_token(model, rows: list[Encoded], pad_id: int, batch_size: int) -> float | None:
    """Mean log-likelihood per response token of the held-out rows (nats; None without held-out rows)."""
    if not rows:
        return None
    logps, counts = score(model, [r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id, batch_size)
    return sum(logps) / sum(counts)
