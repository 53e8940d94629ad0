"""GGUF export (spin_lite.gguf_export, spin-lite export --gguf): the file loads back with transformers' GGUF loader
and gives the merged model's logits; the tokenizer survives the trip; adapters and cards name their base portably.

Tolerances, max |logits difference| over 2 chat prompts (a tiny Llama whose weights are scaled up so its logits
spread to about 5 in size; a wrong tensor name, q/k permutation or tied output moves them by several units):
  GGUF f32  vs the model:                                1e-4  (measured 0)
  GGUF f16  vs the model:                                3e-2  (measured 8e-3 to 1.6e-2: 11 mantissa bits)
  GGUF q8_0 vs the model:                                0.5   (measured 0.27 to 0.31: 8 bits per block of 32)
  GGUF f16/q8_0 vs the model with its weights rounded
  the same way (torch's f16 cast, gguf's Q8_0 round trip): 1e-4  (measured 0): the layout is exact and the only
                                                                 difference is the rounding itself
  GGUF q8_0 of a run's iteration vs its merged float32 model: 0.5   (measured 0.26)
On the embedded SmolLM2-135M-Instruct (576 wide, 30 layers; logits up to 38 in size), measured once by hand
(write_gguf on the float32 model, 36 prompt tokens): f16 max diff 0.041 with the same argmax at every position,
q8_0 max diff 1.32 with the same argmax at 97% of positions. Loading it back takes over a minute on 2 cores, so
that check runs only with SPIN_LITE_GGUF_EMBEDDED=1 (test_embedded_model_round_trip).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO

PROMPTS = [[{"role": "user", "content": "Why is the sky blue?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]]
TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "q8_0": 0.5}
ROUNDED_TOLERANCE = 1e-4


def _logits(model, tokenizer) -> torch.Tensor:
    out = []
    model.eval()
    for messages in PROMPTS:  # one at a time: no padding to line up
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out.append(model(**ids).logits[0].float())
    return torch.cat(out)


def _rounded(model, qtype: str):
    """A copy of `model` whose 2-D weights went through the same rounding as the GGUF file's tensors."""
    import copy

    import gguf

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim != 2:
                continue
            if qtype == "f16":
                p.copy_(p.half().float())
            elif qtype == "q8_0":
                qt = gguf.GGMLQuantizationType.Q8_0
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qt), qt)))
    return rounded


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings) with a 512-token byte-level BPE trained on
    the demo data and SmolLM2's chat template and special tokens. Reading a GGUF back parses its vocabulary in
    Python, about 15 s for SmolLM2's 49,152 tokens on 2 busy cores; 512 take no time. The weights are scaled up
    so the logits spread (a fresh init gives near-uniform ones, which would hide a wrong layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
             for line in (REPO / "examples/data/demo_sft.jsonl").read_text().splitlines()]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    small = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    pad_token="<|im_end|>", unk_token="<|endoftext|>")
    small.chat_template = tokenizer.chat_template
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(small), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=small.bos_token_id, eos_token_id=small.eos_token_id, pad_token_id=small.pad_token_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    path = tmp_path_factory.mktemp("gguf-small") / "model"
    model.save_pretrained(path)
    small.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(small_vocab_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(small_vocab_model, dtype=torch.float32),
            AutoTokenizer.from_pretrained(small_vocab_model))


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_round_trip_through_transformers_gguf_loader(tiny_llama, tmp_path, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_lite.gguf_export import write_gguf

    model, tokenizer = tiny_llama
    path = write_gguf(model, tokenizer, tmp_path / f"tiny-{qtype}.gguf", qtype, name="tiny-spin",
                      base_model="someone/tiny", log=lambda *a: None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = _logits(model, tokenizer)
    got = _logits(loaded, tokenizer)
    diff = float((got - reference).abs().max())
    exact = float((got - _logits(_rounded(model, qtype), tokenizer)).abs().max())
    print(f"GGUF {qtype}: max |logits diff| {diff:.2e} vs the model (tolerance {TOLERANCE[qtype]}), "
          f"{exact:.2e} vs the model rounded the same way; logits up to {float(reference.abs().max()):.2f}")
    assert diff <= TOLERANCE[qtype]
    assert exact <= ROUNDED_TOLERANCE
    assert diff > 0 or qtype == "f32"
    # the tokenizer: same ids for a rendered chat, same template and special tokens
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == tokenizer.eos_token


def test_qwen2_round_trip(tiny_llama, tmp_path):
    """Qwen2: GGUF architecture qwen2, biases on q/k/v, no q/k permutation."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from spin_lite.gguf_export import write_gguf

    _, tokenizer = tiny_llama
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5) if p.ndim == 1 else p.mul_(8)  # biases away from zero
    path = write_gguf(model, tokenizer, tmp_path / "qwen2-f32.gguf", "f32", log=lambda *a: None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert loaded.config.model_type == "qwen2"
    diff = float((_logits(loaded, tokenizer) - _logits(model, tokenizer)).abs().max())
    print(f"GGUF f32 qwen2: max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE["f32"]


def test_unsupported_models_are_refused(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from spin_lite.gguf_export import GGUFExportError, write_gguf

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(GGUFExportError, match="supports the model types llama, mistral, qwen2; this model is 'gpt2'"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", "f16", log=lambda *a: None)
    assert not (tmp_path / "x.gguf").exists()


# -- from a run: spin-lite export --gguf, and the portable adapter --------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(small_vocab_model, tmp_path_factory):
    from spin_lite.config import load_config
    from spin_lite.run import SpinRun

    from conftest import tiny_settings

    cfg = load_config(None, tiny_settings(small_vocab_model, tmp_path_factory.mktemp("gguf-run") / "run", iterations=1,
                                          **{"eval.enabled": "false", "train.gradient_checkpointing": "false",
                                             "data.max_prompt_length": 192, "data.max_length": 256}))
    SpinRun(cfg, log=lambda *a: None).run()
    return cfg


def test_cli_gguf_export_of_a_run(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_lite.cli import main
    from spin_lite.export import MARKER, merged_model

    out = tmp_path / "gguf"
    assert main(["export", tiny_run.run_dir, "--out", str(out), "--gguf", "q8_0"]) == 0
    files = sorted(p.name for p in out.iterdir())
    gguf_name = f"{Path(tiny_run.model.name).name}-spin-iter0-q8_0.gguf"
    assert files == sorted([gguf_name, "Modelfile", "README.md", MARKER])
    assert (out / "Modelfile").read_text() == f"FROM ./{gguf_name}\n"
    info = json.loads((out / MARKER).read_text())
    assert info["kind"] == "gguf" and info["dtype"] == "q8_0" and info["file"] == gguf_name
    assert "library_name: gguf" in (out / "README.md").read_text()

    model, *_ = merged_model(tiny_run.run_dir, 0, "float32", log=lambda *a: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run.model.name)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
    diff = float((_logits(loaded, tokenizer) - _logits(model, tokenizer)).abs().max())
    with capsys.disabled():
        print(f"GGUF q8_0 export of the run's iteration 0 vs its merged float32 model: max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE["q8_0"]

    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'q4'"
        main(["export", tiny_run.run_dir, "--out", str(tmp_path / "x"), "--gguf", "q4"])
    assert "invalid choice: 'q4'" in capsys.readouterr().err
    assert main(["export", tiny_run.run_dir, "--out", str(tmp_path / "y"), "--gguf", "f16", "--merged"]) == 2
    assert "give --merged or --gguf, not both" in capsys.readouterr().err


def test_embedded_run_exports_a_portable_adapter(tiny_run, tmp_path):
    """An adapter trained on the embedded model names the hub model, not this machine's cache folder."""
    import yaml

    from spin_lite.export import EMBEDDED_HUB_ID, export_adapter

    run = tmp_path / "embedded-run"
    shutil.copytree(tiny_run.run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"] = "embedded"  # as if trained on it: the export reads the config, not the weights
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = export_adapter(run, 0, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {EMBEDDED_HUB_ID}" in front.splitlines() and "library_name: peft" in front
    assert "Q4_1 GGUF" in card and "de-quantized" in card
    assert str(Path.home()) not in (out / "adapter_config.json").read_text()


def test_local_base_keeps_its_absolute_path(tiny_run, tmp_path):
    """A local base folder has no other name: the adapter names it by its absolute path, and the card has no
    base_model key (the Hub would reject a path there)."""
    from spin_lite.export import export_adapter

    out = export_adapter(tiny_run.run_dir, 0, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_run.model.name).resolve())
    assert "base_model:" not in (out / "README.md").read_text()


@pytest.mark.skipif(os.environ.get("SPIN_LITE_GGUF_EMBEDDED") != "1",
                    reason="over a minute on 2 cores; set SPIN_LITE_GGUF_EMBEDDED=1 (numbers in the module docstring)")
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_embedded_model_round_trip(embedded_dir, tmp_path, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_lite.gguf_export import write_gguf

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    path = write_gguf(model, tokenizer, tmp_path / f"smollm2-{qtype}.gguf", qtype, name="SmolLM2-135M-Instruct",
                      base_model="HuggingFaceTB/SmolLM2-135M-Instruct", log=lambda *a: None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference, got = _logits(model, tokenizer), _logits(loaded, tokenizer)
    diff = float((got - reference).abs().max())
    agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    print(f"embedded GGUF {qtype}: max |logits diff| {diff:.3f}, argmax agreement {agree:.2f}")
    assert diff <= {"f16": 0.1, "q8_0": 2.0}[qtype] and agree >= {"f16": 1.0, "q8_0": 0.9}[qtype]
