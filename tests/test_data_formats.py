"""Data formats (spin_lite.data.parse_row / read_rows): chat, ShareGPT, Alpaca and prompt/response rows, detected
from their columns or named by data.format; a missing column reported once with its count and the setting that
maps it; a lone surrogate a listed bad row; the data shipped in the package; path errors that say where they looked.
No model is loaded: the real SmolLM2 tokenizer only."""
from __future__ import annotations

import csv
import json

import pytest

from spin_lite.config import DataConfig, load_config
from spin_lite.data import DataError, Example, local_file, parse_row, prepare, read_rows

from conftest import DEMO_DATA, REPO, tiny_settings

USER, ASSISTANT = "What is the capital of France?", "Paris."
EXPECTED = Example(0, [{"role": "user", "content": USER}], ASSISTANT)
ROWS = {
    "chat": {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ASSISTANT}]},
    "alpaca": {"instruction": USER, "input": "", "output": ASSISTANT},
    "prompt_response": {"prompt": USER, "response": ASSISTANT},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_detected_and_named(fmt):
    row = ROWS[fmt]
    assert parse_row(row, 0, DataConfig()) == EXPECTED
    assert parse_row(row, 0, DataConfig(format=fmt)) == EXPECTED
    others = [f for f in ROWS if f != fmt and {fmt, f} != {"chat", "sharegpt"}]
    for other in others:  # a named format reads its own columns only, and says which ones the row has
        with pytest.raises(ValueError, match=rf"missing field .*columns: .*data.format=auto reads these columns as {fmt}"):
            parse_row(row, 0, DataConfig(format=other))


def test_sharegpt_roles_and_system_turns():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}, {"from": "human", "value": USER},
                             {"from": "gpt", "value": ASSISTANT}]}
    ex = parse_row(row, 3, DataConfig())
    assert ex.row == 3 and ex.response == ASSISTANT
    assert [m["role"] for m in ex.prompt] == ["system", "user", "assistant", "user"]
    assert ex.prompt[2]["content"] == "Hello."
    # {from, value} turns in the `messages` column are read too
    assert parse_row({"messages": row["conversations"]}, 3, DataConfig()) == ex


def test_alpaca_input_kept_and_system_prompt():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    ex = parse_row(row, 0, DataConfig(system_prompt="You translate."))
    assert ex.prompt == [{"role": "system", "content": "You translate."},
                         {"role": "user", "content": "Translate to French.\n\nGood morning"}]
    assert ex.response == "Bonjour"
    assert parse_row({"instruction": "Say hi.", "output": "Hi"}, 0, DataConfig()).prompt[-1]["content"] == "Say hi."


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as Excel saves it
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_alpaca_csv_keeps_input_in_the_prompt(tokenizer, tmp_path):
    data = _write_csv(tmp_path / "alpaca.csv", ["instruction", "input", "output"],
                      [["Add the numbers.", f"{k} and {k + 1}", f"{2 * k + 1}"] for k in range(12)]
                      + [["Name a colour.", "", "Blue."]])
    rows = read_rows(str(data))
    assert list(rows[0]) == ["instruction", "input", "output"]  # the byte-order mark is not part of a column name
    encoded, report = prepare(rows, tokenizer, DataConfig(max_length=160, max_prompt_length=96), str(data))
    assert len(encoded) == 13 and not report.skipped
    prompt = tokenizer.decode(encoded[5].prompt_ids)
    assert "Add the numbers.\n\n5 and 6" in prompt
    assert tokenizer.decode(encoded[5].response_ids).startswith("11")
    assert "Name a colour.<|im_end|>" in tokenizer.decode(encoded[12].prompt_ids)  # an empty input adds nothing


