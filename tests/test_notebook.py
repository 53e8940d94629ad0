"""examples/spin_lite_colab.ipynb runs top to bottom, with the tiny CPU settings its settings cell switches to
under SPIN_LITE_NOTEBOOK_CI=1 (the embedded model, 8 local prompts, 8 new tokens, 1 iteration; no install)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "spin_lite_colab.ipynb"


def test_notebook_is_clean_and_parametrized():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    settings = code[0].source
    for name in ("MODEL =", "DATASET =", "SMALL =", "SPIN_LITE_NOTEBOOK_CI"):
        assert name in settings


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    # A kernel of this interpreter (the project's venv), whatever other "python3" kernels the machine has.
    from ipykernel.kernelspec import install
    install(kernel_name="spin-lite-test", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("SPIN_LITE_NOTEBOOK_CI", "1")
    monkeypatch.setenv("SPIN_LITE_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="spin-lite-test",
                                     resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    finally:
        print("cell wall times (s):", _cell_times(nb))

    outputs = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"]
    assert "CI: using the spin_lite of this checkout" in outputs[1]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the metrics plot was not drawn"
    assert "SPIN results for" in "".join(outputs)
    run = tmp_path / "work" / "run"
    assert (run / "iter-00" / "summary.json").exists() and (run / "iter-00" / "train_log.jsonl").exists()
    # the chat and the export use the model the stop rule chose, and say which
    from spin_lite.state import RunDir
    rd = RunDir(run)
    chosen = rd.resolve_model()
    said = "".join(outputs)
    assert f"the chosen model: {rd.model_label(chosen)}" in said
    export = tmp_path / "work" / "export"
    if chosen >= 0:
        assert json.loads((export / "adapter" / "spin_lite_export.json").read_text())["iteration"] == chosen
        assert json.loads((export / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    else:  # the starting model (the base) chosen: said plainly, nothing exported
        assert "the starting model (chosen: no iteration was better)" in said
        assert "nothing exported: the model the stop rule chose" in said and not export.exists()


def test_notebook_uses_the_chosen_model():
    """The cells after the run read the model the stop rule chose (RunDir.resolve_model, export "best"), never
    the last iteration."""
    nbformat = pytest.importorskip("nbformat")
    code = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    assert "completed() - 1" not in code and "chosen = rd.resolve_model()" in code
    assert 'export_adapter(cfg.run_dir, "best"' in code and 'export_merged(cfg.run_dir, "best"' in code


def _cell_times(nb) -> list[float]:
    from datetime import datetime

    times = []
    for cell in nb.cells:
        ex = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            start, end = (datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            times.append(round((end - start).total_seconds(), 1))
    return times


def test_install_cell_needs_no_edits(tmp_path, monkeypatch):
    """Outside CI the install cell finds a checkout (the notebook's folder or a parent) and pip-installs it, else
    asks pip for the package; a failed install ends in a message saying what to do, not a placeholder URL."""
    import importlib.util
    import subprocess

    nbformat = pytest.importorskip("nbformat")
    cell = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"][1].source
    assert "YOUR-ORG" not in cell
    calls, real_find_spec = [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "spin_lite" else real_find_spec(name, *a))

    def pip(args, returncode):
        calls.append(args[-1])
        return subprocess.CompletedProcess(args, returncode)

    monkeypatch.chdir(REPO / "examples")  # the notebook opened from a clone
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: pip(args, 0))
    exec(cell, {"CI": False, "SPIN_LITE_SOURCE": None})
    assert calls == [str(REPO)]
    monkeypatch.chdir(tmp_path)  # no checkout anywhere: the package name, and a clear message when pip fails
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: pip(args, 1))
    with pytest.raises(RuntimeError, match="pip could not install spin_lite from spin-lite. Put a copy"):
        exec(cell, {"CI": False, "SPIN_LITE_SOURCE": None})
    assert calls[-1] == "spin-lite"
