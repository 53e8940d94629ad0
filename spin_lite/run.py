"""One SPIN run: iterations of generate -> score -> train -> evaluate, continued from the run directory.

Iteration t (see DESIGN.md):
  1. build the model of iteration t; its one trainable adapter starts equal to the opponent (spin_lite.model)
  2. generate: the opponent answers every training and held-out prompt         -> generations.jsonl
  3. score: the opponent's log-probs of the real and generated responses, once -> pairs.jsonl
     (from t = 1, the previous iteration's generated pairs are rescored and mixed in)
  4. train the adapter with the SPIN loss                                      -> adapter/
  5. evaluate on the held-out rows                                             -> eval.json, samples.jsonl
  6. summary.json marks the iteration complete; the adapter is the next opponent.
Each stage skips what its files show done, so running the same command again continues the run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import yaml

from .config import ConfigError, SpinConfig
from .data import Encoded, load_splits
from .evaluate import evaluate, score
from .generate import generate_all, read_generations
from .model import load_base, load_tokenizer, merged_base, resolve_backend, with_adapter
from .state import RunDir, atomic_write_json, atomic_write_text, read_json, read_jsonl, replace_dir
from .train import train_adapter

# Settings that may change between invocations of the same run directory without changing its results.
RESUMABLE_CHANGES = {"iterations", "run_dir", "train.report_to", "train.save_every", "eval.enabled"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunError(RuntimeError):
    """A stage was asked for out of order, or the run directory cannot be used."""


class SpinRun:
    """A run over `cfg.run_dir`. Use `SpinRun(cfg).run()`; stages can also be called one by one."""

    def __init__(self, cfg: SpinConfig, log=print):
        self.cfg, self.dir, self.log = cfg, RunDir(cfg.run_dir), log
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.tokenizer = self.train_rows = self.eval_rows = self.data_report = None
        self.base = None
        self._lock = None

    # -- set-up: everything that can fail on user input fails here, before a model is loaded ------------
    def prepare(self):
        if self.dir.config_path.exists():
            previous = _flatten(yaml.safe_load(self.dir.config_path.read_text()) or {})
            current = _flatten(self.cfg.to_dict())
            changed = sorted(k for k in set(previous) | set(current)
                             if k not in RESUMABLE_CHANGES and previous.get(k) != current.get(k))
            if changed:
                raise ConfigError(
                    f"run directory {self.dir.root} was started with a different config; changed: "
                    + ", ".join(f"{k} ({previous.get(k)!r} -> {current.get(k)!r})" for k in changed)
                    + ". Use a new run_dir, or the same settings to continue.")
        tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(self.cfg.train.report_to)
        if tracker and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"train.report_to={tracker} needs the {tracker} package: pip install {tracker}")
        self.backend = resolve_backend(self.cfg.model)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.train_rows, self.eval_rows, self.data_report = load_splits(self.cfg.data, self.tokenizer, self.cfg.seed)
        if self.rank == 0:
            self._lock = self.dir.lock()
            atomic_write_text(self.dir.config_path, self.cfg.to_yaml())
        self.log(f"backend: {self.backend} (model.backend={self.cfg.model.backend})")
        self.log(f"data: {len(self.train_rows)} training and {len(self.eval_rows)} held-out rows "
                 f"({self.data_report.describe()})")
        for line in self.data_report.skipped[:10]:
            self.log(f"  skipped {line}")
        return self

    def run(self) -> list[dict]:
        if self.tokenizer is None:
            self.prepare()
        for t in range(self.dir.completed(), self.cfg.iterations):
            self.iteration(t)
        if self.rank == 0:
            self.log(format_table(self.dir))
        self._barrier()
        return self.dir.summaries()

    # -- one iteration ---------------------------------------------------------------------------------
    STAGES = ("generate", "train", "evaluate")

    def iteration(self, t: int, stages: tuple[str, ...] = STAGES):
        """Run `stages` of iteration t; a stage whose files exist is skipped, a missing earlier one is an error."""
        began = time.time()
        out = self.dir.iteration(t)
        out.mkdir(parents=True, exist_ok=True)
        if "generate" not in stages and not (out / "pairs.jsonl").exists():
            raise RunError(f"iteration {t} has no scored pairs yet: run `spin-lite generate {self.dir.root}` first")
        if "train" not in stages and "evaluate" in stages and not (out / "adapter" / "adapter_config.json").exists():
            raise RunError(f"iteration {t} has no trained adapter yet: run `spin-lite train {self.dir.root}` first")
        self._set_state(iteration=t, stage="load", status="running")
        model = self.model_for(t)
        if t == 0 and self.cfg.eval.enabled and self.rank == 0 and not (self.dir.root / "eval-start.json").exists():
            self._set_state(stage="evaluate start")
            self.evaluate_start(model)
        if "generate" in stages:
            self._set_state(stage="generate")
            generations = self.generate(t, model)
            self._set_state(stage="score")
            pairs = self.score(t, model, generations)
        else:
            pairs = read_jsonl(out / "pairs.jsonl")
        if "train" in stages and not (out / "adapter" / "adapter_config.json").exists():
            self._set_state(stage="train")
            train_metrics = train_adapter(model, [p for p in pairs if p["split"] != "eval"], self.cfg, t, out,
                                          self.tokenizer.pad_token_id, self.rank, self.world_size)
            if self.rank == 0:
                atomic_write_json(out / "train_metrics.json", train_metrics)
                tmp = out / "adapter.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(tmp)
                replace_dir(tmp, out / "adapter")
                shutil.rmtree(out / "checkpoint", ignore_errors=True)
            self._barrier()
        elif "evaluate" in stages:
            # trained by an earlier process (a resume after the adapter was saved, or `spin-lite train`):
            # evaluate that adapter, not the opponent the model was built as
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(model, load_file(out / "adapter" / "adapter_model.safetensors"))
        if "evaluate" in stages and self.rank == 0:
            eval_metrics = None
            if self.cfg.eval.enabled:
                self._set_state(stage="evaluate")
                eval_metrics = self.evaluate_iteration(t, model, [p for p in pairs if p["split"] == "eval"])
            self.write_summary(t, pairs, eval_metrics, time.time() - began)
            self._set_state(iteration=t + 1, stage="done",
                            status="running" if t + 1 < self.cfg.iterations else "finished")
        else:
            self._set_state(stage=f"{stages[-1]} done", status="stopped")
        self._barrier()
        self._release(model)

    def write_summary(self, t: int, pairs: list[dict], eval_metrics: dict | None, wall_s: float):
        out = self.dir.iteration(t)
        gen_train = [p for p in pairs if p["split"] == "train"]
        atomic_write_json(out / "summary.json", {
            "iteration": t, "opponent": self.opponent_description(t), "mode": self.cfg.mode,
            "beta": self.cfg.beta_at(t), "learning_rate": self.cfg.lr_at(t),
            "pairs": {"current": len(gen_train), "previous": sum(p["split"] == "train_prev" for p in pairs),
                      "generated_truncated": sum(p["gen_truncated"] for p in gen_train),
                      "generated_mean_tokens": sum(len(p["gen_ids"]) for p in gen_train) / len(gen_train)},
            "train": read_json(out / "train_metrics.json"), "eval": eval_metrics,
            "data": asdict(self.data_report) | {"skipped": len(self.data_report.skipped)},
            "wall_s": round(wall_s, 1)})

    def opponent_description(self, t: int) -> str:
        start = f"base {self.cfg.model.name}" + (f" + adapter {self.cfg.model.adapter}" if self.cfg.model.adapter else "")
        if t == 0:
            return start
        if self.cfg.mode == "stack":
            return f"base + adapter of iteration {t - 1}"
        return f"{start} with adapters of iterations 0..{t - 1} merged"

    # -- model of iteration t ------------------------------------------------------------------------
    def model_for(self, t: int):
        """The model whose one trainable adapter starts equal to iteration t's opponent."""
        previous = [str(self.dir.iteration(k) / "adapter") for k in range(t)]
        start = [self.cfg.model.adapter] if self.cfg.model.adapter else []
        # A fresh adapter's random A matrices come from this seed, not from whatever the process did before:
        # the same in every process of a data-parallel run, and after a resume.
        torch.manual_seed(self.cfg.seed * 1009 + t)
        if self.cfg.mode == "stack":
            if self.base is None:
                self.base = load_base(self.cfg.model)
            return with_adapter(self.base, self.cfg.lora, (start + previous)[-1] if start + previous else None)
        # merge: a fresh adapter on the base with every earlier adapter merged in, in order
        merged_dir = self.dir.root / "merged-base"
        base = merged_base(self.cfg.model, start + previous, merged_dir) if start + previous else load_base(self.cfg.model)
        return with_adapter(base, self.cfg.lora, None)

    def _release(self, model):
        if self.cfg.mode == "stack" and self.backend == "hf":
            self.base = model.unload()  # the base without LoRA layers, for the next iteration's adapter
        elif self.cfg.mode == "stack":
            self.base = None  # an Unsloth model keeps its one adapter: the next iteration loads a fresh base
        else:
            shutil.rmtree(self.dir.root / "merged-base", ignore_errors=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- stages ------------------------------------------------------------------------------------------
    def prompts(self) -> dict[str, list[int]]:
        rows = {f"train:{e.row}": e.prompt_ids for e in self.train_rows}
        rows.update({f"eval:{e.row}": e.prompt_ids for e in self.eval_rows})
        return rows

    def generate(self, t: int, model) -> dict[str, dict]:
        out = self.dir.iteration(t)
        name = "generations.jsonl" if self.world_size == 1 else f"generations-rank{self.rank}.jsonl"
        generate_all(model, self.tokenizer, self.prompts(), self.cfg.generation, out / name,
                     seed=self.cfg.seed * 1000 + t, rank=self.rank, world_size=self.world_size,
                     desc=f"generate iter {t}")
        self._barrier()
        records = {}
        for path in sorted(out.glob("generations*.jsonl")):
            records.update(read_generations(path))
        return records

    def score(self, t: int, model, generations: dict[str, dict]) -> list[dict]:
        """Pairs of iteration t with the opponent's log-probs, computed once and saved with them."""
        path = self.dir.iteration(t) / "pairs.jsonl"
        if path.exists():
            return read_jsonl(path)
        rows: dict[str, Encoded] = {f"train:{e.row}": e for e in self.train_rows}
        rows.update({f"eval:{e.row}": e for e in self.eval_rows})
        pairs = [{"key": k, "split": k.split(":")[0], "prompt_ids": rows[k].prompt_ids,
                  "real_ids": rows[k].response_ids, "gen_ids": g["ids"], "gen_truncated": g["truncated"]}
                 for k, g in sorted(generations.items()) if k in rows]
        if t > 0 and self.cfg.train.mix_previous:
            pairs += [p | {"split": "train_prev"} for p in read_jsonl(self.dir.iteration(t - 1) / "pairs.jsonl")
                      if p["split"] == "train"]
        mine = pairs[self.rank::self.world_size]
        bs = self.cfg.train.micro_batch_size * 2
        pad = self.tokenizer.pad_token_id
        real, _ = score(model, [p["prompt_ids"] for p in mine], [p["real_ids"] for p in mine], pad, bs)
        gen, _ = score(model, [p["prompt_ids"] for p in mine], [p["gen_ids"] for p in mine], pad, bs)
        for p, r, g in zip(mine, real, gen):
            p["opponent_real"], p["opponent_gen"] = r, g
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            pairs = [p for part in gathered for p in part]
            pairs.sort(key=lambda p: (p["split"], p["key"]))
        if self.rank == 0:
            atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
        self._barrier()
        return pairs

    def evaluate_start(self, model):
        items = [{"key": f"eval:{e.row}", "prompt_ids": e.prompt_ids, "real_ids": e.response_ids}
                 for e in self.eval_rows]
        metrics, samples = evaluate(model, self.tokenizer, items, self.cfg)
        atomic_write_json(self.dir.root / "eval-start.json", {"metrics": metrics, "samples": samples})

    def evaluate_iteration(self, t: int, model, eval_pairs: list[dict]) -> dict:
        out = self.dir.iteration(t)
        if (out / "eval.json").exists():
            return read_json(out / "eval.json")
        metrics, samples = evaluate(model, self.tokenizer, eval_pairs, self.cfg)
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        atomic_write_json(out / "eval.json", metrics)
        return metrics

    def _set_state(self, **fields):
        if self.rank == 0:
            self.dir.set_state(**fields)

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()


def results_table(run_dir: RunDir) -> list[dict]:
    """One row for the starting model, one per complete iteration."""
    rows = []
    start = read_json(run_dir.root / "eval-start.json")
    if start:
        rows.append({"model": "start", **start["metrics"]})
    for s in run_dir.summaries():
        row = {"model": f"iter {s['iteration']}", **(s.get("eval") or {})}
        row["train_loss"] = s["train"]["loss"]
        row["train_accuracy"] = s["train"]["accuracy"]
        rows.append(row)
    return rows


def format_table(run_dir: RunDir) -> str:
    rows = results_table(run_dir)
    columns = [("model", "model", "{}"), ("train_loss", "train loss", "{:.4f}"),
               ("train_accuracy", "train acc", "{:.2f}"), ("margin_accuracy", "held-out margin acc", "{:.2f}"),
               ("logp_per_token", "held-out logp/token", "{:.3f}"), ("match_rate", "held-out match rate", "{:.2f}"),
               ("sample_tokens", "sample tokens", "{:.1f}")]
    columns = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in columns]] + [
        [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"SPIN results for {run_dir.root}\n" + "\n".join(lines)
