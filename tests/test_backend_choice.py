"""Which backend a run gets: Unsloth + merge mode + a 4-bit base would re-quantize the opponent (its one adapter a
model is merged into the base for real), so auto takes hf there and an explicit unsloth is refused by name.
Unsloth is never importable on this CPU machine: the check is made with it pretended present and CUDA pretended."""
from __future__ import annotations

from pathlib import Path

import pytest

from spin_lite import model as model_module
from spin_lite.config import ModelConfig
from spin_lite.model import ModelError, resolve_backend


@pytest.fixture
def unsloth_and_cuda(monkeypatch):
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: object() if name == "unsloth" else None)
    monkeypatch.setattr(model_module.torch.cuda, "is_available", lambda: True)


def test_auto_never_picks_the_requantizing_path(unsloth_and_cuda):
    assert resolve_backend(ModelConfig(backend="auto", load_in_4bit=True), "merge") == "hf"
    assert resolve_backend(ModelConfig(backend="auto", load_in_4bit=True), "stack") == "unsloth"
    assert resolve_backend(ModelConfig(backend="auto", load_in_4bit=False), "merge") == "unsloth"


def test_explicit_unsloth_with_merge_and_4bit_is_refused(unsloth_and_cuda):
    with pytest.raises(ModelError, match="re-quantize it, so the opponent would not be the trained model"):
        resolve_backend(ModelConfig(backend="unsloth", load_in_4bit=True), "merge")
    assert resolve_backend(ModelConfig(backend="unsloth", load_in_4bit=True), "stack") == "unsloth"


@pytest.mark.parametrize("setting", [{"train.pack_pairs": "true"}, {"train.fused_kernels": "compile"}])
def test_packing_and_fused_kernels_are_refused_where_auto_picks_unsloth(unsloth_and_cuda, tiny_config, setting):
    """Unsloth's fast forward drops the attention mask while training (a packed row's responses would see each
    other) and brings its own kernels: where model.backend auto picks it, train.pack_pairs and train.fused_kernels
    are refused by name before anything is written."""
    from spin_lite.config import ConfigError
    from spin_lite.run import SpinRun
    cfg = tiny_config(**setting)
    key = next(iter(setting))
    with pytest.raises(ConfigError, match=rf"{key} needs the hf backend, and this run uses unsloth \(model.backend=auto"):
        SpinRun(cfg, log=lambda *a: None).prepare()
    assert not (Path(cfg.run_dir) / "config.yaml").exists()
