"""Run records (spin_lite.records): every JSON file of a run directory is read through its typed record, so that a
damaged file is a named refusal (the file, the field, what was expected) in `spin-lite table`, `spin-lite export` and
the app's views, never a traceback or a silently empty menu, and a choice recorded on disk is checked against the
models the run has.

The red team's corruptions of issue 27 (13 of 37 single-file corruptions gave `table` a traceback, 6 of 12 gave one to
`export`) are replayed here on every JSON file of one finished tiny run: an SFT stage, one SPIN iteration and its
control (the module's fixture, about 15 s on 2 cores).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, cli, tiny_settings
from spin_lite import records
from spin_lite.app import processes, views
from spin_lite.app.workspace import AppError, user_message
from spin_lite.cli import main
from spin_lite.config import load_config
from spin_lite.records import RunRecordError
from spin_lite.report import format_table
from spin_lite.run import SpinRun
from spin_lite.state import RunDir

# Every JSON file a finished run with an SFT stage and both control arms holds (pairs.jsonl and generations.jsonl: the
# engine's own token ids, read by it alone), each with the record it is read through.
RUN_FILES = ["state.json", "progress.json", "summary.json", "eval-base.json", "eval-start.json", "proto.jsonl",
             "sft/summary.json", "sft/train_log.jsonl", "iter-00/summary.json", "iter-00/eval.json",
             "iter-00/train_metrics.json", "iter-00/samples.jsonl", "iter-00/train_log.jsonl",
             *(f"{arm}-00/{name}" for arm in ("control", "control-spin")
               for name in ("summary.json", "eval.json", "samples.jsonl", "train_log.jsonl"))]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished run (SFT stage, iteration 0, control 0 at the SFT rate and at SPIN's) and what it logged."""
    root = tmp_path_factory.mktemp("records") / "run"
    cfg = load_config(None, tiny_settings(tiny_model_dir, root, iterations=1,
                                          **{"sft.enabled": "true", "sft.steps": 2, "sft.control": "true",
                                             "sft.control_rates": "[sft, spin]"}))
    logs = []
    SpinRun(cfg, log=logs.append).run()
    return root, logs


@pytest.fixture
def copy(finished, tmp_path):
    """A fresh copy of the finished run, in a workspace of its own (tmp_path/run)."""
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def quick_tokenizer(monkeypatch, tiny_model_dir):
    """The export's tokenizer loaded once for the module's many exports (what is tested is what they read first)."""
    from spin_lite import model
    from spin_lite.config import ModelConfig

    tokenizer = model.load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    monkeypatch.setattr(model, "load_tokenizer", lambda *args, **kwargs: tokenizer)


def test_every_file_of_a_run_has_a_record_and_reads(finished):
    """The finished run's JSON files are the list above, each with its record, and all read; so do the runs kept from
    round 3 (docs/results/round3/runs: made by earlier versions, trimmed of their adapters)."""
    root = finished[0]
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.json*") if "adapter" not in p.parts
                   and p.name not in ("pairs.jsonl", "generations.jsonl"))
    assert found == sorted(RUN_FILES)
    kept = [p for p in (REPO / "docs" / "results" / "round3" / "runs").rglob("*.json*")]
    assert len(kept) > 500
    for path in [root / f for f in RUN_FILES] + [root / "iter-00" / "pairs.jsonl"] + kept:
        assert path.suffix == ".jsonl" or records.record_of(path) is not None, path
        records.read_records(path) if path.suffix == ".jsonl" else records.read_record(path)


def corruptions(path: Path) -> dict[str, str]:
    """The red team's single-file corruptions: not JSON, a list, an empty object, every field of the wrong type."""
    lines = path.read_text().splitlines()
    if path.suffix == ".jsonl":
        first = json.loads(lines[0])
        return {"garbage line": "\n".join(lines + ["{not json"]), "list line": "\n".join(["[1]"] + lines),
                "wrong types": "\n".join([json.dumps({k: ["x"] for k in first})] + lines[1:])}
    data = json.loads(path.read_text())
    return {"garbage": "{not json", "list": "[1]", "empty object": "{}",
            "wrong types": json.dumps({k: ["x"] for k in data})}


def refused_by_name(code: int, err: str, path: Path) -> bool:
    """A clean answer: done (0), or refused (2) with a message naming the file and what was expected."""
    return code == 0 or (code == 2 and err.startswith("error: ") and str(path) in err and "expected" in err)


