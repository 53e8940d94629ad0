"""Every shipped config parses, and its data spec can be read, offline: local files exist (relative paths are
taken from the working directory, here the repository root, as `spin-lite run examples/configs/...` runs there),
and a hub dataset's split and held-out splits are split expressions datasets accepts (datasets.ReadInstruction,
what load_dataset parses them with). The GPU experiment configs once asked for `train_sft[:2200][:2200]`."""
from __future__ import annotations

import pytest

from spin_lite.config import load_config
from spin_lite.data import LOCAL_SUFFIXES, local_file, read_rows

from conftest import REPO

CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_and_its_data_spec(path, monkeypatch):
    import datasets

    monkeypatch.chdir(REPO)
    data = load_config(path).data
    local = local_file(data.path)
    if local is not None:
        assert local.is_file(), f"{path.name}: data.path {data.path} does not exist in the repository"
    else:
        datasets.ReadInstruction.from_spec(data.split)  # raises ValueError on a bad expression
        # and the call spin_lite makes with it, with the row limit that load_splits adds
        asked = []

        def load_dataset(name, split):
            asked.append(split)
            datasets.ReadInstruction.from_spec(split)
            return datasets.Dataset.from_list([{"prompt": "p", "response": "r"}] * 3000)

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        limit = data.max_examples and data.max_examples + data.eval_size + data.val_size
        assert len(read_rows(data.path, data.split, limit)) == (limit or 3000)
        assert asked == [data.split]
    for setting, held_out in (("eval_path", data.eval_path), ("val_path", data.val_path)):
        if held_out is None:
            continue
        if held_out.startswith("sample:") or held_out.lower().endswith(LOCAL_SUFFIXES):
            assert local_file(held_out).is_file(), f"{path.name}: data.{setting} {held_out} does not exist"
        else:
            assert local is None, f"{path.name}: data.{setting} names a split of a local file"
            datasets.ReadInstruction.from_spec(held_out)
