"""One SPIN run: iterations of generate -> train -> evaluate, continued from the run directory.

Iteration t (see README, "The method"):
  0. build the model of iteration t: the opponent (the model after iteration t-1, RunDir.adapters_after) plus
     one trainable adapter that starts equal to it (spin_lite.model.build_model)
  1. generate: the opponent answers every training, validation and test prompt            -> generations.jsonl
     and scores the real and generated responses once (from t = 1 the previous iteration's
     training pairs are rescored and mixed in)                                             -> pairs.jsonl
  2. train the adapter with the SPIN loss (+ the optional likelihood anchor)               -> adapter/
  3. evaluate on the validation and test rows; the stop rule compares the validation
     metrics with the best model before (spin_lite.evaluate.compare)                       -> eval.json, summary.json
The stages are the table `STAGES` (spin_lite.state): each is skipped when its file says it is done, so
running the same command again continues the run, and `spin-lite generate|train|evaluate` run one of them.
`iterations` is a maximum: with train.stop_when=no_gain the run ends after the first iteration that is not
better than the best model before it on the validation rows (or after train.stop_patience of them in a row); the
best one is recorded (RunDir.best_iteration).
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

from .config import ConfigError, SpinConfig, apply_legacy
from .data import load_splits
from .evaluate import compare, evaluate, score
from .generate import generate_all, read_generations, stop_token_ids
from .model import build_model, load_adapter_weights, load_base, load_tokenizer, merged_base, resolve_backend
from .preflight import check_model
from .state import STAGES, RunDir, atomic_write_json, atomic_write_text, read_json, read_jsonl, replace_dir
from .train import TrainingDiverged, train_adapter


class RunError(RuntimeError):
    """A stage was asked for out of order, or the run directory cannot be used."""


class SpinRun:
    """A run over `cfg.run_dir`. Use `SpinRun(cfg).run()`; stages can also be run one by one (`iteration`)."""

    def __init__(self, cfg: SpinConfig, log=print):
        self.cfg, self.dir, self.log = cfg, RunDir(cfg.run_dir), log
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.tokenizer = self.splits = self.backend = None
        self.base = None
        self._lock = None

    # -- set-up: everything that can fail on user input fails here, before a model is loaded ------------
    def prepare(self):
        check_model(self.cfg)  # model, adapter and LoRA targets checked before anything is written
        legacy = self.dir.legacy_settings()
        if legacy:  # a run made before these settings existed continues as it was made
            self.cfg = apply_legacy(self.cfg, legacy)
            self.log("run started by an earlier version; continuing it with " +
                     ", ".join(f"{k}={v!r}" for k, v in legacy.items()))
        changed = self.dir.changed_settings(self.cfg.to_dict())
        if changed:
            raise ConfigError(f"run directory {self.dir.root} was started with a different config; changed: "
                              + ", ".join(changed) + ". Use a new run_dir, or the same settings to continue.")
        tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(self.cfg.train.report_to)
        if tracker and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"train.report_to={tracker} needs the {tracker} package: pip install {tracker}")
        self.backend = resolve_backend(self.cfg.model)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.splits = load_splits(self.cfg.data, self.tokenizer, self.cfg.seed)
        if self.rank == 0:
            self._lock = self.dir.lock()
            atomic_write_text(self.dir.config_path, self.cfg.to_yaml())
        s = self.splits
        self.log(f"backend: {self.backend} (model.backend={self.cfg.model.backend})")
        self.log(f"data: {len(s.train)} training, {len(s.val)} validation and {len(s.test)} test rows "
                 f"({s.report.describe()})")
        for line in s.report.skipped[:10]:
            self.log(f"  skipped {line}")
        return self

    def run(self) -> list[dict]:
        if self.tokenizer is None:
            self.prepare()
        first = self.dir.completed()
        for t in range(first, self.cfg.iterations):
            if self.dir.stopped(self.cfg):
                if t == first and self.rank == 0:  # (a stop in this invocation has said so already)
                    self.log(f"the stop rule ended this run {self.dir.stop_reason(self.cfg)}; to go on, run it again "
                             "with a higher train.stop_patience or train.stop_when=never")
                break
            self.iteration(t)
        if self.rank == 0:
            self._set_state(status="finished", stage="done", best_iteration=self.dir.best_iteration())
            self.log(format_table(self.dir, self.cfg))
        self._barrier()
        return self.dir.summaries()

    # -- one iteration: the stage table ----------------------------------------------------------------
    def iteration(self, t: int, only: str | None = None):
        """Run the stages of iteration t that are not done yet, or the one stage `only` (its earlier stages
        must be done: `spin-lite generate|train|evaluate`)."""
        began = time.time()
        todo = [name for name, _ in STAGES if not self.dir.stage_done(t, name)]
        if only is not None:
            missing = [name for name, _ in STAGES[:[n for n, _ in STAGES].index(only)] if name in todo]
            if missing:
                raise RunError(f"iteration {t} has not done its {missing[0]} stage yet: run "
                               f"`spin-lite {missing[0]} {self.dir.root}` first")
            todo = [only] if only in todo else []
        self.dir.iteration(t).mkdir(parents=True, exist_ok=True)
        self._set_state(iteration=t, stage="load", status="running")
        model = self.model_for(t)
        if t == 0 and self.cfg.eval.enabled and self.rank == 0 and not (self.dir.root / "eval-start.json").exists():
            self._set_state(stage="evaluate start")
            self.evaluate_start(model)
        stage_functions = {"generate": self.generate, "train": self.train, "evaluate": self.evaluate}
        for name in todo:
            self._set_state(stage=name)
            try:
                stage_functions[name](t, model, began)
            except TrainingDiverged as e:
                self._set_state(status="failed", error=str(e))
                raise
        if self.dir.is_complete(t):
            done = self.dir.stopped(self.cfg) or t + 1 >= self.cfg.iterations
            self._set_state(iteration=t + 1, stage="done", status="finished" if done else "running",
                            best_iteration=self.dir.best_iteration())
        else:
            self._set_state(stage=f"{todo[-1] if todo else 'nothing'} done", status="stopped")
        self._barrier()
        self._release(model)

    def generate(self, t: int, model, began: float):
        """The opponent's responses to every prompt, then its log-probs of the pairs -> pairs.jsonl."""
        out = self.dir.iteration(t)
        name = "generations.jsonl" if self.world_size == 1 else f"generations-rank{self.rank}.jsonl"
        generate_all(model, self.tokenizer, self.prompts(), self.cfg.generation, out / name,
                     seed=self.cfg.seed * 1000 + t, rank=self.rank, world_size=self.world_size,
                     desc=f"generate iter {t}", progress=self._progress(t, "generate"))
        self._barrier()
        generations = {}
        for path in sorted(out.glob("generations*.jsonl")):
            generations.update(read_generations(path))
        self.score(t, model, generations)

    def train(self, t: int, model, began: float):
        pairs = [p for p in read_jsonl(self.dir.iteration(t) / "pairs.jsonl") if p["split"] in ("train", "train_prev")]
        out = self.dir.iteration(t)
        metrics = train_adapter(model, pairs, self.cfg, t, out, self.tokenizer.pad_token_id, self.rank,
                                self.world_size, progress=self._progress(t, "train"))
        if self.rank == 0:
            atomic_write_json(out / "train_metrics.json", metrics)
            tmp = out / f"adapter.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, selected_adapters=["default"])
            replace_dir(tmp, out / "adapter")
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        self._barrier()

    def evaluate(self, t: int, model, began: float):
        """Validation and test metrics of the trained adapter, the stop rule's verdict, and summary.json."""
        if self.rank != 0:
            return
        out = self.dir.iteration(t)
        # the trained adapter as saved: also right when an earlier process trained it (a resume, `spin-lite train`)
        load_adapter_weights(model, out / "adapter")
        pairs = read_jsonl(out / "pairs.jsonl")
        val = test = None
        if self.cfg.eval.enabled:
            results = read_json(out / "eval.json")
            if results is None:
                beta = self.cfg.beta_at(t)
                val = self._evaluate(t, model, [p for p in pairs if p["split"] == "val"], beta, "val")[0]
                test, samples = self._evaluate(t, model, [p for p in pairs if p["split"] == "eval"], beta, "test")
                atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
                atomic_write_json(out / "eval.json", {"test": test, "val": val})
            else:
                test, val = results.get("test", results), results.get("val")  # eval.json before validation rows
        self.write_summary(t, pairs, test, val, time.time() - began)
        s = read_json(out / "summary.json")["selection"]
        if s and s["accepted"] is False:
            patience = (f" ({s['rejected_in_a_row']} in a row, train.stop_patience={self.cfg.train.stop_patience})"
                        if self.cfg.train.stop_when == "no_gain" else "")
            self.log(f"iteration {t} is not better than {s['compared_with']} on the validation rows: "
                     + "; ".join(s["reasons"]) + (". Stopping (train.stop_when=no_gain)." if s["stop"] else
                                                  patience + "."))

    def write_summary(self, t: int, pairs: list[dict], test: dict | None, val: dict | None, wall_s: float):
        out = self.dir.iteration(t)
        gen_train = [p for p in pairs if p["split"] == "train"]
        report = self.splits.report
        atomic_write_json(out / "summary.json", {
            "iteration": t, "opponent": self.opponent_description(t), "mode": self.cfg.mode,
            "beta": self.cfg.beta_at(t), "learning_rate": self.cfg.lr_at(t), "sft_weight": self.cfg.train.sft_weight,
            "pairs": {"current": len(gen_train), "previous": sum(p["split"] == "train_prev" for p in pairs),
                      "generated_truncated": sum(p["gen_truncated"] for p in gen_train),
                      "generated_mean_tokens": sum(len(p["gen_ids"]) for p in gen_train) / len(gen_train)},
            "train": read_json(out / "train_metrics.json"), "eval": test, "val": val,
            "selection": self.selection(t, val),
            "data": asdict(report) | {"skipped": len(report.skipped)},
            "wall_s": round(wall_s, 1)})

    def selection(self, t: int, val: dict | None) -> dict | None:
        """The stop rule's verdict on iteration t: is it better, on the validation rows, than the best model
        before it (the starting model, or the best earlier iteration)? None without validation metrics."""
        if not val:
            return None
        best = self.dir.best_iteration()
        if best is None or best < 0:
            before, name = (read_json(self.dir.root / "eval-start.json") or {}).get("val"), "the starting model"
        else:
            before, name = read_json(self.dir.iteration(best) / "summary.json")["val"], f"iteration {best}"
        reasons = compare(val, before) if before else []
        rejected = 1 + self.dir.rejected_in_a_row(before=t) if reasons else 0  # in a row, this one included
        return {"compared_with": name, "accepted": not reasons, "reasons": reasons, "rejected_in_a_row": rejected,
                "stop": self.cfg.train.stops_after(rejected)}

    def opponent_description(self, t: int) -> str:
        start = f"base {self.cfg.model.name}" + (f" + adapter {self.cfg.model.adapter}" if self.cfg.model.adapter else "")
        if t == 0:
            return start
        if self.cfg.mode == "stack":
            return f"base + adapter of iteration {t - 1}"
        return f"{start} + the adapters of iterations 0..{t - 1}, frozen"

    # -- model of iteration t ------------------------------------------------------------------------
    def model_for(self, t: int):
        """The model whose one trainable adapter starts equal to iteration t's opponent."""
        adapters = self.dir.adapters_after(t - 1, self.cfg.mode, self.cfg.model.adapter)
        # A fresh adapter's random A matrices come from this seed, not from whatever the process did before:
        # the same in every process of a data-parallel run, and after a resume.
        torch.manual_seed(self.cfg.seed * 1009 + t)
        self.backend = self.backend or resolve_backend(self.cfg.model)
        if self.cfg.mode == "merge" and self.backend == "unsloth":  # one adapter a model: merge for real
            merged_dir = self.dir.root / "merged-base"
            base = merged_base(self.cfg.model, adapters, merged_dir) if adapters else load_base(self.cfg.model)
            return build_model(base, self.cfg.lora, [], log=self.log)
        if self.base is None:
            self.base = load_base(self.cfg.model)
        return build_model(self.base, self.cfg.lora, adapters, self.cfg.mode, log=self.log)

    def _release(self, model):
        if self.backend == "hf":
            self.base = model.unload()  # the base without LoRA layers, for the next iteration's adapters
        else:
            self.base = None  # an Unsloth model keeps its one adapter: the next iteration loads a fresh base
            shutil.rmtree(self.dir.root / "merged-base", ignore_errors=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the stages' work ----------------------------------------------------------------------------------
    def rows(self) -> dict:
        """Every row by key: train:N, val:N (validation) and eval:N (test)."""
        s = self.splits
        return {f"{split}:{e.row}": e for split, rows in (("train", s.train), ("val", s.val), ("eval", s.test))
                for e in rows}

    def prompts(self) -> dict[str, list[int]]:
        return {k: e.prompt_ids for k, e in self.rows().items()}

    def score(self, t: int, model, generations: dict[str, dict]) -> list[dict]:
        """Pairs of iteration t with the opponent's log-probs, computed once and saved with them."""
        path = self.dir.iteration(t) / "pairs.jsonl"
        rows = self.rows()
        pairs = [{"key": k, "split": k.split(":")[0], "prompt_ids": rows[k].prompt_ids,
                  "real_ids": rows[k].response_ids, "gen_ids": g["ids"], "gen_truncated": g["truncated"]}
                 for k, g in sorted(generations.items()) if k in rows]
        if t > 0 and self.cfg.train.mix_previous:
            pairs += [p | {"split": "train_prev"} for p in read_jsonl(self.dir.iteration(t - 1) / "pairs.jsonl")
                      if p["split"] == "train"]
        mine = pairs[self.rank::self.world_size]
        bs = self.cfg.train.micro_batch_size * 2
        pad = self.tokenizer.pad_token_id
        progress = self._progress(t, "score", 2 * len(mine))
        real, _ = score(model, [p["prompt_ids"] for p in mine], [p["real_ids"] for p in mine], pad, bs, progress)
        offset = (lambda done: progress(len(mine) + done)) if progress else None
        gen, _ = score(model, [p["prompt_ids"] for p in mine], [p["gen_ids"] for p in mine], pad, bs, offset)
        for p, r, g in zip(mine, real, gen):
            p["opponent_real"], p["opponent_gen"] = r, g
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            pairs = [p for part in gathered for p in part]
        pairs.sort(key=lambda p: (p["split"], p["key"]))  # one order however many processes scored them
        if self.rank == 0:
            atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
        self._barrier()
        return pairs

    def evaluate_start(self, model):
        s = self.splits
        items = lambda split, rows: [{"key": f"{split}:{e.row}", "prompt_ids": e.prompt_ids,
                                      "real_ids": e.response_ids} for e in rows]
        val = self._evaluate(None, model, items("val", s.val), None, "val")[0] if s.val else None
        test, samples = self._evaluate(None, model, items("eval", s.test), None, "test")
        atomic_write_json(self.dir.root / "eval-start.json", {"metrics": test, "val": val, "samples": samples})

    def _evaluate(self, t, model, items: list[dict], beta, which: str):
        if not items:
            return None, []
        progress = self.dir.progress(t, f"evaluate {which}", len(items))
        return evaluate(model, self.tokenizer, items, self.cfg, beta, stop_token_ids(self.tokenizer, model), progress)

    def _progress(self, t: int, stage: str, total: int | None = None):
        return self.dir.progress(t, stage, total) if self.rank == 0 else None

    def _set_state(self, **fields):
        if self.rank == 0:
            self.dir.set_state(**fields)

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()


def results_table(run_dir: RunDir, cfg=None) -> list[dict]:
    """One row for the starting model, one per complete iteration (RunDir.results_table)."""
    return run_dir.results_table(cfg)


# (key, title, format) of the columns `spin-lite table` prints; columns without any value are left out.
TABLE_COLUMNS = [("model", "model", "{}"), ("train_loss", "train loss", "{:.4f}"),
                 ("val_logp_per_token", "val logp/tok", "{:.3f}"), ("val_ended_rate", "val ended", "{:.2f}"),
                 ("margin_accuracy", "test margin acc", "{:.2f}"), ("logp_per_token", "test logp/tok", "{:.3f}"),
                 ("ended_rate", "test ended", "{:.2f}"), ("repetition_rate", "test repetitive", "{:.2f}"),
                 ("match_rate", "test match", "{:.2f}"), ("task_accuracy", "test task acc", "{:.2f}"),
                 ("sample_tokens", "answer tokens", "{:.1f}")]


def format_table(run_dir: RunDir, cfg=None) -> str:
    """`spin-lite table`: the results table, the stop rule's verdicts, and the chosen iteration; `cfg` (the
    run's settings) says whether the stop rule ended the run."""
    rows = results_table(run_dir, cfg)
    columns = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in columns] + ["chosen"]] + [
        [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in columns] + ["best" if r.get("best") else ""]
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"{r['model']}: not better than {r['selection']['compared_with']} on validation ("
             + "; ".join(r["selection"]["reasons"]) + ")" + (", run stopped" if r.get("stopped") else "")
             for r in rows if r.get("selection") and r["selection"]["accepted"] is False]
    best = run_dir.best_iteration()
    chosen = ("no validation rows: nothing chosen" if best is None else
              "chosen on the validation rows: " + ("the starting model" if best < 0 else f"iteration {best}"))
    return f"SPIN results for {run_dir.root} (test rows unless marked val)\n" + "\n".join(lines + notes + [chosen])
