"""The paper's pipeline around SPIN's iterations (the sft settings), both LoRA SFT on the training rows by
spin_lite.sft.train_sft, the one training loop:
  before iteration 0, with sft.enabled: the SFT stage, whose adapter is SPIN's starting model     -> sft/
  after iteration t, with sft.control: control t, "SFT continued" for as many optimizer steps as
     iterations 0..t, evaluated on the same rows and judged by the stop rule's test; then the final comparison
     of SPIN's choice with the control arm's, whose winner is the run's chosen model (RunDir.chosen_model)
                                                                                                  -> control-NN/
SpinRun (spin_lite.run) calls a ControlArm at those points; each stage is skipped when its files say it is done, so a
resumed run continues it.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from .evaluate import judge, row_scores
from .model import with_adapter
from .report import model_number, versus_line
from .sft import train_sft
from .state import (atomic_write_json, atomic_write_text, control_name, found_better, read_json, read_jsonl,
                    replace_dir)


class ControlArm:
    """The SFT stage and the control arm of one run. It works in the run's directory with the run's settings, rows,
    tokenizer, loaded base and collectives: `run` is the SpinRun that made it (read through it, since
    SpinRun.prepare may replace the settings of a run made by an earlier version)."""

    def __init__(self, run, arm: str = "sft"):
        self.run, self.arm = run, arm  # arm: which control arm (sft.control_rates): "sft" or "spin" (SPIN's rate)

    @property
    def cfg(self):
        return self.run.cfg

    def rate(self, t: int) -> float:
        """The peak learning rate of control t: the SFT rate (arm "sft"), or SPIN's own rate at iteration t (arm
        "spin", train.learning_rate), so that the two controls separate SPIN's objective from its step size."""
        return self.sft_rate if self.arm == "sft" else self.cfg.lr_at(t)

    @property
    def rate_setting(self) -> str:
        """The setting this arm's SFT rate comes from (rate, sft_rate), which a divergence message says to lower."""
        if self.arm == "spin":
            return "train.learning_rate"
        return ("train.sft_learning_rate" if not self.cfg.sft.enabled and self.cfg.train.sft_learning_rate is not None
                else "sft.learning_rate")

    @property
    def sft_rate(self) -> float:
        """The SFT rate of the stage and the control: sft.learning_rate; without an SFT stage, the rate the starting
        model was made at where the run says so (train.sft_learning_rate), so the control continues that SFT."""
        if not self.cfg.sft.enabled and self.cfg.train.sft_learning_rate is not None:
            return self.cfg.train.sft_learning_rate
        return self.cfg.sft.learning_rate

    @property
    def dir(self):
        return self.run.dir

    def sft_stage(self):
        """The SFT stage (sft.enabled), once, before iteration 0: the base (+ model.adapter) trained by SFT on the
        training rows -> sft/adapter, SPIN's starting model (RunDir.start_adapter). The model before it is evaluated
        first (eval-base.json: the table's "base" row); sft/summary.json, written last, marks the stage done."""
        out = self.dir.sft_dir
        if not self.cfg.sft.enabled or self.dir.sft_done():
            return
        began, rows = time.time(), self.run.splits.train
        out.mkdir(parents=True, exist_ok=True)
        self.run._set_state(iteration=None, stage="sft", status="running")
        trained = self.dir.sft_trained()
        torch.manual_seed(self.cfg.seed)  # a fresh adapter's initialisation, as `spin-lite sft` does it
        model = self._sft_model(str(self.dir.model_files(out / "adapter")) if trained else self.cfg.model.adapter)
        if not trained:
            if self.cfg.eval.enabled and self.run.rank == 0 and not (self.dir.root / "eval-base.json").exists():
                # untrained, the adapter adds nothing: this is the model before SFT
                self.run._set_state(stage="evaluate base")
                self.evaluate_plain(model, None, self.dir.root / "eval-base.json")
            self.run._barrier()
            steps = self.cfg.sft.steps or self.cfg.sft.epochs * self.cfg.train.steps_per_epoch(len(rows))
            self.run._set_state(stage="sft")
            self._train_sft(model, out, steps, order_key=0, desc="sft", progress=self.run._progress(None, "sft"))
        if self.run.rank == 0:
            log = read_jsonl(out / "train_log.jsonl")
            last_epoch = log[-self.cfg.train.steps_per_epoch(len(rows)):]
            atomic_write_json(out / "summary.json", {
                "steps": len(log), "learning_rate": self.cfg.sft.learning_rate, "start_adapter": self.cfg.model.adapter,
                "train_loss": sum(r["loss"] for r in last_epoch) / max(len(last_epoch), 1),
                "train_rows": len(rows), "wall_s": round(time.time() - began, 1)})
            self.run.log(f"sft stage: {len(log)} steps at lr {self.cfg.sft.learning_rate:g}; SPIN starts from "
                         f"{out / 'adapter'}")
        self.run._barrier()
        self.run._release(model)

    def controls(self):
        """The control arm (sft.control): the control of every complete iteration that has none yet."""
        if self.cfg.sft.control:
            for t in range(self.dir.completed_controls(self.arm), self.dir.completed()):
                self.control(t)

    def control(self, t: int):
        """Control t, "SFT continued": control t-1 (for t = 0, the starting model) trained by SFT on the training rows
        for as many optimizer steps as SPIN iteration t took, so that it has taken as many as iterations 0..t
        together; then evaluated on the same validation and test rows, and judged (control-NN/summary.json)."""
        began, out = time.time(), self.dir.control(t, self.arm)
        out.mkdir(parents=True, exist_ok=True)
        self.run._set_state(iteration=t, stage="control", status="running")
        trained = self.dir.control_stage_done(t, "train", self.arm)
        source = (out / "adapter" if trained else self.dir.control(t - 1, self.arm) / "adapter" if t > 0
                  else self.dir.start_adapter(self.cfg))
        torch.manual_seed(self.cfg.seed)  # control 0 without a starting adapter: a fresh one, as the SFT stage's
        model = self._sft_model(None if source is None else self.dir.checked_model(str(source)))
        if not trained:
            steps = self.dir.trained_steps(t)
            self.run._set_state(stage="control train")
            # the data orders of control t: keys 1000 + t, apart from the SFT stage's (0)
            # (the same keys in both arms: their controls see the same rows in the same order, only the rate differs)
            self._train_sft(model, out, steps, order_key=1000 + t, desc=control_name(t, self.arm),
                            progress=self.run._progress(t, "control train"), lr=self.rate(t))
        if self.run.rank == 0:
            self.run._set_state(stage="control evaluate")
            self.finish_control(t, model, time.time() - began)
        self.run._barrier()
        self.run._release(model)

    def finish_control(self, t: int, model, wall_s: float):
        """Control t's evaluation (eval.json, samples.jsonl), its verdicts and summary.json (rank 0)."""
        out = self.dir.control(t, self.arm)
        results = read_json(out / "eval.json")
        if results is None and self.cfg.eval.enabled:
            results = self.evaluate_plain(model, t, out / "eval.json", out / "samples.jsonl")
        results = results or {}
        log = read_jsonl(out / "train_log.jsonl")
        before = read_json(self.dir.control(t - 1, self.arm) / "summary.json")["cumulative_steps"] if t > 0 else 0
        selection = self.control_selection(t, results.get("val"))
        summary = {"control": t, "arm": self.arm, "steps": len(log), "cumulative_steps": before + len(log),
                   "learning_rate": self.rate(t),
                   "train": {"steps": len(log), "sft_loss": sum(r["loss"] for r in log) / max(len(log), 1)},
                   "eval": results.get("test"), "val": results.get("val"), "selection": selection,
                   "wall_s": round(wall_s, 1)}
        summary["versus"] = self.versus(t, selection)
        atomic_write_json(out / "summary.json", summary)
        if summary["versus"] and t + 1 < self.cfg.iterations and not self.dir.stopped(self.cfg):
            self.run.log(summary["versus"]["line"])  # (after the run's last control, the table says it: once)

    def control_selection(self, t: int, val: dict | None) -> dict | None:
        """The control arm's own choice, by the stop rule's test: is control t better, on the validation rows, than
        the best model before it (the starting model, or the best earlier control)? None without validation rows."""
        if not val:
            return None
        best = self.dir.best_control(self.arm)
        before = "start" if best is None or best < 0 else control_name(best, self.arm)
        verdict = (self._judge(control_name(t, self.arm), before).to_dict() if self._val(before)[0]
                   else {"worse": False, "better": True, "reasons": []})
        return {"compared_with": "the starting model" if before == "start" else before,
                "accepted": not verdict.pop("worse"), **verdict}

    def versus(self, t: int, selection: dict | None) -> dict | None:
        """The final comparison, once control t is judged: SPIN's choice (the stop rule's: the start or an
        iteration) against the control arm's (the start or a control), on the validation rows, by the stop rule's
        test. The control wins only when that test finds it better than SPIN's choice. Where no control beat the
        start, SPIN's choice is measured against the control with as many steps, which wins if that test finds it
        better; `line` says which won and by how much."""
        spin = self.dir.best_iteration()
        if selection is None or spin is None:
            return None
        control = t if found_better(selection) else self.dir.best_control(self.arm)
        spin = "start" if spin < 0 else f"iter {spin}"
        control = "start" if control is None or control < 0 else control_name(control, self.arm)
        against = (control if control != "start" else None if spin == "start"
                   else control_name(min(model_number(spin), t), self.arm))
        winner, verdict = spin, None
        if against is not None:
            verdict = self._judge(against, spin)
            if verdict.better:  # the arm's choice, or (the arm kept the start) the control with SPIN's steps
                winner = against
            else:  # how far SPIN's choice is ahead: the same test, the other way round
                verdict = self._judge(spin, against)
        loser = spin if winner != spin else against
        line = versus_line(winner, loser, verdict, self._val(winner)[0], self._val(loser)[0] if loser else None,
                           {key: self._steps(key) for key in (winner, loser) if key})
        return {"spin": spin, "control": control, "winner": winner, "against": loser,
                "verdict": verdict.to_dict() if verdict else None, "line": line}

    def _judge(self, new: str, old: str):
        """The stop rule's test (spin_lite.evaluate.judge) of the model `new` against `old` ("start", "iter N",
        "control N") on the validation rows."""
        (new_val, new_rows), (old_val, old_rows) = self._val(new), self._val(old)
        return judge(new_val, old_val, new_rows, old_rows, self.cfg.train.stop_confidence,
                     self.cfg.eval.deciding_metric)

    def _steps(self, key: str) -> int:
        """Optimizer steps since the start of "iter N" or "control N": as many as iterations 0..N took together."""
        if key == "start":
            return 0
        return sum(self.dir.trained_steps(t) for t in range(model_number(key) + 1))

    def _val(self, key: str) -> tuple[dict | None, dict | None]:
        """(validation metrics, per-row validation scores) of "start", "iter N" or "control N"."""
        results = self.dir.evaluation(key)
        return results.get("val"), results.get("val_rows")

    def evaluate_plain(self, model, t: int | None, path, samples_path=None) -> dict:
        """Validation and test metrics, with their per-row scores, of a model without an opponent (the model before
        the SFT stage, a control): written to `path` as eval-start.json has them, or with `samples_path` as an
        iteration's eval.json and samples.jsonl."""
        s = self.run.splits
        items = lambda split, rows: [{"key": f"{split}:{e.row}", "prompt_ids": e.prompt_ids,
                                      "real_ids": e.response_ids} for e in rows]
        val, val_samples = self.run._evaluate(t, model, items("val", s.val), None, "val")
        test, samples = self.run._evaluate(t, model, items("eval", s.test), None, "test")
        results = {"val": val, "val_rows": row_scores(val_samples), "test_rows": row_scores(samples)}
        if samples_path is None:
            results |= {"metrics": test, "samples": samples}
        else:
            results |= {"test": test}
            atomic_write_text(samples_path, "".join(json.dumps(x) + "\n" for x in samples))
        atomic_write_json(path, results)
        return results

    def _sft_model(self, adapter: str | None):
        """The base with one trainable adapter: a copy of `adapter`, or a fresh one."""
        return with_adapter(self.run.loaded_base(), self.cfg.lora, adapter, self.run.log)

    def _train_sft(self, model, out, steps: int, order_key: int, desc: str, progress=None, lr: float | None = None):
        """SFT for `steps` optimizer steps at `lr` (default sft_rate; train_sft: the one loop, checkpoints in
        out/checkpoint/), then the adapter saved in out/adapter/ (rank 0)."""
        train_sft(model, self.run.splits.train, self.cfg, self.run.tokenizer.pad_token_id, out, steps,
                  lr=self.sft_rate if lr is None else lr, order_key=order_key, desc=desc, progress=progress,
                  lr_setting=self.rate_setting)
        if self.run.rank == 0:
            tmp = out / f"adapter.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(self.dir.model_files(tmp), selected_adapters=["default"])
            replace_dir(tmp, out / "adapter")
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        self.run._barrier()
