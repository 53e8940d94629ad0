"""The Setup tab's settings form and the config it stands for: one input per setting, built from the config
dataclasses (spin_lite.config.settings_info: names, types, defaults, documentation, allowed values).

    form_values(cfg) -> values           config_from_form(values) -> a checked SpinConfig
    preset_config("CPU demo")            a shipped config (PRESETS), as the form opens on it
    FIRST, TOPICS                        the settings shown first, and the topics of "Advanced"

The presets are the shipped configs of examples/configs; the package carries them as spin_lite/presets/ (links
to those files, copied into a wheel), so an installed app offers them too.
"""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import yaml

from ..config import ConfigError, SpinConfig, load_config, settings_info
from ..config import choices as setting_choices
from .workspace import AppError, inside, is_run_dir, open_to_write, resolved, shown

# Values a setting may take where the config accepts a fixed set: its Literal type in spin_lite.config.
CHOICES = {key: list(values) for key, values in setting_choices().items()}

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# label -> (file in PRESETS_DIR, overrides). The CPU demo reads the demo rows shipped inside the package
# (sample:demo, the same rows as examples/data/demo_sft.jsonl), so it works in any workspace.
PRESETS = {"CPU demo": ("demo.yaml", ["data.path=sample:demo"]),
           "T4 16 GB QLoRA": ("t4_16gb_qlora.yaml", []),
           "24 GB QLoRA": ("gpu_24gb_qlora.yaml", [])}
LARGE_GPU_GIB = 20  # from here on the 24 GB preset: a 24 GB card reports about 23.6 GiB, a T4 about 14.6

# The settings that matter first, shown above "Advanced" in this order.
FIRST = ["model.name", "data.path", "iterations", "train.learning_rate", "train.lr_ratio_to_sft", "sft.enabled",
         "sft.control", "train.stop_patience", "run_dir"]
# "Advanced", by topic: (title, id, the settings or the sections it holds). A setting goes to the first topic
# that names it or its section; FIRST ones are shown above instead.
TOPICS = [("Data", "data", ["data."]),
          ("Model and LoRA", "model", ["model.adapter", "model.trust_remote_code", "lora.", "mode"]),
          ("Hardware: memory and speed", "hardware", ["model.", "generation.batch_size", "generation.engine",
                                                      "train.micro_batch_size", "train.gradient_checkpointing"]),
          ("Generation (the opponent's responses)", "generation", ["generation."]),
          ("Stop rule (validation rows)", "stop", ["train.stop_when", "train.stop_confidence"]),
          ("SPIN training", "training", ["train.", "seed"]),
          ("SFT stage and the SFT-continued control", "sft", ["sft."]),
          ("Held-out evaluation", "eval", ["eval."])]


@dataclasses.dataclass
class Setting:
    key: str
    """Name as in the YAML file and the CLI overrides: `iterations`, `train.beta`."""
    kind: str
    """bool, int, float, str, optional-int, optional-str, or yaml (a number or a list, typed as YAML)."""
    default: object
    help: str
    choices: list | None = None


KINDS = {bool: "bool", int: "int", float: "float", str: "str", int | None: "optional-int", str | None: "optional-str"}
# The most characters one form value may hold: a long system prompt fits; a value sent through the API to make the
# config's checks (which quote values) or YAML work for minutes does not, and is refused before either sees it.
MAX_VALUE_CHARS = 20_000
# The most YAML nodes a config file loaded into the form may expand to through its aliases (`<<: *defaults` is
# fine; a "billion laughs" document of 326 characters expanded to 10^9 and took 435 s and 1.3 GB in the checks).
MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 1_000_000


def settings() -> list[Setting]:
    """Every config setting, in the config's order, with its default and its documentation (spin_lite.config's
    settings_info: types, defaults, docstrings and allowed values, computed once)."""
    return [Setting(s.key, "str" if s.choices else KINDS.get(s.type, "yaml"), s.default, s.help,
                    list(s.choices) if s.choices else None) for s in settings_info()]


def topic(key: str) -> str | None:
    """The id of the "Advanced" topic that shows `key`, or None for a FIRST setting."""
    if key in FIRST:
        return None
    return next(tid for _, tid, names in TOPICS for name in names if key == name or
                (name.endswith(".") and key.startswith(name)))


def preset_config(name: str) -> SpinConfig:
    """The config of preset `name` (PRESETS), as the form opens on it; ConfigError if its file is missing."""
    if name not in PRESETS:
        raise AppError(f"unknown preset {str(name)[:60]!r}: one of {', '.join(PRESETS)}")
    file, overrides = PRESETS[name]
    return load_config(PRESETS_DIR / file, overrides)


def recommended_preset(gpu_gib: float | None) -> str:
    """The preset the first screen opens on: the CPU demo without CUDA, else the one for the GPU's memory
    (`gpu_gib`, None without CUDA)."""
    if gpu_gib is None:
        return "CPU demo"
    return "24 GB QLoRA" if gpu_gib >= LARGE_GPU_GIB else "T4 16 GB QLoRA"


