"""Checks of a config against the world outside it, made before a run writes anything.

    from spin_lite.preflight import check_model
    check_model(cfg)          # raises ModelError; SpinRun.prepare() calls it first, the app before a launch

The config's own validation (SpinConfig.problems) knows the values; these checks know the files and the hub:
a local model or adapter folder exists and holds what it should ("no such folder", with the absolute path);
lora.target_modules names modules of this model (checked on a meta-device build: only config.json is read, no
weights); a hub id is asked about once, with a short timeout, and the hub's silence gets an offline hint
instead of a minute of retries. A failure here leaves the run directory as it was, so the corrected command
starts cleanly.
"""
from __future__ import annotations

import re
from pathlib import Path

from .config import SpinConfig
from .model import EMBEDDED, ModelError, embedded_model_dir

HUB_TIMEOUT_S = 10.0
# "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct": what the hub accepts as a model id (huggingface_hub's rule)
HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?(?<![.-])")


def check_model(cfg: SpinConfig, base: Path | None = None, base_name: str = "the working directory"):
    """The base model, the starting adapter and the LoRA targets of `cfg`, or ModelError naming the problem.
    Relative paths are taken from `base` (`base_name` in messages; default: the working directory)."""
    where = (Path(base) if base is not None else Path.cwd(), base_name)
    path = str(embedded_model_dir()) if cfg.model.name == EMBEDDED else _reference(
        cfg.model.name, "config.json", f"could not load the tokenizer of model {cfg.model.name!r} (model.name)", where)
    if cfg.model.adapter is not None:
        _reference(cfg.model.adapter, "adapter_config.json", f"model.adapter {cfg.model.adapter!r}", where)
    targets = cfg.lora.target_modules
    if targets != "all-linear":
        _check_targets(targets, _module_types(path, cfg.model.trust_remote_code), cfg.model.name)


def _reference(value: str, marker: str, what: str, where: tuple[Path, str]) -> str:
    """A local folder holding `marker` (returned as an absolute path), or a hub id that exists (returned as is).
    `where`: the folder relative paths are taken from, and its name in messages."""
    base, base_name = where
    path = base / Path(value).expanduser()  # (an absolute value stays itself)
    if path.is_dir():
        if not (path / marker).is_file():
            kind = "a PEFT adapter" if marker == "adapter_config.json" else "a transformers model"
            raise ModelError(f"{what}: the folder {path} has no {marker}, so it is not {kind} folder")
        return str(path)
    if path.exists():
        raise ModelError(f"{what}: {path} is a file; a local model or adapter is a folder")
    # a relative path is taken from the working directory (spin_lite.config.where): say which one
    cwd = "" if Path(value).expanduser().is_absolute() else f" (relative to {base_name} {base})"
    if not HUB_ID.fullmatch(value) or value.startswith(("/", "./", "../", "~")):
        raise ModelError(f"{what}: no such folder: {path}{cwd}")
    _check_hub(value, marker, f"{what}: no such folder {path}{cwd}, and")
    return value


def _check_hub(repo_id: str, marker: str, prefix: str):
    """One look at the hub: the cache first, then a single request with a short timeout."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, marker), str):
        return  # downloaded before: it loads without the network
    hint = ("Offline? Use a local folder, or download the model once with network access and set "
            "HF_HUB_OFFLINE=1")
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{prefix} {repo_id!r} is not in the hub cache while HF_HUB_OFFLINE is set. {hint}")
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelError(f"{prefix} the hub model {repo_id!r} is gated: accept its terms on huggingface.co and "
                         "log in (hf auth login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{prefix} the Hugging Face hub has no model {repo_id!r} (or it is private: log in "
                         "with hf auth login, or set HF_TOKEN)") from None
    except Exception as e:  # network errors differ by huggingface_hub version (requests, httpx)
        raise ModelError(f"{prefix} the Hugging Face hub could not be reached to look up {repo_id!r} "
                         f"({type(e).__name__}, {HUB_TIMEOUT_S:.0f} s timeout). {hint}") from None


def _module_types(path: str, trust_remote_code: bool) -> dict[str, type]:
    """Module name -> class of the model at `path`, built on the meta device (no weights read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"could not read the architecture of model {path!r}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    return {name: type(module) for name, module in model.named_modules() if name}


def _check_targets(targets, modules: dict[str, type], model_name: str):
    """Each of lora.target_modules must name at least one module, and only modules LoRA can wrap (peft's
    rule: a string is a regex matched against whole names, a list holds names matched at the end)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    wrappable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    linear = sorted({name.rsplit(".", 1)[-1] for name, cls in modules.items() if issubclass(cls, torch.nn.Linear)})
    advice = f"the linear layers of {model_name!r} are named: {', '.join(linear)}"
    patterns = [targets] if isinstance(targets, str) else targets
    for target in patterns:
        if isinstance(targets, str):
            matched = [n for n in modules if re.fullmatch(target, n)]
        else:
            matched = [n for n in modules if n == target or n.endswith("." + target)]
        if not matched:
            raise ModelError(f"lora.target_modules: no module of {model_name!r} is named {target!r}; {advice}")
        wrong = [n for n in matched if not issubclass(modules[n], wrappable)]
        if wrong:
            raise ModelError(f"lora.target_modules: {target!r} matches {wrong[0]} ({modules[wrong[0]].__name__}), "
                             f"which LoRA cannot wrap; {advice}")
