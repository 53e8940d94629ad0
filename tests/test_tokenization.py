"""The ids that training scores are the ids of the whole rendered conversation, on three tokenizer families.

- SentencePiece: Mistral-7B's own tokenizer file (shipped by the PyPI package mistral-common, read offline)
  with Mistral-Instruct's [INST] template, and with a ChatML template. Text tokenized on its own gets a
  leading word-boundary piece ("▁In") that never follows the prompt ("[/INST]In"): the old standalone
  encoding of the response differed from what the model generates, a free "real vs generated" cue.
- Byte-level BPE with a Llama-3-style template: the turn ends with <|eot_id|>, not with the EOS.
- SmolLM2's tokenizer (ChatML, EOS == <|im_end|>): tests/test_masks.py.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from spin_lite.config import DataConfig, ModelConfig
from spin_lite.data import (Example, encode_conversation, encode_example, encode_prompt, encode_response,
                            end_of_turn_ids, prepare)
from spin_lite.logprobs import collate, sequence_logprobs

DEMO_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo_sft.jsonl"

# Mistral-7B-Instruct-v0.1's chat template: no generation prompt, no space between [/INST] and the answer.
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3's pre-tokenizer split: newlines are one piece whatever follows them ("\n\n" + "Hello" -> "ĊĊ", "Hello")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATS = [
    ([{"role": "user", "content": "Why is the sky blue?"}], "In short: scattering. Hope that helps!"),
    ([{"role": "user", "content": "Name a prime."}], "7, or 11."),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "Quote it."}], '"Hello," she said.\nThen: (done).'),
    ([{"role": "user", "content": "Say hi."}], " Hi there!"),
]


def full_ids(tokenizer, messages, response):
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    """Mistral-7B's SentencePiece tokenizer (32,000 pieces) as a transformers tokenizer, legacy settings."""
    from transformers import LlamaTokenizer
    package = importlib.util.find_spec("mistral_common")  # found, not imported: only its data file is needed
    assert package is not None, "pip install 'spin-lite[dev]' (mistral-common ships the tokenizer file)"
    source = Path(package.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    path = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(source, path / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(path, legacy=True)
    tokenizer.chat_template = INST_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral(mistral_dir):
    """Shared by the tests of this module: a test that changes it loads its own (`mistral_dir`)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(mistral_dir)


@pytest.mark.parametrize("messages, response", CHATS)
def test_sentencepiece_inst_scored_ids_are_the_rendered_conversation(mistral, messages, response):
    prompt, answer = encode_conversation(mistral, messages, response)
    assert prompt == encode_prompt(mistral, messages)
    assert prompt + answer == full_ids(mistral, messages, response)  # [INST] renders nothing after </s>
    assert answer[-1] == mistral.eos_token_id and answer.count(mistral.eos_token_id) == 1


def test_sentencepiece_standalone_encoding_differs(mistral):
    """What the old code scored: the response tokenized on its own, a word-boundary piece in front."""
    messages, response = CHATS[0]
    answer = encode_response(mistral, response, messages)
    standalone = mistral(response, add_special_tokens=False)["input_ids"] + [mistral.eos_token_id]
    assert mistral.convert_ids_to_tokens(answer[:2]) == ["In", "▁short"]
    assert mistral.convert_ids_to_tokens(standalone[:2]) == ["▁In", "▁short"]
    assert standalone != answer and standalone[1:] == answer[1:]


def test_sentencepiece_chatml_closes_with_im_end(mistral_dir):
    """EOS (</s>) and end of turn (<|im_end|>) differ: the response ends with the template's, once, and the
    template's newline after it is not part of the response."""
    from transformers import AutoTokenizer
    mistral = AutoTokenizer.from_pretrained(mistral_dir)
    mistral.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    mistral.chat_template = CHATML_TEMPLATE
    im_end = mistral.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(mistral) == [mistral.eos_token_id, im_end]
    for messages, response in CHATS:
        for typed in (response, response + "<|im_end|>", response + " <|im_end|>\n"):
            prompt, answer = encode_conversation(mistral, messages, typed)
            full = full_ids(mistral, messages, response.rstrip())
            assert prompt + answer == full[: len(prompt) + len(answer)]
            assert mistral.decode(full[len(prompt) + len(answer):]).strip() == ""
            assert answer[-1] == im_end and answer.count(im_end) == 1 and mistral.eos_token_id not in answer


@pytest.fixture
def llama3_style(tokenizer, tmp_path):
    """SmolLM2's byte-level BPE vocabulary with Llama 3's pre-tokenizer, header and <|eot_id|> tokens, and an
    EOS (<|endoftext|>) that is not the end of turn, as in Llama 3 base tokenizers."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.eos_token, tok.chat_template = "<|endoftext|>", LLAMA3_TEMPLATE
    return tok


def test_llama3_style_closes_with_eot_id(llama3_style):
    tok = llama3_style
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(tok) == [tok.eos_token_id, eot] and tok.eos_token_id != eot
    for messages, response in CHATS:
        for typed in (response, response + "<|eot_id|>", response + "<|endoftext|>"):
            prompt, answer = encode_conversation(tok, messages, typed)
            assert prompt + answer == full_ids(tok, messages, response)
            assert answer[-1] == eot and answer.count(eot) == 1 and tok.eos_token_id not in answer


def test_template_that_breaks_the_prefix_is_refused(tokenizer):
    """SmolLM2's pre-tokenizer reads "\\n\\n" alone as one piece and "\\n\\nHello" as two: with a generation
    prompt ending in "\\n\\n" the prompt's tokens are not a prefix of the conversation's. Refused per row."""
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # a copy: the fixture is shared
    tokenizer.chat_template = CHATML_TEMPLATE.replace("\n'", "\n\n'")  # a blank line after each role
    with pytest.raises(ValueError, match="chat template of .* does not render this conversation"):
        encode_conversation(tokenizer, *CHATS[0])
    rows = [{"prompt": "Hi", "response": "Hello."}, {"prompt": "Yo", "response": "Hey."}]
    with pytest.raises(ValueError, match=r"2 bad row.*\n  - rows rows 0, 1 \(2 rows\): the chat template"):
        prepare(rows, tokenizer, DataConfig(), "rows")


def test_sentencepiece_truncation_keeps_prompt_end_and_cuts_response(mistral):
    ex = Example(0, [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}], "one two three " * 60)
    enc = encode_example(ex, mistral, DataConfig(max_prompt_length=64, max_length=200))
    assert enc.prompt_truncated and enc.prompt_ids == encode_prompt(mistral, ex.prompt)[-64:]
    assert enc.response_truncated and len(enc.response_ids) == 200 - 64
    assert mistral.eos_token_id not in enc.response_ids


def test_tiny_llama_on_mistral_vocab_scores_the_rendered_conversation(mistral_dir):
    """Through the package's own loading, checking and collating: each row's summed response log-prob is the
    sum over the rendered conversation's tokens after the prompt, computed by hand on a tiny Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from spin_lite.model import load_tokenizer
    tok = load_tokenizer(ModelConfig(name=str(mistral_dir)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).eval()
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:4]]
    encoded, _ = prepare(rows, tok, DataConfig(), "demo")
    batch = collate([e.prompt_ids for e in encoded], [e.response_ids for e in encoded], tok.pad_token_id)
    with torch.no_grad():
        total, count = sequence_logprobs(model, batch)
        for i, (row, enc) in enumerate(zip(rows, encoded)):
            ids = full_ids(tok, row["messages"][:-1], row["messages"][-1]["content"])
            assert enc.prompt_ids + enc.response_ids == ids
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            expected = sum(logp[t - 1, ids[t]].item() for t in range(len(enc.prompt_ids), len(ids)))
            assert total[i].item() == pytest.approx(expected, abs=1e-3)
            assert count[i].item() == len(ids) - len(enc.prompt_ids)
