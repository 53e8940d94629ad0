"""The real CLI end to end: one stage at a time on a tiny model (tests/test_embedded.py: the embedded SmolLM2)."""
import json

from conftest import cli, tiny_settings


def refused(*args) -> str:
    """A stage command that must refuse, run in this process (the same spin_lite.cli.main a process runs; the
    refusals happen before any model loads, so a process of their own would only add its start-up)."""
    import contextlib
    import io

    from spin_lite.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(a) for a in args]) == 2
    return err.getvalue()


def test_stages_one_at_a_time(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # a run stopped right after its config was written: the stage commands take it from there
    settings = tiny_settings(tiny_model_dir, run_dir, iterations=1)
    assert "not a run directory" in refused("train", run_dir)
    from spin_lite.config import load_config
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(None, settings).to_yaml())

    assert "run `spin-lite generate" in refused("train", run_dir)
    out = cli("generate", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    pairs = [json.loads(l) for l in (run_dir / "iter-00" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all("opponent_real" in p for p in pairs)  # 8 train, 4 validation, 4 test
    assert not (run_dir / "iter-00" / "adapter").exists()
    assert "run `spin-lite train" in refused("evaluate", run_dir)
    out = cli("train", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run_dir / "iter-00" / "adapter" / "adapter_config.json").exists()
    assert not (run_dir / "iter-00" / "summary.json").exists()
    out = cli("evaluate", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "iter-00" / "summary.json").read_text())
    assert summary["pairs"]["current"] == 8 and summary["eval"]["margin_accuracy"] is not None
    table = cli("table", run_dir)
    assert "iter 0" in table.stdout and "start" in table.stdout
    assert "iterations of" in refused("generate", run_dir)  # all iterations complete
    assert "not a run directory" in refused("table", tmp_path / "nothing-here")


def test_help_explains_every_setting():
    out = cli("run", "--help")
    assert out.returncode == 0
    from spin_lite.config import SpinConfig
    import dataclasses
    for section in ("model", "data", "lora", "generation", "train", "eval"):
        for f in dataclasses.fields(type(getattr(SpinConfig(), section))):
            assert f"{section}.{f.name} (default" in out.stdout
    # merge mode as the code does it (spin_lite.model): earlier adapters stay as LoRA layers, merged only at export
    mode = " ".join(out.stdout.split("  mode (default")[1].split("\n  seed (default")[0].split())
    assert "never merged into a 4-bit base and re-quantized" in mode and "only at export" in mode
    assert "16-bit, then re-quantized for a 4-bit base" not in out.stdout
