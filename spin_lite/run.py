"""One SPIN run: iterations of generate -> train -> evaluate, continued from the run directory.

Iteration t (see README, "The method"):
  0. build the model of iteration t: the opponent (the model after iteration t-1, RunDir.adapters_after) plus
     one trainable adapter that starts equal to it (spin_lite.model.build_model)
  1. generate: the opponent answers every training, validation and test prompt            -> generations.jsonl
     (at t = 0 the starting model's answers, kept as tspin's proto-synthetic responses)    -> ../proto.jsonl
     and scores the real and generated responses once (from t = 1 the previous iteration's
     training pairs are rescored and mixed in)                                             -> pairs.jsonl
  2. train the adapter with the SPIN loss (+ the optional likelihood anchor)               -> adapter/
  3. evaluate on the validation and test rows (metrics and per-row scores); the stop rule
     tests the new model against the best one before it, paired over the validation rows
     (spin_lite.evaluate.judge)                                                            -> eval.json, summary.json
The stages are the table `STAGES` (spin_lite.state): each is skipped when its file says it is done, so
running the same command again continues the run, and `spin-lite generate|train|evaluate` run one of them.
`iterations` is a maximum: with train.stop_when=no_gain the run ends after the first iteration that is worse than
the best model before it on the validation rows, with train.stop_confidence (or after train.stop_patience of them
in a row); an iteration better with that confidence becomes the best one, recorded (RunDir.best_iteration).

The paper's pipeline around the iterations (the sft settings) is spin_lite.control's ControlArm, called at two points:
  before iteration 0, with sft.enabled: the SFT stage, whose adapter is SPIN's starting model     -> sft/
  after iteration t, with sft.control: control t, "SFT continued", and the final comparison      -> control-NN/
The run ends with summary.json and the results table of spin_lite.report (what `spin-lite table` prints).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from .config import ConfigError, SpinConfig, apply_legacy
from .control import ControlArm
from .data import load_splits
from .evaluate import evaluate, judge, row_scores, score
from .generate import generate_all, read_generations, stop_token_ids
from .model import build_model, load_adapter_weights, load_base, load_tokenizer, resolve_backend, save_merged_base
from .preflight import check_model
from .records import RunRecordError
from .report import format_table
from .state import (STAGES, RunDir, atomic_write_json, atomic_write_text, fault_point, found_better, read_json,
                    read_jsonl, replace_dir)
from .train import TrainingDiverged, train_adapter


class RunError(RuntimeError):
    """A stage was asked for out of order, or the run directory cannot be used."""


# Ranks > 0 wait in a barrier while rank 0 alone evaluates (the starting model, then each iteration) or writes a
# merged base; with an 8B model or a large evaluation set that passes NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def init_process_group():
    """Join the process group torchrun/accelerate set up (WORLD_SIZE > 1): NCCL on this process's own GPU, cuda:
    LOCAL_RANK (spin_lite.model.device), or gloo on the CPU.

    The device is set first: NCCL and the collectives on objects (all_gather_object) use the current device, which
    is cuda:0 in every process until set."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


