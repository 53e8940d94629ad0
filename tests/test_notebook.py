"""examples/spin_lite_colab.ipynb runs top to bottom, with the tiny CPU settings its settings cell switches to
under SPIN_LITE_NOTEBOOK_CI=1 (the embedded model, 8 local prompts, 8 new tokens, 1 iteration; no install); its
install cell, run as on a fresh Colab, installs a wheel built from this checkout."""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
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
    # the whole pipeline ran: the SFT stage, the iteration and the control matched to it
    assert (run / "sft" / "adapter").is_dir() and (run / "control-00" / "summary.json").exists()
    # the chat and the export use the model chosen among the start (the SFT model), the iteration and the control
    from spin_lite.state import RunDir
    rd = RunDir(run)
    chosen = rd.resolve_model()
    said = "".join(outputs)
    assert f"the chosen model: {rd.model_label(chosen)}" in said
    assert f"\n{rd.model_label(chosen)}: " in said and "base model (no adapter): " in said  # the chat, side by side
    export = tmp_path / "work" / "export"  # the start is the SFT model: whatever was chosen has an adapter
    assert json.loads((export / "adapter" / "spin_lite_export.json").read_text())["iteration"] == chosen
    assert json.loads((export / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


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


def _install_cell() -> str:
    nbformat = pytest.importorskip("nbformat")
    return [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"][1].source


def test_install_cell_finds_its_source(tmp_path, monkeypatch):
    """Outside CI the install cell takes SPIN_LITE_GIT_URL when set, else a checkout (the notebook's folder or a
    parent), else a wheel (in this folder, or in a Kaggle dataset under /kaggle/input); with none of them, and no
    Colab to upload one, it stops with a message saying how to build the wheel, and names no unpublished package."""
    import importlib.util
    import subprocess

    cell = _install_cell()
    assert "YOUR-ORG" not in cell and '"spin-lite"' not in cell.replace("'name = \"spin-lite\"'", "")
    calls, real_find_spec = [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "spin_lite" else real_find_spec(name, *a))

    def pip(args, returncode):
        calls.append(args[-1])
        return subprocess.CompletedProcess(args, returncode)

    settings = {"CI": False, "SPIN_LITE_GIT_URL": None}
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: pip(args, 0))
    monkeypatch.chdir(REPO / "examples")  # the notebook opened from a clone
    exec(cell, dict(settings))
    assert calls == [str(REPO)]
    exec(cell, settings | {"SPIN_LITE_GIT_URL": "https://git.example/me/spin_lite.git"})
    assert calls[-1] == "git+https://git.example/me/spin_lite.git"

    monkeypatch.chdir(tmp_path)  # no checkout, no wheel, no Colab: what to do, and pip never asked
    with pytest.raises(RuntimeError, match=r"No spin_lite checkout, wheel or zip found here .* has no public "
                                           r"repository yet.* `pip wheel --no-deps \. -w dist`.*Kaggle: add it to the "
                                           r"notebook as a dataset"):
        exec(cell, dict(settings))
    assert len(calls) == 2
    kaggle = tmp_path / "kaggle-input"  # Kaggle's /kaggle/input, with the wheel uploaded as a dataset
    (kaggle / "spin-lite-wheel").mkdir(parents=True)
    (kaggle / "spin-lite-wheel" / "spin_lite-0.1.0-py3-none-any.whl").write_bytes(b"")
    exec(cell.replace('Path("/kaggle/input")', f"Path({str(kaggle)!r})"), dict(settings))
    assert calls[-1] == str(kaggle / "spin-lite-wheel" / "spin_lite-0.1.0-py3-none-any.whl")
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: pip(args, 1))
    with pytest.raises(RuntimeError, match=r"pip could not install spin_lite from .*spin_lite-0.1.0-py3-none-any.whl "
                                           r"\(pip's message is above\)\. spin_lite is not on PyPI"):
        exec(cell.replace('Path("/kaggle/input")', f"Path({str(kaggle)!r})"), dict(settings))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """spin_lite's wheel as a user builds it for the notebook (`pip wheel --no-deps . -w DIR`), from a copy of the
    checkout's package files (a build writes build/ and *.egg-info beside its sources), offline: no build isolation,
    the installed setuptools."""
    src = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "spin_lite", src / "spin_lite", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(out)],
                   cwd=src, check=True)
    return next(out.glob("spin_lite-*.whl"))


