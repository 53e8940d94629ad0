"""spin_lite.quiet: the library noise a user cannot act on is gone from a CLI run, and nothing else is hidden."""
from __future__ import annotations

import logging
import warnings

from conftest import cli, tiny_settings

NOISE = ("FutureWarning", "warnings.warn(", "gradient_checkpointing", "gemm_4bit_forward", "kernels-community",
         "Loading weights", "Writing model shards", "TOKENIZERS_PARALLELISM", "Traceback")


def test_filters_are_targeted(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from spin_lite import quiet

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(bnb, "level", bnb.level)  # restored after the test, as is everything below
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # a user's own choice is kept
    bars = hf_logging.is_progress_bar_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.apply()
            warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
                          "`activation_checkpointing_enable` instead.", FutureWarning)
            warnings.warn("`some_other_call` is deprecated", FutureWarning)
        assert [str(w.message) for w in caught] == ["`some_other_call` is deprecated"]
        assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)
        assert logging.getLogger("bitsandbytes").isEnabledFor(logging.WARNING)
        assert not hf_logging.is_progress_bar_enabled()
        assert not are_progress_bars_disabled(), "hub download bars stay"
        import os
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_cli_run_prints_no_library_noise(tiny_model_dir, tmp_path):
    """A whole tiny run (start evaluation, generate, score, train with gradient checkpointing, evaluate) through
    the real CLI: stderr holds spin_lite's progress bars and nothing from the libraries."""
    out = cli("run", *tiny_settings(tiny_model_dir, tmp_path / "run", iterations=1,
                                    **{"train.gradient_checkpointing": "true"}), env={"PYTHONWARNINGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy[:10])
    assert any(line.startswith("train iter 0") for line in lines), "spin_lite's own progress bars stay"
