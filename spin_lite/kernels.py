"""Fused kernels for the training step (train.fused_kernels), applied for the time of one `fit` and undone after it,
so that scoring, evaluation and generation run the model as transformers wrote it.

- compile: each decoder layer compiled with torch.compile (`nn.Module.compile`, as torchtune's recipes do): inductor
  fuses a layer's elementwise work (RMSNorm, SwiGLU, RoPE, the residual adds, the LoRA branch's scale and add) into
  a few kernels. The layers share one compiled code; lengths that vary from batch to batch are compiled once as
  dynamic shapes. The first steps pay the compilation (tens of seconds on a GPU).
- liger: Liger-Kernel's Triton RMSNorm and SwiGLU on the layers' own modules (the LoRA layers inside stay as they
  are) and its RoPE, for the model types it supports (llama, mistral, qwen2, qwen3). CUDA only; an optional
  dependency (`pip install liger-kernel`).
Neither changes what is computed beyond float rounding (tests/test_precision.py: compile; tests/test_gpu.py:
liger). Off by default until the GPU check has timed them (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch

from .config import ConfigError

COMPILE_BACKEND = "inductor"  # (tests on the CPU use aot_eager: the same graphs, without generating C++ code)
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (the modules of its largest ModuleList whose class ends in DecoderLayer)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
             and len(m) and all(type(layer).__name__.endswith("DecoderLayer") for layer in m)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def fused_kernels(model, setting: str):
    """Within the block the model trains with the fused kernels of `setting` (none, compile, liger)."""
    if setting == "none":
        yield
        return
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.fused_kernels: {setting} needs a model with decoder layers (a ModuleList of "
                          f"*DecoderLayer modules); {type(model).__name__} has none. Set train.fused_kernels: none")
    undo = _compile(layers) if setting == "compile" else _liger(model, layers)
    try:
        yield
    finally:
        undo()


def _compile(layers: list[torch.nn.Module]):
    for layer in layers:
        layer.compile(backend=COMPILE_BACKEND)

    def undo():
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer's own forward again
    return undo


def _liger(model, layers: list[torch.nn.Module]):
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError(f"train.fused_kernels: liger needs a CUDA GPU (its kernels are Triton); this model is on "
                          f"{device.type}. Set train.fused_kernels: none (or compile)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        raise ConfigError(f"train.fused_kernels: liger supports the model types {', '.join(LIGER_MODEL_TYPES)}, not "
                          f"{model_type}. Set train.fused_kernels: none (or compile)")
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError as e:
        raise ConfigError(f"train.fused_kernels: liger needs Liger-Kernel (pip install liger-kernel): {e}") from e
    act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"train.fused_kernels: liger's SwiGLU needs a silu activation, and this model's is {act}. "
                          "Set train.fused_kernels: none (or compile)")
    bound = []  # (module, attribute, what the instance had there before: usually nothing, its class's method)

    def bind(module, name, function):
        bound.append((module, name, module.__dict__.get(name)))
        module.__dict__[name] = function.__get__(module, type(module))

    for norm in (m for m in model.modules() if type(m).__name__.endswith("RMSNorm")):  # the final norm too
        norm.offset, norm.casting_mode, norm.in_place, norm.row_mode = 0.0, "llama", False, None  # (Liger's)
        norm.variance_epsilon = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        bind(norm, "forward", LigerRMSNorm.forward)
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            bind(mlp, "forward", LigerSwiGLUMLP.forward)  # calls gate_proj/up_proj/down_proj: LoRA layers kept
    modeling = sys.modules.get(type(layers[0]).__module__) or importlib.import_module(type(layers[0]).__module__)
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None:
        modeling.apply_rotary_pos_emb = liger_rotary_pos_emb

    def undo():
        for module, name, before in reversed(bound):
            if before is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = before
        if rope is not None:
            modeling.apply_rotary_pos_emb = rope
    return undo