def test_missing_column_reported_once_with_its_count(tokenizer, tmp_path):
    data = _write_csv(tmp_path / "qa.csv", ["question", "answer"], [[f"q{k}?", f"a{k}."] for k in range(12)])
    with pytest.raises(DataError) as e:
        prepare(read_rows(str(data)), tokenizer, DataConfig(), str(data))
    message = str(e.value)
    print(message)
    assert message.count("\n  - ") == 1, "one line for the twelve rows that share the problem"
    assert f"12 bad row(s) in {data}, every row it has (data.skip_bad_rows would leave none" in message
    assert "set data.skip_bad_rows=true" not in message, "skipping every row is no advice"
    assert "rows 0, 1, 2, 3, 4 ... (12 rows)" in message
    assert "'question', 'answer'" in message
    assert "data.prompt_field=question data.response_field=answer" in message
    # with that mapping every row reads
    cfg = DataConfig(prompt_field="question", response_field="answer")
    assert len(prepare(read_rows(str(data)), tokenizer, cfg, str(data))[0]) == 12
    # an Alpaca file read as prompt/response: the message names alpaca and the mapping settings
    alpaca = _write_csv(tmp_path / "a.csv", ["instruction", "input", "output"], [["i", "x", "o"]] * 3)
    with pytest.raises(DataError, match=r"rows 0, 1, 2 \(3 rows\): missing field 'prompt' \(columns: 'instruction', "
                                        r"'input', 'output'; data.format=auto reads these columns as alpaca"):
        prepare(read_rows(str(alpaca)), tokenizer, DataConfig(format="prompt_response"), str(alpaca))


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": 7}]},
     "field 'conversations[1].value' must be a string, got int"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": ASSISTANT}]},
     "field 'conversations[0].value' is null; it must hold text"),
    ({"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": "  "}]},
     "field 'messages[1].content' is empty"),
    ({"instruction": USER, "input": "", "output": None}, "field 'output' is null; it must hold text"),
    ({"instruction": USER, "input": 7, "output": ASSISTANT}, "field 'input' must be a string, got int"),
    ({"instruction": USER, "input": 7, "output": None},
     "field 'output' is null; it must hold text; field 'input' must be a string, got int"),
    ({"prompt": None, "response": ASSISTANT}, "field 'prompt' is null; it must hold text"),
])
def test_bad_fields_named_by_the_files_own_keys(row, message):
    """A ShareGPT turn's text is its `value`, not the `content` it becomes; a null field is null, not missing
    (its column is there); every bad field of a single-turn row is named at once."""
    with pytest.raises(ValueError) as e:
        parse_row(row, 0, DataConfig())
    assert str(e.value) == message


def test_some_bad_rows_suggest_skipping(tokenizer, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [ROWS["alpaca"], {"instruction": USER, "output": None}]))
    with pytest.raises(DataError, match=rf"^1 bad row\(s\) in {data} \(set data.skip_bad_rows=true to skip them\):\n"
                                        rf"  - {data} row 1: field 'output' is null; it must hold text$"):
        prepare(read_rows(str(data)), tokenizer, DataConfig(), str(data))


def test_lone_surrogate_is_a_listed_bad_row(tokenizer, tmp_path):
    good = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:3]]
    data = tmp_path / "s.jsonl"
    # a JSON escape of half a surrogate pair: valid JSON, but no tokenizer can encode the string
    data.write_text("".join(json.dumps(r) + "\n" for r in good)
                    + '{"prompt": "Hi \\ud800 there", "response": "Hello."}\n'
                    + '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\\udfff"}]}\n')
    cfg = DataConfig(max_length=160, max_prompt_length=96)
    with pytest.raises(DataError) as e:
        prepare(read_rows(str(data)), tokenizer, cfg, str(data))
    message = str(e.value)
    assert f"{data} row 3: field 'prompt' is not valid Unicode text" in message
    assert f"{data} row 4: field 'messages[1].content' is not valid Unicode text" in message
    encoded, report = prepare(read_rows(str(data)), tokenizer, DataConfig(max_length=160, max_prompt_length=96,
                                                                          skip_bad_rows=True), str(data))
    assert len(encoded) == 3 and len(report.skipped) == 2


def test_lone_surrogate_through_the_cli(tiny_model_dir, tmp_path, capsys):
    from spin_lite.cli import main

    data = tmp_path / "s.jsonl"
    rows = DEMO_DATA.read_text().splitlines()[:20]
    data.write_text("\n".join(rows[:5] + ['{"prompt": "\\ud83d", "response": "ok"}'] + rows[5:]) + "\n")
    assert main(["run", *tiny_settings(tiny_model_dir, tmp_path / "run", **{"data.path": data})]) == 2
    err = capsys.readouterr().err
    assert f"{data} row 5: field 'prompt' is not valid Unicode text" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bundled_sample_works_from_any_folder(tmp_path, monkeypatch):
    assert DataConfig().path == "sample:demo"
    sample = local_file("sample:demo")
    assert sample.read_bytes() == DEMO_DATA.read_bytes(), "the packaged sample and examples/data must agree"
    monkeypatch.chdir(tmp_path)
    assert read_rows("sample:demo") == read_rows(str(DEMO_DATA))
    with pytest.raises(DataError, match="unknown sample data 'sample:nope'; the samples are: sample:demo"):
        read_rows("sample:nope")
    cfg = load_config(None, [])
    assert cfg.data.path == "sample:demo"


