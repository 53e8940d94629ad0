"""On CUDA: a small 4-bit run with the CPU tests' invariants and resume, the static engine's CUDA graph, the Unsloth
backend end to end (all skipped where there is no CUDA; Unsloth also where it is not installed).

Run on a GPU machine: pytest -q -m gpu tests/test_gpu.py (or make gpu-check, which runs these and the benchmarks)
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, tiny_settings, tree_digest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_iterations_on_cuda(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from spin_lite.config import load_config
    from spin_lite.run import SpinRun
    from spin_lite.state import read_jsonl

    cfg = load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run", **{"model.load_in_4bit": "true"}))
    run = SpinRun(cfg, log=lambda *a: None).prepare()
    model = run.model_for(0)
    assert next(model.parameters()).device.type == "cuda"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    run._release(model)
    run.iteration(0)
    digest0 = tree_digest(run.dir.iteration(0) / "adapter")
    run.iteration(1)
    assert tree_digest(run.dir.iteration(0) / "adapter") == digest0  # the opponent stays frozen
    for t in (0, 1):
        log = read_jsonl(run.dir.iteration(t) / "train_log.jsonl")
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=5e-3)  # starts equal to the opponent
    a0 = load_file(run.dir.iteration(0) / "adapter" / "adapter_model.safetensors")
    a1 = load_file(run.dir.iteration(1) / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)


def test_resume_on_cuda(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", *tiny_settings(tiny_model_dir, run_dir, iterations=1, **{"model.load_in_4bit": "true"})]
    assert cli(*args, env={"SPIN_LITE_KILL_AT": "train_step:1"}).returncode == -9
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already on disk, generating 0" in out.stdout and "resumed from the checkpoint at step 1" in out.stdout
    steps = [json.loads(l)["step"] for l in (run_dir / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# -- the static decoding engine: the step recorded in a CUDA graph ------------------------------------------
def _sharp_tiny_model(tiny_model_dir, dtype):
    """The tiny model on CUDA with its (tied) embeddings scaled up, so greedy choices are decided by wide
    margins and kernel-order rounding cannot flip them."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).cuda().eval()
    model.get_input_embeddings().weight.data *= 30
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_engine_replays_a_cuda_graph(tiny_model_dir, tokenizer, dtype, monkeypatch, capsys):
    """On CUDA the static engine records its decoding step once and replays it: greedy tokens equal the eager
    engine's, sampled tokens are the same for the same seed, and no fallback note is printed."""
    from spin_lite import generate as gen
    from spin_lite.config import GenerationSettings
    model = _sharp_tiny_model(tiny_model_dir, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (8 + 5 * i,), generator=g).tolist() for i in range(6)]
    recorded = []
    record = gen._record
    monkeypatch.setattr(gen, "_record", lambda step: recorded.append(1) or record(step))
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    greedy = {e: gen.generate_batch(model, prompts, GenerationSettings(max_new_tokens=40, do_sample=False, engine=e),
                                    stops, pad, seed=0) for e in ("eager", "static")}
    assert recorded and "without a CUDA graph" not in capsys.readouterr().out
    assert greedy["static"] == greedy["eager"]
    sampled = [gen.generate_batch(model, prompts, GenerationSettings(max_new_tokens=40, engine="static"), stops, pad,
                                  seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert gen.engine_for("auto", model) == "static"


def test_unsloth_backend_end_to_end(tmp_path, tokenizer):
    """One SPIN iteration with model.backend=unsloth on a small random-init Llama in 4 bits (a fresh process,
    so unsloth patches transformers before anything else imports it); skipped where unsloth is not installed."""
    pytest.importorskip("unsloth")
    from conftest import DEMO_DATA
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_dir = tmp_path / "small-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    out = cli("run", *tiny_settings(model_dir, run_dir, iterations=1, **{
        "model.backend": "unsloth", "model.load_in_4bit": "true", "data.path": DEMO_DATA}))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    log = [json.loads(l) for l in (run_dir / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert log and log[0]["loss"] == pytest.approx(math.log(2), abs=5e-3)
    assert (run_dir / "iter-00" / "adapter" / "adapter_model.safetensors").exists()
