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
    generated = tree_digest(run_dir / "iter-00")["generations.jsonl"]
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    # killed in training: the generate stage was complete, so the run goes straight to the checkpoint (an earlier
    # version of this test expected a generation line; the first H200 run showed there is none)
    assert "resumed from the checkpoint at step 1" in out.stdout
    assert tree_digest(run_dir / "iter-00")["generations.jsonl"] == generated
    steps = [json.loads(l)["step"] for l in (run_dir / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# -- the static decoding engine: the step recorded in a CUDA graph ------------------------------------------
def _sharp_tiny_model(tiny_model_dir, dtype):
    """The tiny model on CUDA with its output layer untied and scaled up, so greedy choices are decided by wide
    margins and kernel-order rounding cannot flip them, while they still depend on the context (scaling the tied
    embeddings instead makes a model that repeats its last token, which any decoder gets right)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone() * 30)
    return model.cuda().eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_engine_replays_a_cuda_graph(tiny_model_dir, tokenizer, dtype, monkeypatch, capsys):
    """On CUDA the static engine records its decoding step once and replays it: greedy tokens equal the eager
    engine's, with the grouped decode attention (generation.decode_attention auto: a graph for each length bucket)
    and with transformers' sdpa,
    sampled tokens are the same for the same seed, and no fallback note is printed."""
    from spin_lite import generate as gen
    from spin_lite.config import GenerationSettings
    model = _sharp_tiny_model(tiny_model_dir, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (8 + 5 * i,), generator=g).tolist() for i in range(6)]
    recorded = []
    record = gen._record
    monkeypatch.setattr(gen, "_record", lambda step, pool=None: recorded.append(1) or record(step, pool))
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    greedy = {(e, a): gen.generate_batch(model, prompts, GenerationSettings(max_new_tokens=40, do_sample=False,
                                                                            engine=e, decode_attention=a),
                                         stops, pad, seed=0)
              for e, a in (("eager", "auto"), ("static", "auto"), ("static", "sdpa"))}
    out = capsys.readouterr().out
    # recorded with the grouped decode attention (no note that transformers refused it): one graph for each of its
    # 2 buckets (prompts of up to 33 tokens + 40 new: slots 64, then 73), and one with sdpa (no buckets)
    assert len(recorded) == 3 and "without a CUDA graph" not in out and "sdpa attention for decoding" not in out
    greedy = {e if a == "auto" else "static_sdpa": tokens for (e, a), tokens in greedy.items()}
    assert greedy["static"] == greedy["eager"] == greedy["static_sdpa"]
    assert len({tuple(ids) for ids, _ in greedy["eager"]}) > 1  # the context matters: rows differ
    sampled = [gen.generate_batch(model, prompts, GenerationSettings(max_new_tokens=40, engine="static"), stops, pad,
                                  seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert gen.engine_for("auto", model) == "static"


def test_unsloth_backend_end_to_end(tmp_path, tokenizer):
    """One SPIN iteration with model.backend=unsloth on a small random-init Llama in 4 bits, then what comes out:
    the iteration's table is sane, and greedy tokens from the Unsloth backend agree with the hf backend's on the
    same trained adapter (fresh processes, so unsloth patches transformers before anything else imports it).
    Skipped where unsloth is not installed (make gpu-check puts it on the path of this test alone)."""
    pytest.importorskip("unsloth")
    import subprocess
    import sys
    from conftest import DEMO_DATA, REPO
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    # sharp logits (greedy choices by wide margins, not by kernel rounding) that still depend on the context: an
    # untied output layer scaled up (scaling tied embeddings makes a model that repeats its last token)
    model.get_output_embeddings().weight.data *= 30
    model_dir = tmp_path / "small-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    out = cli("run", *tiny_settings(model_dir, run_dir, iterations=1, **{
        "model.backend": "unsloth", "model.load_in_4bit": "true", "data.path": DEMO_DATA}))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert "backend: unsloth" in out.stdout

    # the iteration's table: pairs generated, a loss that starts at log 2 and stays finite, metrics in range
    log = [json.loads(l) for l in (run_dir / "iter-00" / "train_log.jsonl").read_text().splitlines()]
    assert log and log[0]["loss"] == pytest.approx(math.log(2), abs=5e-3)
    assert all(math.isfinite(r["loss"]) for r in log)
    summary = json.loads((run_dir / "iter-00" / "summary.json").read_text())
    assert summary["pairs"]["current"] > 0 and 0 < summary["pairs"]["generated_mean_tokens"] <= 8
    assert math.isfinite(summary["eval"]["logp_per_token"]) and 0 <= summary["eval"]["margin_accuracy"] <= 1
    gens = [json.loads(l) for l in (run_dir / "iter-00" / "generations.jsonl").read_text().splitlines()]
    assert gens and all(g["ids"] for g in gens)

    # greedy tokens through each backend, on the trained adapter
    adapter = run_dir / "iter-00" / "adapter"
    tokens = {}
    for backend in ("hf", "unsloth"):
        probe = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "greedy_probe.py"), str(model_dir),
                                str(adapter), backend, "24"], capture_output=True, text=True, timeout=600,
                               cwd=REPO)
        assert probe.returncode == 0, (backend, probe.stderr[-3000:])
        tokens[backend] = json.loads(probe.stdout.strip().splitlines()[-1])["tokens"]
    hf, fast = tokens["hf"], tokens["unsloth"]
    assert all(len(a) > 4 for a in hf) and len({t for a in hf for t in a}) > 2, hf  # not one repeated token
    assert all(a[:4] == b[:4] for a, b in zip(hf, fast)), (hf, fast)  # the context is there from step 2 on
    same = sum(x == y for a, b in zip(hf, fast) for x, y in zip(a, b))
    assert same >= 0.8 * sum(len(a) for a in hf), (same, hf, fast)  # kernels may differ late in a sequence


# -- fused kernels for training (train.fused_kernels) ---------------------------------------------------------------
@pytest.mark.parametrize("setting", ["compile", "liger"])
def test_fused_kernels_train_as_transformers_layers_do(tiny_model_dir, setting):
    """The tiny model in bfloat16 with a LoRA adapter: within fused_kernels (inductor-compiled decoder layers, or
    Liger's RMSNorm, SwiGLU and RoPE) the summed log-probs and LoRA gradients of one batch equal transformers' own
    layers' within bfloat16 rounding (log-probs 1e-2 relative, gradients 5% of their norm), and after the block the
    model is transformers' again (no bound forward, the RoPE function restored)."""
    if setting == "liger":
        pytest.importorskip("liger_kernel")
    import transformers.models.llama.modeling_llama as modeling
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spin_lite.config import LoraSettings
    from spin_lite.kernels import fused_kernels
    from spin_lite.logprobs import collate, sequence_logprobs
    from spin_lite.model import lora_config
    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                           lora_config(LoraSettings())).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (9, 14, 5)]
    answers = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (7, 3, 12)]
    batch = collate(prompts, answers, 0).to("cuda")
    rope = modeling.apply_rotary_pos_emb

    def score():
        model.zero_grad(set_to_none=True)
        logps, _ = sequence_logprobs(model, batch)
        logps.sum().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach().float(), grads

    plain_logps, plain_grads = score()
    with fused_kernels(model, setting):
        score()  # (compile: the first call compiles)
        logps, grads = score()
    torch.testing.assert_close(logps, plain_logps, rtol=1e-2, atol=1e-2)
    diff = sum(float((grads[n] - plain_grads[n]).norm() ** 2) for n in plain_grads) ** 0.5
    norm = sum(float(plain_grads[n].norm() ** 2) for n in plain_grads) ** 0.5
    assert diff <= 0.05 * norm, (diff, norm)
    assert modeling.apply_rotary_pos_emb is rope
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