def test_path_errors_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_rows("data/mine.jsonl")
    assert str(e.value) == (f"data file data/mine.jsonl does not exist (looked for {tmp_path}/data/mine.jsonl: "
                            f"relative paths are taken from the working directory {tmp_path})")
    with pytest.raises(DataError, match=f"does not exist \\(looked for {tmp_path}/abs.csv\\)$"):
        read_rows(str(tmp_path / "abs.csv"))


def test_cli_from_another_folder_names_the_folder(tmp_path, monkeypatch):
    """The issue's case: `cd /tmp && spin-lite run /path/to/examples/configs/demo.yaml`."""
    from conftest import cli

    out = cli("run", REPO / "examples" / "configs" / "demo.yaml", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert (f"looked for {tmp_path}/examples/data/demo_sft.jsonl: relative paths are taken from the working "
            f"directory {tmp_path}") in out.stderr
    assert "Traceback" not in out.stderr


def test_hub_split_expressions_compose_with_max_examples(monkeypatch):
    """`split: train_sft[:2200]` plus a limit used to become train_sft[:2200][:2200], which datasets refuses."""
    import datasets

    asked = []

    def fake_load(path, split):
        asked.append(split)
        datasets.ReadInstruction.from_spec(split)  # what datasets itself does with it
        return datasets.Dataset.from_list([{"prompt": f"p{k}", "response": f"r{k}"} for k in range(30)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(read_rows("someone/data", "train_sft[:30]", 22)) == 22
    assert len(read_rows("someone/data", "train_sft", None)) == 30
    assert asked == ["train_sft[:30]", "train_sft"]
    with pytest.raises(DataError, match=r"data split 'train_sft\[:2200\]\[:10\]' of someone/data is not a split"):
        read_rows("someone/data", "train_sft[:2200][:10]")


def test_model_and_run_dir_path_errors_say_where_they_looked(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from spin_lite.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # "adapters/a" could be a hub id
    assert main(["run", "model.name=./models/mine", "run_dir=runs/x"]) == 2
    err = capsys.readouterr().err
    assert f"no such folder: {tmp_path}/models/mine (relative to the working directory {tmp_path})" in err
    assert main(["run", "model.adapter=adapters/a", "run_dir=runs/x"]) == 2
    assert f"no such folder {tmp_path}/adapters/a (relative to the working directory {tmp_path})" in capsys.readouterr().err
    assert main(["export", "runs/old", "--out", "exports/x"]) == 2
    assert (f"runs/old is not a run directory (no config.yaml; looked for {tmp_path}/runs/old: relative paths are "
            f"taken from the working directory {tmp_path})") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_prompts_shared_between_splits_are_refused_by_name(tokenizer, tmp_path):
    """12 rows with distinct prompts, and a test file whose second row repeats training prompt 'q7': the run's rows
    are refused, naming both places; allow_shared_prompts=true accepts them. A prompt repeated inside the training
    rows alone is no leak and passes."""
    from spin_lite.data import load_splits
    rows = [{"prompt": f"q{k}", "response": f"a{k}"} for k in range(12)] + [{"prompt": "q3", "response": "again"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "test.jsonl"
    held.write_text(json.dumps({"prompt": "fresh", "response": "x"}) + "\n" + json.dumps({"prompt": "q7",
                                                                                          "response": "y"}) + "\n")
    cfg = DataConfig(path=str(train), eval_path=str(held), eval_size=2, val_size=0)
    with pytest.raises(DataError) as e:
        load_splits(cfg, tokenizer, seed=0)
    assert "1 prompt(s) are in more than one of the training, validation and test rows" in str(e.value)
    assert "train row 7 and test row 1" in str(e.value) and "data.allow_shared_prompts=true" in str(e.value)
    cfg.allow_shared_prompts = True
    assert len(load_splits(cfg, tokenizer, seed=0).test) == 2
    cfg = DataConfig(path=str(train), eval_size=0, val_size=0)  # q3 twice, both training rows: fine
    assert len(load_splits(cfg, tokenizer, seed=0).train) == 13