@pytest.mark.parametrize("name", RUN_FILES)
def test_corrupted_files_are_refused_by_name_in_table_export_and_the_app(finished, tmp_path, quick_tokenizer, capsys,
                                                                         name):
    source = finished[0]
    for kind, text in corruptions(source / name).items():
        ws = tmp_path / kind.replace(" ", "-")
        run = ws / "run"
        shutil.copytree(source, run)
        (run / name).write_text(text)
        answers = {}
        for command in (["table", str(run)], ["export", str(run), "--out", str(ws / "out")]):
            code = main(command)  # an exception here is the traceback the red team saw
            out, err = capsys.readouterr()
            assert "Traceback" not in out + err
            assert refused_by_name(code, err, run / name), (name, kind, command[0], code, err[-600:])
            assert code == 2 or command[0] == "export" or out.startswith("SPIN results for")
            answers[command[0]] = code
        if name in ("iter-00/summary.json", "control-00/summary.json", "control-spin-00/summary.json") \
                and kind != "empty object":
            assert answers == {"table": 2, "export": 2}, (name, kind)  # both read it: both refuse it
        # the app: the overview lists the run (named as unreadable), every view answers or refuses by name
        overview = views.runs_overview(ws)
        assert [r["run_dir"] for r in overview] == ["run"]
        assert not overview[0]["status"].startswith("unreadable") or str(run / name) in overview[0]["status"]
        for view in (processes.run_status, views.model_menus, views.results_rows, views.step_metrics, views.progress,
                     views.metrics_signature, lambda w, r: [views.samples(w, r, s) for s in views.sample_sets(w, r)],
                     lambda w, r: views.summary(w, r, "iter 0")):
            try:
                view(ws, "run")
            except (RunRecordError, AppError) as e:
                assert str(run / name) in user_message(e) and "expected" in user_message(e), (name, kind, view)


def test_a_forged_winner_is_refused_by_name(copy, quick_tokenizer, capsys):
    """A control summary whose final comparison names a model the run does not have ("control 99") is refused by
    name; it used to become the table's choice, with a `next:` command that argparse refused."""
    path = copy / "control-00" / "summary.json"
    summary = json.loads(path.read_text())
    summary["versus"] |= {"winner": "control 99", "spin": summary["versus"]["spin"]}
    path.write_text(json.dumps(summary))
    for command in (["table", str(copy)], ["export", str(copy), "--out", str(copy.parent / "out")]):
        assert main(command) == 2
        out, err = capsys.readouterr()
        assert (f"{path}: field versus.winner: expected one of this run's models (start, iter 0, control 0, "
                'control-spin 0), got "control 99"') in err
        assert "next:" not in out and not (copy.parent / "out").exists()
    with pytest.raises(RunRecordError, match="versus.winner"):
        views.model_menus(copy.parent, "run")
    # a stage folder's summary naming another number is refused too (it would choose a model with no folder)
    path.write_text(json.dumps(summary | {"versus": None}))
    (copy / "iter-00" / "summary.json").write_text(json.dumps(
        json.loads((copy / "iter-00" / "summary.json").read_text()) | {"iteration": 5}))
    with pytest.raises(RunRecordError, match="iter-00/summary.json: field iteration: expected 0, the number of its "
                                             "folder iter-00, got 5"):
        RunDir(copy).chosen_model()


def test_the_real_commands_refuse_without_a_traceback(copy, tmp_path):
    """The same through the real CLI, in processes of their own."""
    (copy / "iter-00" / "summary.json").write_text("{not json")
    table = cli("table", copy)
    assert table.returncode == 2 and "Traceback" not in table.stderr
    assert f"error: {copy / 'iter-00' / 'summary.json'}: expected JSON (" in table.stderr
    (copy / "iter-00" / "summary.json").write_text("[1]")
    export = cli("export", copy, "--out", tmp_path / "out")
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert f"{copy / 'iter-00' / 'summary.json'}: expected a JSON object" in export.stderr


def test_a_damaged_state_json_is_named_in_the_app_and_replaced_by_the_run(copy):
    """An uploaded state.json of [1] broke the Run tab for every run: the overview now names that run's file and
    lists the others as ever, and the run itself replaces the file (it is for display only)."""
    ws = copy.parent
    shutil.copytree(copy, ws / "other")
    (copy / "state.json").write_text("[1]")
    rows = {r["run_dir"]: r for r in views.runs_overview(ws)}
    assert rows["run"]["status"].startswith(f"unreadable: {copy / 'state.json'}: expected a JSON object")
    assert rows["other"]["status"] == "finished"
    with pytest.raises(RunRecordError) as refused:
        processes.run_status(ws, "run")
    assert user_message(refused.value).startswith(f"{copy / 'state.json'}: expected a JSON object")
    RunDir(copy).set_state(stage="done")
    assert RunDir(copy).state()["stage"] == "done"