class SpinRun:
    """A run over `cfg.run_dir`. Use `SpinRun(cfg).run()`; stages can also be run one by one (`iteration`)."""

    def __init__(self, cfg: SpinConfig, log=print):
        self.cfg, self.dir, self.log = cfg, RunDir(cfg.run_dir), log
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world_size > 1 and not dist.is_initialized():
            init_process_group()
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
        if self.cfg.sft.enabled and self.dir.sft_done() and not self.dir.sft_trained():  # the starting model is gone
            redo = ("remove sft/ to run the stage again" if not self.dir.completed() else
                    "the iterations were trained from it, so use a new run_dir if it is lost")
            raise RunRecordError(self.dir.sft_dir / "adapter", None, "the SFT stage's adapter, which sft/summary.json "
                                 f"says was made (SPIN's starting model): put the folder back, or {redo}")
        tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(self.cfg.train.report_to)
        if tracker and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"train.report_to={tracker} needs the {tracker} package: pip install {tracker}")
        self.backend = resolve_backend(self.cfg.model, self.cfg.mode)
        if self.backend == "unsloth":  # its fast forward drops the attention mask while training, and patches layers
            for key, value in (("train.pack_pairs", self.cfg.train.pack_pairs),
                               ("train.fused_kernels", self.cfg.train.fused_kernels != "none")):
                if value:
                    raise ConfigError(f"{key} needs the hf backend, and this run uses unsloth (model.backend="
                                      f"{self.cfg.model.backend}): Unsloth's own forward ignores a document mask while "
                                      f"training and brings its own kernels. Set model.backend: hf, or turn {key} off")
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.splits = load_splits(self.cfg.data, self.tokenizer, self.cfg.seed)
        if self.rank == 0:
            self._lock = self.dir.lock()
            try:
                for path in self.dir.remove_stale_temporaries():  # a killed run's half-written files (never read)
                    self.log(f"removed {path.relative_to(self.dir.root)}, left by an interrupted write")
                atomic_write_text(self.dir.config_path, self.cfg.to_yaml())
            except BaseException:
                self.close()
                raise
            fault_point("set_up", 1)  # the end of set-up: locked, config.yaml written, nothing run (no progress.json)
        s = self.splits
        self.log(f"backend: {self.backend} (model.backend={self.cfg.model.backend})")
        self.log(f"data: {len(s.train)} training, {len(s.val)} validation and {len(s.test)} test rows "
                 f"({s.report.describe()})")
        for line in s.report.skipped[:10]:
            self.log(f"  skipped {line}")
        return self

    def close(self):
        """Release the run directory (its lock) so that another process, or another SpinRun in this one, may go
        on with it; nothing on disk changes. run() does this when it ends, an error included: a notebook keeps a
        failed run's objects alive in its traceback, and the directory must not stay locked by them."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def run(self) -> list[dict]:
        """Every stage not done yet (the SFT stage, the iterations, the controls); then the table and summary.json.
        The run directory is locked while it runs and released when it ends, however it ends."""
        self._claim()
        try:
            return self._run()
        finally:
            self.close()

    def _claim(self):
        """prepare() unless this process holds the run directory already: the first time, and again after a run()
        that ended released it (another process may have gone on with it since: its settings are checked again)."""
        if self.tokenizer is None or (self.rank == 0 and self._lock is None):
            self.prepare()

    def _run(self) -> list[dict]:
        # The SFT stage and the control arm (spin_lite.control). Made here and not kept in self: a reference back
        # would make a cycle, and the run's loaded model would outlive the run until the garbage collector.
        ControlArm(self).sft_stage()
        arms = [ControlArm(self, rate) for rate in self.cfg.sft.control_rates]  # SFT continued, at each rate
        first = self.dir.completed()
        for arm in arms:
            arm.controls()  # of iterations completed before (a resumed run, or sft.control turned on since)
        for t in range(first, self.cfg.iterations):
            if self.dir.stopped(self.cfg):
                if t == first and self.rank == 0:  # (a stop in this invocation has said so already)
                    self.log(f"the stop rule ended this run {self.dir.stop_reason(self.cfg)}; to go on, run it again "
                             "with a higher train.stop_patience or train.stop_when=never")
                break
            self.iteration(t)
            for arm in arms:
                arm.controls()
        if self.rank == 0:
            self._set_state(status="finished", stage="done", best_iteration=self.dir.best_iteration(),
                            chosen=self.dir.chosen_model())
            atomic_write_json(self.dir.root / "summary.json", {
                "chosen": self.dir.chosen_model(), "comparison": self.dir.final_comparison(),
                "best_iteration": self.dir.best_iteration(), "best_control": self.dir.best_control(),
                "models": self.dir.results_table(self.cfg)})
            self.log(format_table(self.dir, self.cfg))
        self._barrier()
        return self.dir.summaries()

    # -- one iteration: the stage table ----------------------------------------------------------------
    def iteration(self, t: int, only: str | None = None):
        """Run the stages of iteration t that are not done yet, or the one stage `only` (its earlier stages
        must be done: `spin-lite generate|train|evaluate`)."""
        self._claim()
        if t == 0:
            ControlArm(self).sft_stage()  # (the stage commands too: the SFT model is iteration 0's opponent)
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
            model.save_pretrained(self.dir.model_files(tmp), selected_adapters=["default"])
            replace_dir(tmp, out / "adapter")
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        self._barrier()

    def evaluate(self, t: int, model, began: float):
        """Validation and test metrics of the trained adapter, the stop rule's verdict, and summary.json."""
        if self.rank != 0:
            return
        out = self.dir.iteration(t)
        # the trained adapter as saved: also right when an earlier process trained it (a resume, `spin-lite train`)
        load_adapter_weights(model, self.dir.model_files(out / "adapter"))
        pairs = read_jsonl(out / "pairs.jsonl")
        val = test = None
        if self.cfg.eval.enabled:
            results = read_json(out / "eval.json")
            if results is None:
                beta = self.cfg.beta_at(t)
                val, val_samples = self._evaluate(t, model, [p for p in pairs if p["split"] == "val"], beta, "val")
                test, samples = self._evaluate(t, model, [p for p in pairs if p["split"] == "eval"], beta, "test")
                atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
                atomic_write_json(out / "eval.json", {"test": test, "val": val, "val_rows": row_scores(val_samples),
                                                      "test_rows": row_scores(samples)})
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
        elif s and not found_better(s):
            self.log(f"iteration {t} is not clearly better than {s['compared_with']} on the validation rows: "
                     + "; ".join(s["reasons"]) + f". It is not chosen; {s['compared_with']} stays the best model.")

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
        """The stop rule's verdict on iteration t against the best model before it (the starting model, or the best
        earlier iteration), paired over the validation rows (spin_lite.evaluate.judge): `accepted` unless worse
        with train.stop_confidence (a rejection counts toward train.stop_patience), `better` (chosen) when better
        with it; `differences`: each metric's difference and interval. None without validation metrics."""
        if not val:
            return None
        best = self.dir.best_iteration()
        best = -1 if best is None else best
        if best < 0:
            before, name = (read_json(self.dir.root / "eval-start.json") or {}).get("val"), "the starting model"
        else:
            before, name = read_json(self.dir.iteration(best) / "summary.json")["val"], f"iteration {best}"
        verdict = (judge(val, before, self.dir.val_rows(t), self.dir.val_rows(best),
                         self.cfg.train.stop_confidence, self.cfg.eval.deciding_metric).to_dict()
                   if before else {"worse": False, "better": True})
        rejected = 1 + self.dir.rejected_in_a_row(before=t) if verdict["worse"] else 0  # in a row, this one included
        return {"compared_with": name, "accepted": not verdict.pop("worse"), "reasons": [], **verdict,
                "rejected_in_a_row": rejected, "stop": self.cfg.train.stops_after(rejected)}

    def opponent_description(self, t: int) -> str:
        adapter = self.dir.start_adapter(self.cfg)
        start = f"base {self.cfg.model.name}" + (f" + adapter {adapter}" if adapter else "")
        if t == 0:
            return start
        if self.cfg.mode == "stack":
            return f"base + adapter of iteration {t - 1}"
        return f"{start} + the adapters of iterations 0..{t - 1}, frozen"

    # -- model of iteration t ------------------------------------------------------------------------
    def model_for(self, t: int):
        """The model whose one trainable adapter starts equal to iteration t's opponent."""
        adapters = self.dir.adapters_after(t - 1, self.cfg.mode, self.dir.start_adapter(self.cfg))
        # A fresh adapter's random A matrices come from this seed, not from whatever the process did before:
        # the same in every process of a data-parallel run, and after a resume.
        torch.manual_seed(self.cfg.seed * 1009 + t)
        self.backend = self.backend or resolve_backend(self.cfg.model, self.cfg.mode)
        if self.cfg.mode == "merge" and self.backend == "unsloth":  # one adapter a model: merge for real
            return build_model(self._merged_base(adapters), self.cfg.lora, [], log=self.log)
        return build_model(self.loaded_base(), self.cfg.lora, adapters, self.cfg.mode, log=self.log)

    def loaded_base(self):
        """The base model, loaded once and kept between iterations (_release keeps it without their adapters)."""
        if self.base is None:
            self.base = load_base(self.cfg.model)
        return self.base

    def _merged_base(self, adapters: list[str]):
        """The base with `adapters` merged in (spin_lite.model.save_merged_base), for merge mode on Unsloth: written
        to run_dir/merged-base by rank 0 alone, and loaded from there by every process once it is complete."""
        if not adapters:
            return load_base(self.cfg.model)
        folder = self.dir.root / "merged-base"
        if self.rank == 0:
            save_merged_base(self.cfg.model, adapters, folder)
        self._barrier()
        return load_base(self.cfg.model, path=str(folder))

    def _release(self, model):
        if self.backend == "hf":
            self.base = model.unload()  # the base without LoRA layers, for the next iteration's adapters
        else:
            self.base = None  # an Unsloth model keeps its one adapter: the next iteration loads a fresh base
            if self.rank == 0:  # (another rank deleting it could remove the next iteration's, being written)
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
        if t == 0 and self.rank == 0:  # the starting model's own samples: tspin's proto-synthetic responses
            atomic_write_text(self.dir.proto_path, "".join(json.dumps({"key": p["key"], "ids": p["gen_ids"]}) + "\n"
                                                           for p in pairs))
        if t > 0 and self.cfg.train.loss_type == "tspin":
            proto = self.dir.proto_responses()
            pairs = [p | {"proto_ids": proto[p["key"]]} if p["key"] in proto else p for p in pairs]
        mine = pairs[self.rank::self.world_size]
        bs = self.cfg.train.micro_batch_size * 2
        pad = self.tokenizer.pad_token_id
        progress = self._progress(t, "score", 2 * len(mine))
        amp = self.cfg.train.autocast  # the precision the policy is trained in: it starts equal to the opponent
        real, _ = score(model, [p["prompt_ids"] for p in mine], [p["real_ids"] for p in mine], pad, bs, progress, amp)
        offset = (lambda done: progress(len(mine) + done)) if progress else None
        gen, _ = score(model, [p["prompt_ids"] for p in mine], [p["gen_ids"] for p in mine], pad, bs, offset, amp)
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
        val, val_samples = self._evaluate(None, model, items("val", s.val), None, "val")
        test, samples = self._evaluate(None, model, items("eval", s.test), None, "test")
        atomic_write_json(self.dir.root / "eval-start.json", {"metrics": test, "val": val, "samples": samples,
                                                              "val_rows": row_scores(val_samples),
                                                              "test_rows": row_scores(samples)})

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
