"""The paper's pipeline in one run (sft.enabled: an SFT stage before iteration 0) and the "SFT continued" control arm
(sft.control): the stage runs once and is iteration 0's opponent; each control takes as many optimizer steps as the
SPIN iterations up to it, continuing the one before; the choice among the start, the iterations and the controls
can pick a control, and `export --iteration best` follows it."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spin_lite.config import ConfigError
from spin_lite.evaluate import score
from spin_lite.export import export_adapter
from spin_lite.records import RunRecordError
from spin_lite.report import format_table, versus_line
from spin_lite.run import SpinRun
from spin_lite.state import RunDir, read_json, read_jsonl
from spin_lite.train import epoch_order

from conftest import DEMO_DATA, tree_digest


def test_sft_stage_runs_once_and_is_iteration_0s_opponent(tiny_config, tiny_model_dir):
    # sft.learning_rate 3e-3, apart from the SPIN rate (train.learning_rate 1e-2 in tiny_settings)
    cfg = tiny_config(iterations=1, **{"sft.enabled": "true", "sft.steps": 3, "sft.learning_rate": 3e-3})
    logs = []
    run = SpinRun(cfg, log=logs.append)
    run.run()
    rd = RunDir(cfg.run_dir)
    log = read_jsonl(rd.sft_dir / "train_log.jsonl")
    assert read_json(rd.sft_dir / "summary.json")["steps"] == len(log) == 3
    # warmup 10% of 3 steps = 1 step at half the peak, then linear decay from the peak: the SFT stage's rate
    assert [r["lr"] for r in log] == pytest.approx([1.5e-3, 3e-3, 1.5e-3])

    # Iteration 0 plays against the SFT model: its stored opponent log-probs are the SFT adapter's, not the base's.
    pairs = read_jsonl(rd.iteration(0) / "pairs.jsonl")
    prompts, real = [p["prompt_ids"] for p in pairs], [p["real_ids"] for p in pairs]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logps, _ = score(base, prompts, real, run.tokenizer.pad_token_id, 4)
    sft_logps, _ = score(PeftModel.from_pretrained(base, rd.sft_dir / "adapter"), prompts, real,
                         run.tokenizer.pad_token_id, 4)
    stored = torch.tensor([p["opponent_real"] for p in pairs])
    del run  # (it holds the run directory's lock)
    torch.testing.assert_close(stored, torch.tensor(sft_logps), atol=1e-4, rtol=0)
    assert (stored - torch.tensor(base_logps)).abs().max() > 1e-2
    assert read_json(rd.iteration(0) / "summary.json")["opponent"].endswith(str(rd.sft_dir / "adapter"))

    # The table: the model before the SFT stage ("base"), then the SFT model, which is the start.
    rows = rd.results_table(cfg)
    assert [r["model"] for r in rows] == ["base", "sft", "iter 0"]
    assert rows[0]["val_logp_per_token"] == read_json(rd.root / "eval-base.json")["val"]["logp_per_token"]
    assert rows[1]["val_logp_per_token"] == read_json(rd.root / "eval-start.json")["val"]["logp_per_token"]
    assert rows[1]["val_logp_per_token"] > rows[0]["val_logp_per_token"]  # SFT raised the real answers' likelihood

    # Run again: the stage is done, and nothing of it is redone or rewritten.
    before = tree_digest(rd.sft_dir) | {"eval-base": (rd.root / "eval-base.json").read_bytes()}
    logs.clear()
    SpinRun(cfg, log=logs.append).run()
    assert tree_digest(rd.sft_dir) | {"eval-base": (rd.root / "eval-base.json").read_bytes()} == before
    assert not [line for line in logs if line.startswith("sft stage")]
    # The SFT stage makes the starting model: a run directory may not drop it, nor change it.
    for change in ({"sft.enabled": "false"}, {"sft.steps": 4}):
        with pytest.raises(ConfigError, match=next(iter(change))):
            SpinRun(tiny_config(iterations=1, **{"sft.enabled": "true", "sft.steps": 3, "sft.learning_rate": 3e-3}
                                | change), log=lambda *a: None).prepare()

    # A stage marked done whose adapter is gone is refused by name, before anything is trained or written.
    shutil.rmtree(rd.sft_dir / "adapter")
    before = tree_digest(rd.root)
    with pytest.raises(RunRecordError, match=r"sft/adapter: expected the SFT stage's adapter.*use a new run_dir"):
        SpinRun(tiny_config(iterations=2, **{"sft.enabled": "true", "sft.steps": 3, "sft.learning_rate": 3e-3}),
                log=lambda *a: None).run()
    assert tree_digest(rd.root) == before


def test_control_arm_matches_spin_steps_and_can_win(tiny_config, tmp_path, capsys):
    # SPIN at a rate 100x below SFT's: its iterations barely move, and SFT continued is chosen.
    shutil.copy(DEMO_DATA, tmp_path / "data.jsonl")  # (inside the app's workspace, below)
    cfg = tiny_config(**{"sft.control": "true", "sft.learning_rate": 1e-2, "train.learning_rate": 1e-4,
                         "data.path": tmp_path / "data.jsonl"})
    logs = []
    run = SpinRun(cfg, log=logs.append)
    run.run()
    rd = RunDir(cfg.run_dir)

    # 8 pairs, 4 a step: iteration 0 takes 2 steps, iteration 1 4 (its pairs and iteration 0's, mixed in); each
    # control takes as many, so that control t has taken as many as iterations 0..t together.
    assert [s["train"]["steps"] for s in rd.summaries()] == [2, 4]
    assert [len(read_jsonl(rd.control(t) / "train_log.jsonl")) for t in (0, 1)] == [2, 4]
    assert [s["cumulative_steps"] for s in rd.control_summaries()] == [2, 6]
    # at sft.learning_rate, each with the train section's schedule: 1 warmup step at half the peak, then linear
    # decay, 1 - k/(n - 1) of the peak at the k-th step after the warmup (n steps)
    lrs = [[r["lr"] for r in read_jsonl(rd.control(t) / "train_log.jsonl")] for t in (0, 1)]
    assert lrs == [pytest.approx([5e-3, 1e-2]), pytest.approx([5e-3, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3])]
    # Control 1 continued control 0: its first step's loss is the NLL per token, under control 0's adapter, of the
    # training rows that step took (control 1's data order: key 1001).
    rows = run.splits.train
    first = [rows[i] for i in epoch_order(len(rows), cfg.seed, 1001, 0)[:4]]
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    control0 = PeftModel.from_pretrained(base, rd.control(0) / "adapter")
    logps, counts = score(control0, [r.prompt_ids for r in first], [r.response_ids for r in first],
                          run.tokenizer.pad_token_id, 4)
    del run  # (it holds the run directory's lock)
    assert read_jsonl(rd.control(1) / "train_log.jsonl")[0]["loss"] == pytest.approx(-sum(logps) / sum(counts),
                                                                                     abs=1e-4)
    # Evaluated on the same validation and test rows as the iterations.
    evaluated = read_json(rd.control(1) / "eval.json")
    assert set(evaluated["val_rows"]) == set(read_json(rd.iteration(1) / "eval.json")["val_rows"])
    assert set(evaluated["test_rows"]) == set(read_json(rd.iteration(1) / "eval.json")["test_rows"])

    # The choice, on the validation rows: SFT continued beat SPIN's choice, and the run's last line says so.
    assert rd.best_iteration() >= 0  # SPIN's own choice, by the stop rule (its semantics unchanged)
    assert rd.chosen_model() == "control 0"
    # (the verdict, why, and last what to do: the export command)
    assert logs[-1].splitlines()[-3].startswith("SFT continued beat every SPIN iteration on your validation rows: "
                                                "control 0 (2 steps) over SPIN iteration")
    assert logs[-1].splitlines()[-1].startswith("next: export the chosen model: spin-lite export")
    table = format_table(rd, cfg).splitlines()
    assert [line.split("|")[0].strip() for line in table[4:8]] == ["iter 0", "iter 1", "control 0", "control 1"]
    assert table[6].rstrip().endswith("best") and "chosen on the validation rows: SFT continued, control 0 (decided by val logp/tok)" in table
    assert read_json(rd.root / "summary.json")["chosen"] == "control 0"

    # Export: "best" is the control that won; "control" and "control-N" by name.
    best = export_adapter(rd.root, "best", tmp_path / "best")
    assert json.loads((best / "spin_lite_export.json").read_text())["iteration"] == "control 0"
    control0_weights = load_file(rd.control(0) / "adapter" / "adapter_model.safetensors")
    for name, tensor in load_file(best / "adapter_model.safetensors").items():
        assert torch.equal(tensor, control0_weights[name])
    from spin_lite.cli import main
    assert main(["export", str(rd.root), "--iteration", "control-1", "--out", str(tmp_path / "c1")]) == 0
    assert "control 1, SFT continued" in capsys.readouterr().out
    assert (tmp_path / "c1" / "adapter_model.safetensors").read_bytes() == \
        (rd.control(1) / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["table", str(rd.root)]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-3].startswith("SFT continued beat every SPIN iteration")
    assert printed[-2].startswith("why: SFT continued raised the starting model by +")
    assert printed[-1].startswith(f"next: export the chosen model: spin-lite export {rd.root} --iteration control-0")

    # The app, in a workspace holding the run and the model: the Run tab's table, the Compare tab's models.
    from spin_lite.app import chat, views
    ws, run_dir = tmp_path.parent, f"{tmp_path.name}/run"
    assert [r["model"] for r in views.results_rows(ws, run_dir)] == ["start", "iter 0", "iter 1", "control 0", "control 1"]
    choices, opened = views.model_menus(ws, run_dir)["compare"]
    assert opened == "control 0" and {("control 0 (chosen)", "control 0"), ("control 1", "control 1")} <= set(choices)
    model, _ = chat.chat_model(ws, run_dir, "control 1")
    for name, tensor in load_file(rd.control(1) / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(model.get_parameter(name.replace(".weight", ".default.weight")), tensor)
    assert "control 1" in views.sample_sets(ws, run_dir)

    # A control is a stage like any: one killed after its adapter was saved is only evaluated again.
    trained = tree_digest(rd.control(1) / "adapter")
    (rd.control(1) / "summary.json").unlink()
    (rd.control(1) / "eval.json").unlink()
    SpinRun(cfg, log=lambda *a: None).run()
    assert tree_digest(rd.control(1) / "adapter") == trained and rd.chosen_model() == "control 0"
    assert len(read_jsonl(rd.control(1) / "train_log.jsonl")) == 4


def test_without_the_control_spin_is_chosen(tiny_config):
    """The same run without the control arm chooses among the start and the iterations only."""
    cfg = tiny_config(**{"sft.control": "false", "sft.learning_rate": 1e-2, "train.learning_rate": 1e-4})
    SpinRun(cfg, log=lambda *a: None).run()
    rd = RunDir(cfg.run_dir)
    assert rd.chosen_model() == f"iter {rd.best_iteration()}" and not rd.control(0).exists()


def test_the_last_line_names_the_winner_and_the_gap():
    val = lambda logp, task: {"logp_per_token": logp, "task_accuracy": task}
    steps = {"iter 1": 24, "control 1": 24, "control 0": 12}
    better = type("Verdict", (), {"better": True})
    assert versus_line("iter 1", "control 1", better, val(-2.00, 0.50), val(-2.04, 0.44), steps) == (
        "SPIN iteration 1 (24 steps) beat SFT continued (control 1, 24 steps) by +0.040 val logp/tok, "
        "+0.06 val task acc on your validation rows; it is chosen.")
    assert versus_line("control 0", "iter 1", better, val(-1.90, 0.5), val(-2.00, 0.5), steps) == (
        "SFT continued beat every SPIN iteration on your validation rows: control 0 (12 steps) over SPIN iteration 1 "
        "(24 steps), by +0.100 val logp/tok, +0.00 val task acc.")
    assert versus_line("start", None, None, val(-2.0, 0.5), None, {}).startswith(
        "Neither SPIN nor SFT continued beat the starting model")


def test_the_control_continues_sft_at_the_rate_the_starting_model_was_made_at():
    """Without an SFT stage, a run that says its starting model's SFT rate (train.sft_learning_rate) gets a control
    at that rate, not at sft.learning_rate's default; with the stage, the stage's rate."""
    from types import SimpleNamespace

    from spin_lite.config import load_config
    from spin_lite.control import ControlArm
    rate = lambda *over: ControlArm(SimpleNamespace(cfg=load_config(None, list(over)))).sft_rate
    assert rate("sft.control=true", "train.sft_learning_rate=2e-5", "train.lr_ratio_to_sft=0.25") == 2e-5
    assert rate("sft.control=true") == 2e-4
    assert rate("sft.enabled=true", "sft.control=true", "sft.learning_rate=1e-4") == 1e-4


def test_the_matched_control_wins_where_the_arm_kept_the_start(tmp_path):
    """A hand-made run: SPIN's iteration 0 is clearly better than the start and chosen; control 0's own verdict
    against the start was recorded as not better (so the arm's choice is the start), yet on the validation rows it
    is clearly better than SPIN's choice. The final comparison, made against the control with SPIN's steps, picks it
    (it used to keep SPIN's choice and say the control "did not beat it")."""
    import json
    from types import SimpleNamespace

    from spin_lite.config import load_config
    from spin_lite.control import ControlArm
    from spin_lite.state import RunDir
    from test_paired_stop_rule import clear_gain, shifted, start_rows, write_model

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "sft.control=true"])
    rd = RunDir(cfg.run_dir)
    start = start_rows()
    spin, control = shifted(start, clear_gain), shifted(start, lambda k: 2 * clear_gain(k))
    write_model(rd.root / "eval-start.json", start, start=True)
    write_model(rd.iteration(0) / "eval.json", spin)
    (rd.iteration(0) / "summary.json").write_text(json.dumps({
        "iteration": 0, "train": {"steps": 4}, "selection": {"accepted": True, "better": True}}))
    write_model(rd.control(0) / "eval.json", control)
    selection = {"accepted": True, "better": False}  # as recorded, the arm kept the start
    (rd.control(0) / "summary.json").write_text(json.dumps({"control": 0, "selection": selection}))
    versus = ControlArm(SimpleNamespace(cfg=cfg, dir=rd)).versus(0, selection)
    assert versus["spin"] == "iter 0" and versus["control"] == "start"
    assert versus["winner"] == "control 0" and versus["against"] == "iter 0"
    assert versus["line"].startswith("SFT continued beat every SPIN iteration")


