"""The method's guard rails: warmup, the divergence guard, validation rows, the stop rule and the best iteration,
the run directory's contract, and runs made by an earlier version."""
import json
import math

import pytest
import torch
import yaml

from spin_lite.config import ConfigError, load_config
from spin_lite.evaluate import compare, evaluate, is_repetitive, judge
from spin_lite.report import format_table
from spin_lite.run import SpinRun
from spin_lite.state import RunDir, read_jsonl
from spin_lite.train import TrainingDiverged, lr_schedule

from conftest import cli, tiny_settings


def factors(total: int, ratio: float, kind: str = "linear") -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = lr_schedule(optimizer, kind, total, ratio)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_has_a_step_and_no_step_runs_at_rate_zero():
    """6 steps at ratio 0.1: ceil(0.6) = 1 warmup step at 1/2 the peak, then linear decay (6 - k) / 5 for k = 1..5.
    12 steps: ceil(1.2) = 2 warmup steps at 1/3 and 2/3, then (12 - k) / 10. (int() gave 0 and 1 warmup steps,
    the second case's first step at rate 0.)"""
    assert factors(6, 0.1) == pytest.approx([0.5, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert factors(12, 0.1) == pytest.approx([1 / 3, 2 / 3] + [(12 - k) / 10 for k in range(2, 12)])
    assert factors(4, 0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert min(factors(7, 0.1, "cosine")) > 0 and factors(3, 0.5, "constant") == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_divergence_stops_the_run_with_an_error_and_saves_nothing_bad(tiny_model_dir, tmp_path):
    """lr 1e6: the first step saturates the model (the real responses' log-probs become uniform), so the second
    step's gradient is exactly 0 at a loss of 0.66; before the guard the run finished with rc 0 and a dead adapter."""
    run_dir = tmp_path / "run"
    out = cli("run", *tiny_settings(tiny_model_dir, run_dir, **{"train.learning_rate": "1e6"}))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "training diverged at step 2" in out.stderr and "gradient vanished" in out.stderr
    assert not (run_dir / "iter-00" / "adapter").exists() and not (run_dir / "iter-00" / "summary.json").exists()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and "diverged" in state["error"]


def test_non_finite_learning_rate_is_caught_by_the_guard(tiny_config):
    """lr = inf gets past no check here (set after validation): the first step's weights become NaN and the guard
    stops training before the adapter is saved."""
    cfg = tiny_config(**{"eval.enabled": "false"})
    cfg.train.learning_rate = math.inf
    run = SpinRun(cfg, log=lambda *a: None)
    with pytest.raises(TrainingDiverged, match="not finite") as failed:
        run.run()
    assert not (run.dir.iteration(0) / "adapter").exists()
    # the failed run (alive here, as in a notebook's traceback) no longer holds its directory: fixed, it goes on
    assert failed.value and not run.dir.is_locked()


def test_a_model_that_never_ends_its_answers_ranks_below_the_start(tiny_config, tiny_model_dir, tokenizer):
    """The same tiny model twice, with a bias on its output for the stop token: +20, it ends every answer at
    once; -20, it never ends one. The second is ranked below the first even when it is given the higher
    likelihood of the real responses: the ranking does not rest on likelihood alone."""
    from transformers import AutoModelForCausalLM
    from spin_lite.data import encode_prompt
    cfg = tiny_config()
    items = [{"key": f"val:{k}", "prompt_ids": encode_prompt(tokenizer, [{"role": "user", "content": q}]),
              "real_ids": tokenizer.encode(q)[:6] + [tokenizer.eos_token_id]}
             for k, q in enumerate(["What is the sky?", "Why do cats purr?", "Name a river."])]

    def metrics(eos_bias):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[tokenizer.eos_token_id] = eos_bias
        model.lm_head = head
        return evaluate(model, tokenizer, items, cfg)[0]

    ends, never = metrics(+20.0), metrics(-20.0)
    assert ends["ended_rate"] == 1.0 and never["ended_rate"] == 0.0
    never["logp_per_token"] = ends["logp_per_token"] + 1.0  # even with a higher likelihood
    reasons = compare(never, ends)
    assert reasons and "val ended got worse (1.00 -> 0.00)" in reasons[0]
    assert compare(ends, never | {"logp_per_token": ends["logp_per_token"] - 0.1, "ended_rate": 0.0}) == []


def test_compare_by_hand():
    old = {"logp_per_token": -2.0, "ended_rate": 0.5, "repetition_rate": 0.25, "match_rate": 0.5}
    assert compare(old | {"logp_per_token": -1.9}, old) == []
    assert compare(old, old) == ["val logp/tok did not rise (-2.000 -> -2.000)"]
    assert compare(old | {"logp_per_token": -1.0, "repetition_rate": 0.5}, old) == [
        "val repetitive got worse (0.25 -> 0.50)"]
    assert compare(old | {"logp_per_token": -1.0, "match_rate": 0.25, "task_accuracy": 0.0}, old) == [
        "val match got worse (0.50 -> 0.25)"]  # a metric the old model lacks is not compared
    assert is_repetitive("a b c a b c a b c") and not is_repetitive("a b c a b c d")


def test_stop_rule_ends_the_run_and_records_the_best_iteration(tiny_config):
    """Measured on this tiny model and seed: iteration 0 is accepted (validation logp/token -10.82 -> -10.69);
    iteration 1 raises the likelihood again (-10.51) but every validation answer starts looping (repetition
    0 -> 1), so the rule rejects it and the third iteration does not run, until the run is continued with
    train.stop_patience=2."""
    cfg = tiny_config(iterations=3, **{"train.stop_when": "no_gain"})
    run = SpinRun(cfg, log=lambda *a: None)
    run.run()
    rd = run.dir
    assert rd.completed() == 2 and not rd.iteration(2).exists()
    s0, s1 = rd.summaries()
    assert s0["selection"]["accepted"] and s0["selection"]["compared_with"] == "the starting model"
    assert not s1["selection"]["accepted"] and s1["selection"]["stop"]
    assert any("val repetitive got worse" in r for r in s1["selection"]["reasons"])
    assert s1["val"]["logp_per_token"] > s0["val"]["logp_per_token"]  # likelihood alone would have kept it
    assert rd.best_iteration() == 0 and rd.stopped(cfg) and s1["selection"]["rejected_in_a_row"] == 1
    assert json.loads((rd.root / "state.json").read_text())["best_iteration"] == 0
    rows = rd.results_table()
    assert [r["best"] for r in rows] == [False, True, False]
    table = format_table(rd, cfg)
    assert "chosen on the validation rows: iteration 0" in table and "iter 1: not better" in table
    assert table.endswith(  # what to do next: export the chosen model, or go on past the rejected iteration
        f"run stopped\nchosen on the validation rows: iteration 0 (decided by val logp/tok)\nnext: export the chosen model: spin-lite export "
        f"{rd.root} --iteration 0 --out exports/run-iter-00  (the adapter; --merged or --gguf q8_0: one model file)\n"
        f"or let SPIN go on past the rejected iteration(s), with a higher patience: spin-lite run {rd.root}/config.yaml "
        "train.stop_patience=2")
    header = table.splitlines()[1]  # every reason names a column the table shows
    assert all(f" {r.split(' got worse')[0].split(' did not rise')[0]} " in header for r in s1["selection"]["reasons"])
    # the verdict read only validation scores: the paired test on the stored per-row scores gives it again, and
    # those rows' aggregates are the validation metrics
    start_val = json.loads((rd.root / "eval-start.json").read_text())["val"]
    assert s1["selection"]["rule"] == "paired" and s1["selection"]["rows"] == 4
    assert judge(s0["val"], start_val, rd.val_rows(0), rd.val_rows(-1)).better
    assert judge(s1["val"], s0["val"], rd.val_rows(1), rd.val_rows(0)).reasons == s1["selection"]["reasons"]
    rows1 = rd.val_rows(1)
    assert len(rows1) == 4 and all(key.startswith("val:") for key in rows1)
    assert sum(r["logp"] for r in rows1.values()) / sum(r["tokens"] for r in rows1.values()) == pytest.approx(
        s1["val"]["logp_per_token"])
    assert sum(r["repetitive"] for r in rows1.values()) / 4 == s1["val"]["repetition_rate"] == 1.0
    # `spin-lite export RUN --iteration best` exports the chosen one
    from spin_lite.export import MARKER, ExportError, export_adapter
    out = export_adapter(rd.root, "best", rd.root.parent / "best")
    assert json.loads((out / MARKER).read_text())["iteration"] == 0
    summary1 = rd.iteration(1) / "summary.json"
    saved = summary1.read_text()
    s0_rejected = dict(s0, selection=dict(s0["selection"], accepted=False, better=False))
    (rd.iteration(0) / "summary.json").write_text(json.dumps(s0_rejected))
    assert rd.best_iteration() == -1
    with pytest.raises(ExportError, match="chose on the validation rows is the starting model: no iteration"):
        export_adapter(rd.root, "best", rd.root.parent / "none")
    (rd.iteration(0) / "summary.json").write_text(json.dumps(s0))
    assert summary1.read_text() == saved
    # running the command again does nothing more (run() released the directory when it ended)
    said = []
    again = SpinRun(cfg, log=said.append)
    again.run()
    assert rd.completed() == 2
    # released, the directory may be changed by another run: run() on the same object checks its settings again
    saved_config = rd.config_path.read_text()
    changed = yaml.safe_load(saved_config)
    changed["lora"]["r"] += 1
    rd.config_path.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match="started with a different config; changed: lora.r"):
        again.run()
    rd.config_path.write_text(saved_config)
    assert not rd.is_locked()
    assert any(line.startswith("the stop rule ended this run after iteration 1 (1 not better in a row, "
                               "train.stop_patience=1); to go on") for line in said)
    # the app says the same: finished by the stop rule; Continue refuses to launch a run that would do nothing
    from spin_lite.app import processes, workspace
    status = processes.run_status(rd.root.parent, rd.root.name)
    assert status["status"] == "finished" and status["stopped_by_rule"] and status["best_iteration"] == 0
    with pytest.raises(workspace.AppError, match="stop rule ended run after iteration 1 .1 not better in a row"):
        processes.continue_run(rd.root.parent, rd.root.name)
    # with train.stop_patience=2 the same run goes on: iteration 2 is trained on iteration 1's samples and
    # judged against the best model before it (iteration 0), not against the rejected iteration 1
    patient = tiny_config(iterations=4, **{"train.stop_when": "no_gain", "train.stop_patience": 2})
    assert not rd.stopped(patient) and rd.changed_settings(patient.to_dict()) == []
    log = []
    patient_run = SpinRun(patient, log=log.append)
    patient_run.run()
    assert rd.completed() == 3
    s2 = rd.summaries()[2]["selection"]  # measured: iteration 2 loops too, the second rejection in a row
    assert s2["compared_with"] == "iteration 0" and not s2["accepted"]
    assert s2["rejected_in_a_row"] == 2 and s2["stop"] and rd.stopped(patient)
    assert rd.best_iteration() == 0
    table = format_table(rd, patient)  # "run stopped" moved from iteration 1's note to iteration 2's
    assert ("iter 1: not better than iteration 0 on validation (val repetitive got worse: 0.00 -> 1.00, difference "
            "+1.00, 90% interval [+1.00, +1.00] over 4 rows)\n") in table
    assert "run stopped\nchosen on the validation rows: iteration 0 (decided by val logp/tok)\nnext: export" in table
    assert table.endswith("train.stop_patience=3")
    assert any("Stopping (train.stop_when=no_gain)" in line for line in log)
    # with all planned iterations done the run is finished, not stopped by the rule: no note, nothing to continue
    done = tiny_config(iterations=3, **{"train.stop_when": "no_gain", "train.stop_patience": 2})
    assert not rd.stopped(done) and "run stopped" not in format_table(rd, done)


def test_validation_and_test_rows_are_apart_and_only_validation_chooses(tiny_config):
    cfg = tiny_config(iterations=1)
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    s = run.splits
    keys = {name: {e.row for e in rows} for name, rows in (("train", s.train), ("val", s.val), ("test", s.test))}
    assert len(keys["val"]) == 4 and len(keys["test"]) == 4 and len(keys["train"]) == 8
    assert not (keys["val"] & keys["test"]) and not (keys["train"] & (keys["val"] | keys["test"]))
    run.run()
    pairs = read_jsonl(run.dir.iteration(0) / "pairs.jsonl")
    assert {p["split"] for p in pairs} == {"train", "val", "eval"}
    log = read_jsonl(run.dir.iteration(0) / "train_log.jsonl")
    assert sum(1 for _ in log) == 2  # 8 training pairs, 4 a step: validation and test pairs are never trained on


def test_run_directory_contract(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.adapters_after(-1, "stack") == [] and rd.adapters_after(-1, "merge", "sft") == ["sft"]
    assert rd.adapters_after(1, "stack", "sft") == [str(tmp_path / "iter-01" / "adapter")]
    assert rd.adapters_after(1, "merge", "sft") == ["sft", str(tmp_path / "iter-00" / "adapter"),
                                                   str(tmp_path / "iter-01" / "adapter")]
    # the model resolve_model names, as the chat, the export and the notebook load it: a control stands alone
    sft = load_config(None, [f"run_dir={tmp_path}", "sft.enabled=true"])
    assert rd.adapters_of(-1, sft) == [str(tmp_path / "sft" / "adapter")]
    assert rd.adapters_of(-1, load_config(None, [f"run_dir={tmp_path}"])) == []
    assert rd.adapters_of(1, sft) == [str(tmp_path / "iter-01" / "adapter")]
    assert rd.adapters_of("control 1", sft) == [str(tmp_path / "control-01" / "adapter")]
    merge = load_config(None, [f"run_dir={tmp_path}", "mode=merge", "model.adapter=made-elsewhere"])
    assert rd.adapters_of(1, merge) == ["made-elsewhere", str(tmp_path / "iter-00" / "adapter"),
                                        str(tmp_path / "iter-01" / "adapter")]
    assert rd.adapters_of("control 0", merge) == [str(tmp_path / "control-00" / "adapter")]
    assert rd.samples_of(-1) == [] and rd.samples_of("control 1") == []  # nothing evaluated yet
    (tmp_path / "control-01").mkdir()
    (tmp_path / "control-01" / "samples.jsonl").write_text('{"prompt": "p", "model": "m"}\n')
    (tmp_path / "eval-start.json").write_text('{"samples": [{"prompt": "q"}]}')
    assert rd.samples_of("control 1") == [{"prompt": "p", "model": "m"}] and rd.samples_of(-1) == [{"prompt": "q"}]
    assert rd.next_stage(0) == "generate" and rd.trained_iterations() == []
    (tmp_path / "iter-00" / "adapter").mkdir(parents=True)
    (tmp_path / "iter-00" / "pairs.jsonl").write_text("")
    (tmp_path / "iter-00" / "adapter" / "adapter_config.json").write_text("{}")
    assert rd.next_stage(0) == "evaluate" and rd.trained_iterations() == [0]
    progress = rd.progress(0, "train", 10)
    progress(10)
    assert rd.read_progress() | {"updated": 0, "rate": 0} == {"iteration": 0, "stage": "train", "done": 10,
                                                             "total": 10, "rate": 0, "updated": 0}


def test_a_run_made_by_the_previous_version_still_resumes(tiny_model_dir, tmp_path):
    """A run directory from before validation rows, the stop rule and the anchor existed (its config.yaml lacks
    them, its eval.json is the bare metrics): today's command continues it as it was made."""
    run_dir = tmp_path / "run"
    old = tiny_settings(tiny_model_dir, run_dir, **{"data.val_size": 0, "train.stop_when": "never"})
    cfg = load_config(None, old)
    run = SpinRun(cfg, log=lambda *a: None)
    run.prepare()
    run.iteration(0)
    run.close()  # (the stage commands release it when their process ends)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    for section, key in (("data", "val_size"), ("data", "val_path"), ("train", "sft_weight"),
                         ("train", "stop_when"), ("eval", "answer_regex")):
        del config[section][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    eval_json = run_dir / "iter-00" / "eval.json"
    eval_json.write_text(json.dumps(json.loads(eval_json.read_text())["test"]))
    (run_dir / "iter-00" / "summary.json").unlink()  # stopped before its summary: the evaluate stage resumes
    pairs_before = (run_dir / "iter-00" / "pairs.jsonl").read_text()

    now = tiny_settings(tiny_model_dir, run_dir)  # today's settings: val_size 4, stop_when never
    logs = []
    resumed = SpinRun(load_config(None, now), log=logs.append)
    resumed.run()
    assert any("earlier version" in line and "data.val_size=0" in line for line in logs)
    assert resumed.dir.completed() == 2
    assert (run_dir / "iter-00" / "pairs.jsonl").read_text() == pairs_before  # nothing regenerated
    assert resumed.dir.summaries()[0]["eval"]["logp_per_token"] < 0