def test_records_check_types_and_ranges():
    check = lambda record, data: records.check(record, data, Path("run/iter-00/summary.json"))
    with pytest.raises(RunRecordError, match=r"field train\.steps: expected a whole number, got \"6\""):
        check(records.IterationSummary, {"iteration": 0, "train": {"steps": "6"}})
    with pytest.raises(RunRecordError, match=r"field val\.ended_rate: expected a number <= 1, got 2"):
        check(records.IterationSummary, {"iteration": 0, "val": {"ended_rate": 2}})
    with pytest.raises(RunRecordError, match=r"field selection\.accepted: expected true or false, got 1"):
        check(records.IterationSummary, {"iteration": 0, "selection": {"accepted": 1}})
    with pytest.raises(RunRecordError, match=r"field iteration: expected a value \(the field is missing\)"):
        check(records.IterationSummary, {"train": {}})
    with pytest.raises(RunRecordError, match=r"field val\.logp_per_token: expected a finite number"):
        check(records.IterationSummary, {"iteration": 0, "val": {"logp_per_token": float("nan")}})
    # what earlier versions wrote, or a test writes by hand, reads: fields left out, fields added, an eval.json
    # holding the test metrics alone
    check(records.IterationSummary, {"iteration": 0, "selection": {"accepted": True}, "added_later": [1, 2]})
    assert check(records.Evaluation, {"logp_per_token": -2.0}).test.logp_per_token == -2.0


# -- runs without validation or test rows, and what the table says ----------------------------------------------------
def test_a_run_without_validation_and_test_rows_finishes_and_says_nothing_was_chosen(tiny_model_dir, tmp_path, capsys):
    """It used to fail with a TypeError at the results table on every rerun, and `spin-lite table` crashed."""
    settings = tiny_settings(tiny_model_dir, tmp_path / "run", iterations=1,
                             **{"data.val_size": 0, "data.eval_size": 0, "sft.enabled": "true", "sft.steps": 1})
    for _ in range(2):  # the run, then a rerun of the finished run
        assert main(["run", *settings]) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "no validation rows (data.val_size: 0, and no data.val_path): nothing chosen" in out
    assert out.rstrip().splitlines()[-1].startswith("next: export the last iteration (nothing chosen: see above)")


def test_the_table_says_why_nothing_was_chosen(copy):
    """"no validation rows" was said of a run that had them: evaluation off, or no iteration complete yet."""
    cfg = load_config(copy / "config.yaml")
    shutil.rmtree(copy / "control-00")
    (copy / "iter-00" / "summary.json").unlink()
    assert "nothing chosen yet: no iteration is complete (the starting model was evaluated on 4 validation rows)" \
        in format_table(RunDir(copy), cfg)
    cfg.eval.enabled = False
    assert "nothing chosen: evaluation is off (eval.enabled: false)" in format_table(RunDir(copy), cfg)


def test_the_last_line_is_the_next_step_and_the_verdict_is_said_once(finished):
    root, logs = finished
    table = format_table(RunDir(root), load_config(root / "config.yaml"))
    versus = json.loads((root / "control-00" / "summary.json").read_text())["versus"]["line"]
    assert table.splitlines()[-1].startswith("next: ") and table.count(versus) == 1
    assert "\n".join(map(str, logs)).count(versus) == 1  # the run's output: the table's line only


def test_a_starting_model_made_by_the_sft_stage_is_exported_when_no_iteration_beat_it(copy):
    """A rejected run's last line called the SFT stage's adapter "your starting adapter", with no export command."""
    cfg = load_config(copy / "config.yaml")
    shutil.rmtree(copy / "control-00")
    path = copy / "iter-00" / "summary.json"
    summary = json.loads(path.read_text())
    summary["selection"] |= {"accepted": False, "better": False, "reasons": ["val logp/tok got worse"]}
    path.write_text(json.dumps(summary))
    last = format_table(RunDir(copy), cfg).splitlines()[-1]
    assert last == ("next: export the chosen model, the SFT stage's (no iteration was better): spin-lite export "
                    f"{copy} --iteration start --out exports/run-start  (the adapter; --merged or --gguf q8_0: one "
                    "model file)")
    assert "your starting adapter" not in last


def test_a_summary_without_its_steps_is_a_named_error_where_the_control_matches_them(copy):
    """The control arms match each iteration's optimizer steps (RunDir.trained_steps): a summary of an older run
    without train.steps names the file and the field instead of raising a KeyError."""
    assert RunDir(copy).trained_steps(0) > 0
    path = copy / "iter-00" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["train"]["steps"]
    path.write_text(json.dumps(summary))
    with pytest.raises(RunRecordError, match=r"iter-00/summary.json: field train.steps: expected iteration 0's "
                                             r"optimizer steps"):
        RunDir(copy).trained_steps(0)