# The install cell in a Python where spin_lite is not importable, as on a fresh Colab: -S leaves out the .pth files
# that put this checkout on the path (its editable install); site-packages itself (torch, pip) is added back, and the
# folder pip installs into (PIP_TARGET) comes first, where Colab's site-packages would be. google.colab is faked
# only where the test uploads: its files.upload() returns {file name: bytes}, as Colab's does.
COLAB = """
import importlib.machinery, sys, types
sys.path[:0] = [{target!r}]
sys.path += {site_packages!r}
upload = {upload!r}
if upload:
    modules = {{name: types.ModuleType(name) for name in ("google", "google.colab", "google.colab.files")}}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != "google.colab.files")
    modules["google"].colab, modules["google.colab"].files = modules["google.colab"], modules["google.colab.files"]
    modules["google.colab.files"].upload = lambda: {{upload[0]: open(upload[1], "rb").read()}}
    sys.modules.update(modules)
CI, SPIN_LITE_GIT_URL = False, None
exec(open({cell!r}).read())
print("imported from", spin_lite.__file__)
"""


def _as_on_colab(tmp_path, wheel_place, upload=None):
    """Run the install cell in a clean folder that holds nothing (no checkout above it either), pip installing for
    real, offline and without dependencies, into a throwaway folder."""
    folder, target, cell = tmp_path / "content", tmp_path / "site-packages", tmp_path / "cell.py"
    folder.mkdir()
    target.mkdir()
    cell.write_text(_install_cell())
    if wheel_place:
        shutil.copyfile(wheel_place, folder / wheel_place.name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PIP_TARGET": str(target), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    script = COLAB.format(target=str(target), site_packages=site.getsitepackages(), upload=upload, cell=str(cell))
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return folder, target, out.stdout


def test_install_cell_installs_a_zip_of_the_project(tmp_path, monkeypatch):
    """A Colab-only user has the project as a zip of its folder (no PyPI release, no public repository): the cell finds
    it in its folder (where Colab's upload puts it), unpacks it and installs the folder holding pyproject.toml; a zip
    of something else is not taken for it."""
    import importlib.util
    import zipfile

    cell, calls, real_find_spec = _install_cell(), [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "spin_lite" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args[-1]) or
                        subprocess.CompletedProcess(args, 0))
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("pyproject.toml", '[project]\nname = "other"\n')
    with zipfile.ZipFile(tmp_path / "spin_lite.zip", "w") as z:  # a folder zipped: its files one folder down
        z.write(REPO / "pyproject.toml", "spin_lite-main/pyproject.toml")
        z.writestr("spin_lite-main/spin_lite/__init__.py", "")
    exec(cell, {"CI": False, "SPIN_LITE_GIT_URL": None})
    installed = Path(calls[-1])
    assert installed.name == "spin_lite-main" and (installed / "spin_lite" / "__init__.py").is_file()
    assert 'name = "spin-lite"' in (installed / "pyproject.toml").read_text()


def test_notebook_installs_an_uploaded_wheel_as_on_colab(wheel, tmp_path):
    """The wheel where Colab's upload puts it (the notebook's folder, /content): installed from there."""
    assert wheel.name == "spin_lite-0.1.0-py3-none-any.whl"
    folder, target, said = _as_on_colab(tmp_path, wheel)
    assert f"installing spin_lite from {folder / wheel.name}" in said
    assert "spin_lite 0.1.0" in said and f"imported from {target / 'spin_lite' / '__init__.py'}" in said
    assert (target / "spin_lite" / "run.py").is_file() and (target / "spin_lite" / "samples" / "demo_sft.jsonl").is_file()


def test_notebook_asks_for_the_wheel_on_colab(wheel, tmp_path):
    """No wheel yet: the cell opens Colab's file chooser (files.upload); a second upload, which Colab names
    "... (1).whl", is installed under the name pip expects."""
    _, target, said = _as_on_colab(tmp_path, None, upload=("spin_lite-0.1.0-py3-none-any (1).whl", str(wheel)))
    assert "Choose the spin_lite project to upload: a zip of its folder (spin_lite.zip), or its wheel" in said
    assert re.search(r"installing spin_lite from \S*/spin-lite-wheel-\w+/spin_lite-0\.1\.0-py3-none-any\.whl\n", said)
    assert f"imported from {target / 'spin_lite' / '__init__.py'}" in said
