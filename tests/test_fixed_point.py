"""SPIN's fixed point: trained on the opponent's own samples as "real" data, the model barely moves.

When the real responses are samples of the opponent p_0, SPIN's optimum is p_0 itself (the expected gradient
at p = p_0 is zero), so one iteration moves the model only by sampling noise; on the human responses to the
same prompts, with the same settings, it moves far more. Drift: KL(p_0 || p_1) per response token over the
whole vocabulary, at 32 fresh samples of p_0 for 16 held-out prompts (examples/fixed_point_check.py's own
functions, which the diagnostic runs on the embedded model).

The tiny model reads characters (printable ASCII, one token each), so every sample's text re-encodes to the
sampled ids and the self-generated rows are exactly the opponent's sequences. Measured with these settings
(112 rows, 54 steps of 2 pairs, lr 3e-4, beta 0.1, sampling at temperature 1), KL ratio self / real per model
seed: with spin_lite's decoder drawing the self rows (as now), seeds 0-3: 0.038 0.018 0.036 0.086; with
transformers' sampler (the same distribution, other draws), seeds 0-14: 0.007 0.030 0.008 0.001 0.056 0.082
0.026 0.016 0.009 0.092 0.003 0.078 0.226 0.041 0.036 (median 0.030, max 0.226; real-data KL 0.17-0.65
nats/token, self 0.0005-0.07). With the opponent sampled at temperature 0.7, top-p 0.9 (sharpened
negatives), seeds 0-4: 0.52 0.58 0.57 0.56 0.58 (self KL 0.21-0.29). Threshold 0.3 between the two; seed 0 is
tested (0.038, and 0.52 sharpened).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import fixed_point_check as fp  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer():
    """One token per printable ASCII character (and newline), ChatML's special tokens, <|im_end|> as EOS and pad:
    any sequence of ids decodes to a text that encodes back to the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # the byte-level alphabet writes space as "Ġ" and newline as "Ċ"; printable ASCII as itself
    chars = ["Ġ", "Ċ"] + [chr(c) for c in range(0x21, 0x7f)]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  additional_special_tokens=specials)
    tok.chat_template = CHATML
    return tok


def char_model(path: Path, seed: int) -> Path:
    """A 2-layer Llama on the character vocabulary whose answers end after ~10 characters, never at once.

    A random model never picks its EOS (1 in 99); here every token embedding carries +0.1 on dimension 0 and
    the EOS's output row reads it, so EOS has a few percent per step, except after a newline (whose dimension
    0 is -0.1), as right after ChatML's generation prompt: answers are short and not empty."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    tok = char_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids("Ċ"), 0] = -0.1
        model.lm_head.weight[tok.eos_token_id, 0] = 0.8
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PROMPT_CHARS, CAP = 40, 16
PROMPT_TOKENS = 59  # ChatML around a 40-character user turn, with the generation prompt
# Every prompt has the same length, so data.max_length = prompt + cap cuts a real response exactly where the
# opponent's generation is cut: a sample cut at the cap is data too, and every pair sums at most 16 tokens.
# 54 steps of 2 pairs at a low rate: Adam moves every weight by about the rate per step whatever the
# gradient's size, so sampling noise walks (~sqrt(steps)) while a real signal adds up (~steps).
SETTINGS = ["data.eval_size=2", "data.val_size=2", f"data.max_prompt_length={PROMPT_TOKENS}",
            f"data.max_length={PROMPT_TOKENS + CAP}", f"generation.max_new_tokens={CAP}", "generation.batch_size=64",
            "train.epochs=1", "train.micro_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.learning_rate=3e-4", "train.stop_when=never", "train.save_every=1000",
            "train.sft_weight=0",  # the pure SPIN loss, whose optimum the theory names (an anchor moves it)
            "train.gradient_checkpointing=false"]


def equal_length_chats() -> list[list[dict]]:
    """The demo data's one-turn chats (128), each prompt cut or padded to 40 characters."""
    return [[{"role": "user", "content": c[0]["content"][:PROMPT_CHARS].ljust(PROMPT_CHARS)}, c[1]]
            for c in fp.chat_rows(fp.DEMO_DATA) if len(c) == 2]


def test_self_generated_data_barely_moves_the_model(tmp_path):
    chats = equal_length_chats()
    model_dir = char_model(tmp_path / "model", seed=0)
    report = fp.fixed_point_check(model_dir, chats[:112], [c[:-1] for c in chats[-16:]] * 2, tmp_path, SETTINGS,
                                  max_new_tokens=CAP, seed=0, keep_cut=True)
    assert report["rows"] >= 108  # nearly every sample can be data (not empty, the same ids)
    assert report["real"]["kl"] > 0.01  # the human responses moved it
    assert report["kl_ratio"] < 0.3, report


def test_the_check_fails_with_sharpened_negatives(tmp_path):
    """The check can fail: an opponent sampled at temperature 0.7, top-p 0.9 is not the model the self rows
    came from, and the "fixed point" moves nearly half as far as on real data."""
    model_dir = char_model(tmp_path / "model", seed=0)
    chats = equal_length_chats()
    report = fp.fixed_point_check(model_dir, chats[:112], [c[:-1] for c in chats[-16:]] * 2, tmp_path,
                                  SETTINGS + ["generation.temperature=0.7", "generation.top_p=0.9"],
                                  max_new_tokens=CAP, seed=0, keep_cut=True)
    assert report["kl_ratio"] > 0.3, report
