"""The backend setting: auto picks hf without CUDA or Unsloth; unsloth where it cannot run fails before any work."""
import pytest
import torch

from conftest import cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unsloth_without_cuda_fails_before_any_work(tmp_path):
    out = cli("run", "model.backend=unsloth", f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert "model.backend=unsloth needs a CUDA GPU and this machine has none" in out.stderr
    assert not (tmp_path / "run").exists()


def test_auto_says_which_backend(tiny_model_dir, tmp_path):
    from spin_lite.model import resolve_backend
    from spin_lite.config import ModelConfig
    expected = "unsloth" if torch.cuda.is_available() and _has_unsloth() else "hf"
    assert resolve_backend(ModelConfig(backend="auto")) == expected
    assert resolve_backend(ModelConfig(backend="hf")) == "hf"
    from spin_lite.run import SpinRun
    from spin_lite.config import load_config
    from conftest import tiny_settings
    lines = []
    SpinRun(load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run")), log=lines.append).prepare()
    assert f"backend: {expected} (model.backend=auto)" in lines


def test_bad_backend_name():
    from spin_lite.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.backend must be auto, hf or unsloth"):
        load_config(None, ["model.backend=vllm"])


def _has_unsloth():
    import importlib.util
    return importlib.util.find_spec("unsloth") is not None