def test_a_won_control_says_the_starting_model_is_still_learning(tmp_path):
    """Where SFT continued won, the next steps say by how much it raised the starting model, and how to give SPIN a
    starting model that more SFT no longer improves: a longer SFT stage, in a new run directory."""
    import json

    from spin_lite.config import load_config
    from spin_lite.report import still_learning
    from spin_lite.state import RunDir

    rd = RunDir(tmp_path / "run")
    rd.control(0).mkdir(parents=True)
    (rd.root / "eval-start.json").write_text(json.dumps({"val": {"logp_per_token": -2.0, "task_accuracy": 0.25}}))
    (rd.control(0) / "eval.json").write_text(json.dumps({"val": {"logp_per_token": -1.5, "task_accuracy": 0.5}}))
    line = still_learning(rd, "control 0", load_config(None, ["sft.enabled=true", "sft.epochs=3"]))
    assert line.startswith("why: SFT continued raised the starting model by +0.500 val logp/tok, +0.25 val task acc:")
    assert line.endswith(f"spin-lite run {rd.config_path} sft.epochs=6 run_dir={rd.root}-epochs6")
    assert still_learning(rd, "control 0", load_config(None, ["model.adapter=sft-out"])).endswith(
        "train your SFT adapter (sft-out) longer and compare again")


