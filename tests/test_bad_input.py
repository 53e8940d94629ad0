"""Bad input: a clear message naming the row and the field, before any model is loaded, and an existing
run directory left exactly as it was."""
import json

import pytest

from spin_lite.cli import main
from spin_lite.config import load_config

from conftest import DEMO_DATA, cli, tiny_settings, tree_digest

GOOD = [json.loads(l) for l in DEMO_DATA.read_text().splitlines()[:16]]
CASES = {
    "missing field": ({"prompt": "What is 2 + 2?"}, "row 3: missing field 'response'"),
    "empty response": ({"prompt": "What is 2 + 2?", "response": "   "}, "row 3: field 'response' is empty"),
    "non-string response": ({"prompt": "What is 2 + 2?", "response": 4},
                            "row 3: field 'response' must be a string, got int"),
    "chat without assistant": ({"messages": [{"role": "user", "content": "hi"}]},
                               "row 3: field 'messages' has no assistant message"),
    "prompt longer than the limit": ({"prompt": "word " * 400, "response": "ok"},
                                     "row 3: prompt is 4"),  # 4xx tokens; max_length is 160
}


def write_rows(path, bad_row):
    rows = GOOD[:3] + [bad_row] + GOOD[3:]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A completed one-iteration run whose data file a user then edits."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data.jsonl"
    write_rows(data, GOOD[-1])
    settings = tiny_settings(tiny_model_dir, root / "run", iterations=1, **{"data.path": data,
                                                                           "eval.enabled": "false"})
    assert main(["run", *settings]) == 0
    return root, data, settings


@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_message_and_run_dir_untouched(finished_run, capsys, case):
    root, data, settings = finished_run
    saved = data.read_text()
    before = tree_digest(root / "run")
    bad_row, message = CASES[case]
    try:
        write_rows(data, bad_row)
        capsys.readouterr()
        assert main(["run", *settings]) == 2
        err = capsys.readouterr().err
        assert f"{data} {message}" in err
        assert "Traceback" not in err
        assert tree_digest(root / "run") == before
    finally:
        data.write_text(saved)


def test_bad_rows_skipped_and_counted_when_asked(tiny_model_dir, tokenizer, tmp_path):
    from spin_lite.data import load_splits
    data = tmp_path / "data.jsonl"
    rows = GOOD + [CASES[c][0] for c in CASES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run",
                                          **{"data.path": data, "data.skip_bad_rows": "true",
                                             "data.max_examples": "null"}))
    splits = load_splits(cfg.data, tokenizer, cfg.seed)
    assert len(splits.report.skipped) == 5
    assert len(splits.train) + len(splits.val) + len(splits.test) == 16
    assert "row 16: missing field 'response'" in splits.report.skipped[0]


def test_all_bad_rows_listed_at_once(tiny_model_dir, tokenizer, tmp_path):
    from spin_lite.data import DataError, load_splits
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD + [CASES[c][0] for c in CASES]))
    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run",
                                          **{"data.path": data, "data.max_examples": "null"}))
    with pytest.raises(DataError) as e:
        load_splits(cfg.data, tokenizer, cfg.seed)
    assert "5 bad row(s)" in str(e.value)
    for k in range(16, 21):
        assert f"row {k}:" in str(e.value)


def test_unreadable_and_missing_files(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    for path, message in [(broken, f"{broken} line 2 is not valid JSON"),
                          (tmp_path / "nope.jsonl", f"data file {tmp_path / 'nope.jsonl'} does not exist")]:
        assert main(["run", *tiny_settings(tiny_model_dir, tmp_path / "run", **{"data.path": path})]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_errors_all_reported_without_traceback(tmp_path):
    out = cli("run", "train.beta=-1", "generation.top_p=2", "trian.epochs=1", "train.stop_patience=0",
              f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2
    for text in ("train.beta must be a positive number", "generation.top_p must be in (0, 1]",
                 "unknown setting trian", "train.stop_patience must be an integer >= 1, got 0"):
        assert text in out.stderr
    assert "Traceback" not in out.stderr


def test_duplicate_yaml_keys_refused_by_name(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys; a config that sets one twice is refused with the file, the key
    and both lines. A YAML merge key (`<<: *base`) may still be overridden."""
    config = tmp_path / "c.yaml"
    config.write_text("iterations: 1\ntrain:\n  beta: 0.1\n  epochs: 1\n  beta: 5.0\n")
    assert main(["run", str(config), f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert (f"config file {config} sets 'beta' twice, at line 3 and line 5 (YAML would keep only the last one)"
            in err) and "Traceback" not in err
    config.write_text("train:\n  beta: 0.1\ngeneration: {top_p: 1.0}\ntrain:\n  epochs: 2\n")
    with pytest.raises(ValueError, match="sets 'train' twice, at line 1 and line 4"):
        load_config(config)
    config.write_text("sft: &base {epochs: 1, learning_rate: 0.001}\ntrain:\n  <<: *base\n  epochs: 3\n")
    cfg = load_config(config)
    assert (cfg.sft.epochs, cfg.train.epochs, cfg.train.learning_rate) == (1, 3, 0.001)
    assert not (tmp_path / "run").exists()


def test_changed_config_refused_on_existing_run(finished_run, capsys):
    root, data, settings = finished_run
    before = tree_digest(root / "run")
    assert main(["run", *settings, "train.beta=0.5"]) == 2
    assert "was started with a different config; changed: train.beta (0.1 -> 0.5)" in capsys.readouterr().err
    assert tree_digest(root / "run") == before


def test_every_shipped_config_parses():
    from conftest import REPO
    configs = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["run", f"model.name={missing}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "could not load the tokenizer of model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_split_name_as_eval_path_of_a_local_file(tiny_model_dir, tokenizer, tmp_path):
    """A split name only means something for a hub dataset; with a local file it would hold out training rows."""
    from spin_lite.data import DataError, load_splits
    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run", **{"data.eval_path": "test_sft"}))
    with pytest.raises(DataError, match="names a split, but data.path .* is a local file"):
        load_splits(cfg.data, tokenizer, cfg.seed)