def gpu_memory_gib() -> float | None:
    """The first CUDA GPU's memory in GiB, None without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def yaml_value(value) -> str:
    """A value as one line of YAML, the way `key=value` overrides are parsed (5e-05 -> 5.0e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def form_values(cfg: SpinConfig) -> list:
    """`cfg` as the form's values, in settings() order."""
    data = cfg.to_dict()
    values = []
    for s in settings():
        value = data
        for part in s.key.split("."):
            value = value[part]
        if s.kind == "yaml":
            value = yaml_value(value)
        elif s.kind.startswith("optional"):
            value = "" if value is None else str(value)
        values.append(value)
    return values


def config_from_form(values: list) -> SpinConfig:
    """The form's values (settings() order) as a checked config; ConfigError lists every problem."""
    specs = settings()
    if not isinstance(values, (list, tuple)) or len(values) != len(specs):
        raise AppError(f"the settings form has {len(specs)} values; got "
                       f"{len(values) if isinstance(values, (list, tuple)) else type(values).__name__}")
    too_long = [s.key for s, v in zip(specs, values) if len(v if isinstance(v, str) else str(v)) > MAX_VALUE_CHARS]
    if too_long:
        raise AppError(f"{', '.join(too_long)}: at most {MAX_VALUE_CHARS:,} characters a setting")
    data: dict = {}
    for s, value in zip(specs, values):
        if s.kind == "yaml":
            value = _parse_yaml_field(s.key, value)
        elif s.kind == "optional-str":
            value = value if isinstance(value, str) and value.strip() else None  # spaces may matter (a regex)
        elif s.kind == "optional-int":
            value = _optional_int(value)
        elif s.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif s.kind == "str" and isinstance(value, str):
            value = value.strip()
        node = data
        *parents, leaf = s.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    train = data.get("train", {})
    if train.get("lr_ratio_to_sft") not in (None, ""):
        # the form always shows a learning rate (the one the ratio gave when loaded): with a ratio set, the ratio
        # decides it, so a changed ratio or SFT rate is not refused as disagreeing with the rate on show
        train.pop("learning_rate", None)
    return SpinConfig.from_dict(data)


def _optional_int(text):
    """An optional integer typed in a text box: empty is None; anything else not an integer is left for the
    config's check to report."""
    text = str(text).strip() if text is not None else ""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a form value is one number or a short list, and an alias is
    how a few characters expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            raise yaml.YAMLError(f"anchors and aliases (& and *) are not taken in a form value "
                                 f"(line {self.peek_event().start_mark.line + 1})")
        return super().compose_node(parent, index)


def _parse_yaml_field(key: str, text) -> object:
    if not isinstance(text, str):
        return text
    try:
        value = yaml.load(text, Loader=_NoAliasLoader) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid configuration:\n  - {key} is not valid YAML: {' '.join(str(e).split())[:300]}") \
            from None
    if isinstance(value, str):  # "5e-5": YAML 1.1 reads a float without a dot as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def cli_overrides(cfg: SpinConfig) -> list[str]:
    """`key=value` overrides that turn the default config into `cfg`."""
    defaults = form_values(SpinConfig())
    out = []
    for s, value, default in zip(settings(), form_values(cfg), defaults):
        if value != default:
            if s.kind == "yaml":
                text = value
            elif s.kind.startswith("optional"):
                text = value if s.kind == "optional-int" or value == "" else yaml_value(value)
            else:
                text = yaml_value(value)
            out.append(f"{s.key}={text}")
    return out


def cli_command(workspace, cfg: SpinConfig) -> str:
    """The shell command that runs `cfg` without the app."""
    args = " ".join(shlex.quote(o) for o in cli_overrides(cfg))
    return f"cd {shlex.quote(str(Path(workspace).resolve()))}\nspin-lite run {args}".rstrip()


def save_config(workspace, cfg: SpinConfig, path: str) -> Path:
    """Write `cfg` to a .yaml file of the workspace, never through a link and never inside a run directory (a run's
    own config.yaml is written by the run: one saved over it would change a run past Continue's check)."""
    target = inside(workspace, path)
    if target.suffix not in (".yaml", ".yml"):
        raise AppError(f"{path}: a config file name ends in .yaml")
    ws = Path(workspace).resolve()
    for folder in [target.parent, *target.parent.parents]:
        if folder == ws or ws not in folder.parents:
            break
        if is_run_dir(ws, folder):
            raise AppError(f"{shown(path)} is inside the run directory {folder.relative_to(ws)}; save configs "
                           "elsewhere (e.g. configs/NAME.yaml): a run's own files are written by the run")
    resolved(workspace, cfg)  # a config whose paths leave the workspace is not saved
    if (Path(workspace).resolve() / str(path).strip()).is_symlink():  # inside() looked through it
        raise AppError(f"{path} is a symbolic link; the app does not write through links")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_to_write(target) as f:
        f.write(cfg.to_yaml().encode("utf-8"))
    return target


def open_config(workspace, path: str) -> SpinConfig:
    """A config file from the workspace (a run directory stands for its config.yaml)."""
    target = inside(workspace, path)
    if target.is_dir():
        target = target / "config.yaml"
    check_yaml_size(target)
    cfg = load_config(target)
    resolved(workspace, cfg)  # nor loaded into the form
    return cfg


def check_yaml_size(path: Path):
    """AppError for a YAML file too large to load into the form, or whose aliases expand it past MAX_YAML_NODES
    nodes (counted on the composed document, where an alias is one shared node: nothing is expanded to count)."""
    if not path.is_file():
        return  # load_config says what is wrong
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AppError(f"{path.name} is {path.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError):
        return  # load_config names the problem
    sizes: dict[int, int] = {}

    def size(n) -> int:  # nodes after expanding every alias, each shared node counted once per use
        if id(n) not in sizes:
            sizes[id(n)] = 0  # (a recursive alias counts nothing more than once)
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = 1 + sum(min(size(c), MAX_YAML_NODES + 1) for c in children)
        return sizes[id(n)]

    if node is not None and size(node) > MAX_YAML_NODES:
        raise AppError(f"{path.name}: its aliases (*name) expand it past {MAX_YAML_NODES:,} values; a config is a few "
                       "dozen settings")