def test_a_control_at_spins_own_rate_beside_the_sft_rate_one(tiny_config):
    """sft.control_rates [sft, spin]: each iteration gets two controls, matched step for step and on the same data
    order, one at sft.learning_rate (control-NN/) and one at SPIN's own rate, train.learning_rate (control-spin-NN/);
    both are judged, shown in the table and can be chosen; the export takes "control-spin N" by name."""
    cfg = tiny_config(iterations=2, **{"sft.enabled": "true", "sft.steps": 2, "sft.learning_rate": 3e-3,
                                       "sft.control": "true", "sft.control_rates": "[sft, spin]",
                                       "train.learning_rate": 1e-3})
    SpinRun(cfg, log=lambda *a: None).run()
    rd = RunDir(cfg.run_dir)
    for t in range(2):
        sft_arm, spin_arm = read_json(rd.control(t) / "summary.json"), read_json(rd.control(t, "spin") / "summary.json")
        assert (sft_arm["arm"], sft_arm["learning_rate"]) == ("sft", 3e-3)
        assert (spin_arm["arm"], spin_arm["learning_rate"]) == ("spin", 1e-3)
        assert sft_arm["cumulative_steps"] == spin_arm["cumulative_steps"] == sum(
            s["train"]["steps"] for s in rd.summaries()[:t + 1])
        peak = lambda arm: max(r["lr"] for r in read_jsonl(rd.control(t, arm) / "train_log.jsonl"))
        assert peak("sft") == pytest.approx(3e-3) and peak("spin") == pytest.approx(1e-3)
        assert spin_arm["versus"]["control"].startswith(("control-spin", "start"))
    models = [r["model"] for r in rd.results_table(cfg)]
    assert models[-4:] == ["control 0", "control 1", "control-spin 0", "control-spin 1"]
    table = format_table(rd, cfg)
    assert "control-spin N: the same at SPIN's own learning rate" in table
    assert len(rd.final_comparisons()) == 2 and rd.chosen_model() in ["start", "iter 0", "iter 1", "control 0",
                                                                      "control 1", "control-spin 0", "control-spin 1"]
    assert rd.resolve_model("control-spin 1") == "control-spin 1" and rd.resolve_model("control-spin-0") == \
        "control-spin 0"
    assert rd.adapters_of("control-spin 1", cfg) == [str(rd.control(1, "spin") / "adapter")]
    out = export_adapter(cfg.run_dir, "control-spin 1", rd.root.parent / "exported")
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(
        rd.control(1, "spin") / "adapter" / "adapter_model.safetensors").keys()
    # the app: the arm's models in the menus, its samples in Inspect
    from spin_lite.app import views
    ws, run_dir = rd.root.parent.parent, f"{rd.root.parent.name}/{rd.root.name}"
    values = [v for _, v in views.model_menus(ws, run_dir)["compare"][0]]
    assert {"control 1", "control-spin 0", "control-spin 1"} <= set(values)
    assert "control-spin 1" in views.sample_sets(ws, run_dir) and views.samples(ws, run_dir, "control-spin 1")
    assert views.folder_of(rd, "control-spin 1") == rd.control(1, "spin")
