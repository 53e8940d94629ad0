"""No data loss (issue 27): an export never removes anything it did not create, and the app's exports of two runs whose
names end alike never share a folder. (A kill between replace_dir's two renames, and recover_dir putting the old
folder back, is tested with real processes in test_resume.py.)"""
from __future__ import annotations

import json

import pytest

from conftest import REPO
from spin_lite.cli import main
from spin_lite.export import MARKER
from spin_lite.state import recover_dir, replace_dir


def hand_made_run(root, model_dir):
    """A run directory with one trained adapter, written by hand (no training): enough for an adapter export."""
    from spin_lite.config import load_config

    (root / "iter-00" / "adapter").mkdir(parents=True)
    (root / "iter-00" / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (root / "iter-00" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (root / "config.yaml").write_text(load_config(None, [f"run_dir={root}", f"model.name={model_dir}"]).to_yaml())
    return root


def test_an_export_leaves_a_folder_named_like_its_old_one_alone(tiny_model_dir, tmp_path, capsys):
    """`spin-lite export RUN --out X` deleted an unrelated folder X.old (replace_dir's fixed name for the export it
    replaced), and X.tmp-PID. Now both exports land, and every folder the user had is as it was."""
    run = hand_made_run(tmp_path / "run", tiny_model_dir)
    out = tmp_path / "exports" / "x"
    for name in ("x.old", "x.tmp", "x.old-1-abcdef01"):  # the last: even one shaped like replace_dir's own
        (out.parent / name).mkdir(parents=True)
        (out.parent / name / "mine.txt").write_text("keep me")
    for _ in range(2):  # a new export, then one replacing it
        assert main(["export", str(run), "--iteration", "0", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / MARKER).exists() and (out / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x", "x.old", "x.old-1-abcdef01", "x.tmp"]
    assert all((out.parent / n / "mine.txt").read_text() == "keep me" for n in ("x.old", "x.tmp", "x.old-1-abcdef01"))


def test_replace_dir_sets_the_old_folder_aside_under_a_name_of_its_own(tmp_path, monkeypatch):
    """Killed between its renames (here: the second rename fails), replace_dir leaves the old folder under a name of
    its own; recover_dir puts it back, and removes what a kill after the second rename left; a folder named like the
    old fixed name (TARGET.old) is never touched."""
    import os

    target, user = tmp_path / "checkpoint", tmp_path / "checkpoint.old"
    for folder, text in ((target, "old"), (user, "the user's")):
        folder.mkdir()
        (folder / "f").write_text(text)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    real_replace = os.replace

    def killed(*args):
        raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(tmp_path / "new", target)
    monkeypatch.setattr(os, "replace", real_replace)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint.old-")]
    assert not target.exists() and len(aside) == 1 and (aside[0] / "f").read_text() == "old"
    recover_dir(target)
    assert (target / "f").read_text() == "old" and not aside[0].exists()

    # killed after the second rename: the new folder in place, the old one still aside; recover_dir removes it
    os.rename(tmp_path / "new", tmp_path / "next")
    aside = tmp_path / "checkpoint.old-12-0123abcd"
    os.rename(target, aside)
    os.rename(tmp_path / "next", target)
    recover_dir(target)
    assert (target / "f").read_text() == "new" and not aside.exists()
    assert (user / "f").read_text() == "the user's"


def test_app_exports_of_runs_whose_names_end_alike_do_not_overwrite_each_other(tiny_model_dir, tmp_path):
    """runs/a/dup and runs/b/dup were both exported to exports/dup-iter-00-adapter, the second over the first."""
    import shutil

    from spin_lite.app import export as app_export

    shutil.copytree(tiny_model_dir, tmp_path / "model")  # (the run's model: inside the workspace, as the app asks)
    zips = []
    for parent in ("a", "b"):
        run = hand_made_run(tmp_path / "runs" / parent / "dup", "model")
        (run / "iter-00" / "adapter" / "adapter_model.safetensors").write_bytes(parent.encode())
        zips.append(app_export.export(tmp_path, f"runs/{parent}/dup", 0, kind="adapter"))
    assert [z.name for z in zips] == ["runs+a+dup-iter-00-adapter.zip", "runs+b+dup-iter-00-adapter.zip"]
    import zipfile
    assert [zipfile.ZipFile(z).read("adapter_model.safetensors") for z in zips] == [b"a", b"b"]


def test_exports_is_ignored_by_git():
    assert "/exports/" in (REPO / ".gitignore").read_text().splitlines()
