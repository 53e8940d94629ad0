"""Known library noise that a spin_lite user cannot act on, silenced where it starts; applied by the CLI and the app.

Each entry names what prints it and why nothing is lost. Everything else (a missing weight when a model loads,
a real deprecation in the user's own settings) still prints.
"""
from __future__ import annotations

import logging
import os
import warnings

DEPRECATED_CHECKPOINTING = (r"`(gradient_checkpointing_enable|gradient_checkpointing_disable|is_gradient_checkpointing)`"
                            r" is deprecated")
"""transformers 5 renames these to activation_checkpointing_*; the old names still work in the versions that
pyproject.toml admits, and the call is spin_lite's, not the user's."""
QUIET_LOGGERS = {
    # bitsandbytes (0.49+) tries to fetch a CPU 4-bit kernel from the Hub at import on CPUs with AVX512-BF16 and
    # logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot (offline, or no
    # `kernels` package). spin_lite never uses that kernel: model.disable_cpu_4bit_repacking turns it off.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def apply() -> None:
    """Install the filters; idempotent, and cheap enough to call from every entry point."""
    warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING, category=FutureWarning)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # The tokenizers library warns about parallelism after a fork (the app's worker processes, DataLoader
    # workers); spin_lite tokenizes one row at a time, so its thread pool buys nothing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own progress bars ("Loading weights", "Writing model shards", "Converting and de-quantizing
    # GGUF tensors") take seconds and fill the log between spin_lite's stage bars. Hub download bars (minutes,
    # worth watching) are huggingface_hub's and stay.
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' bars, and the hub's with them ...
    if hub_bars:
        enable_progress_bars()  # ... which come back
