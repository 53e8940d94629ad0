"""A transformers causal LM as one GGUF file, for llama.cpp and Ollama, written with the `gguf` package alone.

    spin-lite export runs/demo --out exports/demo-gguf --gguf q8_0      # or f16, f32 (spin_lite.export)

What llama.cpp's convert_hf_to_gguf.py does for these models, without a llama.cpp build: tensor names from
gguf's own table (gguf.get_tensor_name_map), the attention q/k rows of Llama-architecture models permuted to
llama.cpp's rotary layout, 1-D tensors (norms, biases) kept in float32, 2-D ones in F16 or Q8_0 (gguf.quants,
bit-exact with ggml), and the tokenizer (GPT-2 style byte-level BPE: tokens, types, merges, special ids, chat
template) in the tokenizer.ggml.* keys. transformers' GGUF loader reads the file back
(`AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)`); tests/test_gguf_export.py compares its
logits with the model's.

Supported: the model types llama, mistral and qwen2 with a byte-level BPE tokenizer (SmolLM2, Llama 3.0,
Qwen2 and 2.5; tested: llama and qwen2). SentencePiece tokenizers (Llama 2, Mistral) and rope scaling (Llama 3.1
and later) are refused with a message rather than written wrong.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

GGUF_TYPES = ("f16", "q8_0", "f32")
"""Tensor types of a GGUF export: f16 (half the size of float32, what llama.cpp converts to by default),
q8_0 (8-bit blocks of 32 with one scale, about a quarter of float32), f32."""
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers model_type -> GGUF architecture (llama.cpp runs Mistral as llama)."""
PRE_TOKENIZERS = {"smollm": "smollm", "qwen2": "qwen2", "qwen2.5": "qwen2", "llama-3": "llama-bpe"}
"""Substring of the base model's name -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre); without one
llama.cpp falls back to its default pre-tokenizer and says so."""


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF; the message says why."""


# One function on purpose: the GGUF header, tokenizer and tensors are written in the order the format reads.
def write_gguf(model, tokenizer, path: Path, qtype: str = "f16", name: str = "model", base_model: str | None = None,
               log=print) -> Path:
    """Write `model` (a transformers causal LM, any float dtype) and `tokenizer` to the GGUF file `path`."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise GGUFExportError(f"GGUF export supports the model types {', '.join(ARCHITECTURES)}; this model is "
                              f"{config.model_type!r}. Export the merged model and convert it with llama.cpp's "
                              "convert_hf_to_gguf.py")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GGUFExportError(f"GGUF export does not write rope scaling ({rope.get('rope_type', rope.get('type'))}); "
                              "convert the merged export with llama.cpp's convert_hf_to_gguf.py")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA if arch == "llama"
                                                              else gguf.MODEL_ARCH.QWEN2])
    writer.add_name(name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "f32": gguf.LlamaFileType.ALL_F32}[qtype])
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, name + " " + (base_model or ""))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp uses token_embd for the output when output.weight is absent
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for the tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        _add_tensor(writer, gguf_name, data, qtype)
    log(f"export: writing {path.name} ({qtype}, {len(state)} tensors)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection, (n_head * head_dim, hidden), from transformers' rotary layout (halves) to
    llama.cpp's (interleaved pairs): convert_hf_to_gguf.py's LlamaModel.permute; transformers undoes it on load."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_tensor(writer, name: str, data: np.ndarray, qtype: str):
    import gguf

    if data.ndim == 1 or qtype == "f32":  # norms and biases stay float32, as llama.cpp converts them
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == "q8_0" and data.shape[-1] % 32 == 0:  # Q8_0 blocks are 32 values of one row
        qt = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _add_tokenizer(writer, tokenizer, vocab_size: int, model_name: str):
    """tokenizer.ggml.*: a byte-level BPE vocabulary padded to the model's embedding rows, with token types
    (control for special tokens, as llama.cpp's converter marks them), merges, special ids and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model, decoder = data.get("model") or {}, data.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
            raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2); this "
                                  "tokenizer is not one (SentencePiece?): convert the merged export with llama.cpp's "
                                  "convert_hf_to_gguf.py")
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)  # merges, ids, chat template
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    pre = next((v for k, v in PRE_TOKENIZERS.items() if k in model_name.lower()), None)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
