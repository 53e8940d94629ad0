"""SFT (spin_lite.sft): the loss goes down, only the adapter moves, and the adapter is a SPIN starting point."""
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from spin_lite.config import load_config
from spin_lite.data import load_splits
from spin_lite.evaluate import score
from spin_lite.model import load_base, load_tokenizer, with_adapter
from spin_lite.run import SpinRun
from spin_lite.sft import run_sft, train_sft
from spin_lite.state import read_jsonl

from conftest import cli, tiny_settings


def nll_per_token(model, rows, pad_id):
    logps, counts = score(model, [r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id, 4)
    return -sum(logps) / sum(counts)


def test_sft_lowers_the_loss_and_changes_only_the_adapter(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.epochs": 3})
    tokenizer = load_tokenizer(cfg.model)
    rows = load_splits(cfg.data, tokenizer, cfg.seed).train
    model = with_adapter(load_base(cfg.model), cfg.lora, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = nll_per_token(model, rows, tokenizer.pad_token_id)

    records = train_sft(model, rows, cfg, tokenizer.pad_token_id, tmp_path, save_at=(2,))

    assert len(records) == 3 * 2  # 8 rows, 4 per step, 3 epochs
    assert nll_per_token(model, rows, tokenizer.pad_token_id) < loss_before - 0.2  # measured: 10.82 -> 10.40
    # The first step's logged loss is the token-mean NLL of its rows under the starting model.
    assert abs(records[0]["loss"] - loss_before) < 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert all(n in changed for n in before if "lora_B" in n)  # every LoRA B left its zero start
    assert (tmp_path / "step-000002" / "adapter_config.json").exists()


def test_sft_adapter_is_the_spin_starting_model(tiny_model_dir, tmp_path):
    sft_cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "sft", **{"train.epochs": 2}))
    metrics = run_sft(sft_cfg, log=lambda *a: None)
    adapter = tmp_path / "sft" / "adapter"
    assert metrics["steps"] == 4
    assert metrics["heldout_logp_per_token"] > metrics["heldout_logp_per_token_before"]
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text()) == metrics
    assert run_sft(sft_cfg, log=lambda *a: None) == metrics  # complete: a second call only reads it

    # SPIN's iteration 0 plays against the SFT model: its stored opponent log-probs are the SFT model's.
    spin_cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "spin", iterations=1,
                                               **{"model.adapter": adapter, "eval.enabled": "false"}))
    run = SpinRun(spin_cfg, log=lambda *a: None).prepare()
    run.iteration(0)
    pairs = read_jsonl(tmp_path / "spin" / "iter-00" / "pairs.jsonl")
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    real, _ = score(sft_model, [p["prompt_ids"] for p in pairs], [p["real_ids"] for p in pairs],
                    run.tokenizer.pad_token_id, 4)
    torch.testing.assert_close(torch.tensor([p["opponent_real"] for p in pairs]), torch.tensor(real),
                               atol=1e-4, rtol=0)


def test_cli_continues_an_sft_adapter(tiny_model_dir, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("train:\n  epochs: 1\n")
    first = cli("sft", config, *tiny_settings(tiny_model_dir, tmp_path / "sft"))
    assert first.returncode == 0, first.stderr
    more = cli("sft", config, *tiny_settings(tiny_model_dir, tmp_path / "more"),
               f"model.adapter={tmp_path / 'sft' / 'adapter'}", "--steps", "3")
    assert more.returncode == 0, more.stderr
    metrics = json.loads((tmp_path / "more" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["start_adapter"] == str(tmp_path / "sft" / "adapter")
    # It started from the SFT adapter: its held-out likelihood before training is the SFT run's after.
    first_metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert abs(metrics["heldout_logp_per_token_before"] - first_metrics["heldout_logp_per_token"]) < 1e-4
    assert (tmp_path / "more" / "adapter" / "adapter_model.safetensors").exists()


def test_experiment_configs_parse_and_share_their_data():
    from conftest import REPO

    configs = REPO / "examples" / "configs"
    for sft, spin in (("experiment_sft", "experiment_spin"), ("experiment_sft_converged", "experiment_spin"),
                      ("experiment_gpu_sft", "experiment_gpu_spin")):
        sft_cfg = load_config(configs / f"{sft}.yaml")
        spin_cfg = load_config(configs / f"{spin}.yaml")
        # The same data section and seed hold out the same rows, so SFT never trains on SPIN's held-out rows.
        assert sft_cfg.data == spin_cfg.data and sft_cfg.model.name == spin_cfg.model.name
        assert sft_cfg.model.adapter is None


def test_sft_killed_mid_training_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    """SFT shares SPIN's training loop (spin_lite.train.fit): a SIGKILL after step 3 of 6, with a checkpoint every
    2 steps, and the same command again ends with an adapter bit-identical to an uninterrupted run's."""
    from safetensors.torch import load_file
    args = lambda run_dir: ["sft", *tiny_settings(tiny_model_dir, run_dir, **{"train.epochs": 3,
                                                                               "train.save_every": 2})]
    assert cli(*args(tmp_path / "reference")).returncode == 0
    killed = cli(*args(tmp_path / "crashed"), env={"SPIN_LITE_KILL_AT": "train_step:3"})
    assert killed.returncode == -9 and (tmp_path / "crashed" / "checkpoint" / "trainer_state.pt").exists()
    resumed = cli(*args(tmp_path / "crashed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step 2 of 6" in resumed.stdout + resumed.stderr
    log = read_jsonl(tmp_path / "crashed" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # step 3 redone once, not logged twice
    a = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
