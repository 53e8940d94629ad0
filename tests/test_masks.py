"""Log-prob masks and tokenization on the real SmolLM2 tokenizer and chat template.

SmolLM2 pads with its EOS token (<|im_end|>, id 2): a mask built from token ids would drop the closing EOS
or count padding. The masks here are positional and checked position by position.
"""
import pytest
import torch

from spin_lite.config import DataConfig
from spin_lite.data import Example, encode_example, encode_prompt, encode_response, parse_row
from spin_lite.logprobs import collate, sequence_logprobs


def test_pad_is_eos_on_this_tokenizer(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_prompt_and_response_follow_the_chat_template(tokenizer):
    """prompt_ids + response_ids is exactly what the template renders for the whole conversation
    (up to the template's newline after <|im_end|>): generation and training see the same text."""
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    prompt = encode_prompt(tokenizer, chat)
    response = encode_response(tokenizer, "In short: scattering.")
    full_text = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": "In short: scattering."}],
                                              tokenize=False)
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert full[: len(prompt) + len(response)] == prompt + response
    assert tokenizer.decode(full[len(prompt) + len(response):]) == "\n"
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("text", ["Hello there.", "Hello there.<|im_end|>", "Hello there. <|im_end|>\n"])
def test_exactly_one_eos(tokenizer, text):
    ids = encode_response(tokenizer, text)
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[:-1]) == "Hello there."


def test_multi_turn_last_assistant_is_the_response():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ex = parse_row(row, 0, DataConfig())
    assert ex.response == "d"
    assert [m["content"] for m in ex.prompt] == ["a", "b", "c"]


def test_truncation_keeps_prompt_end_and_cuts_response(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(30))
    ex = Example(0, [{"role": "user", "content": long_prompt}], "one two three " * 60)
    cfg = DataConfig(max_prompt_length=64, max_length=200)
    full_prompt = encode_prompt(tokenizer, ex.prompt)
    assert 64 < len(full_prompt) < 200
    enc = encode_example(ex, tokenizer, cfg)
    assert enc.prompt_truncated and enc.prompt_ids == full_prompt[-64:]
    assert enc.response_truncated and len(enc.response_ids) == 200 - 64
    assert tokenizer.eos_token_id not in enc.response_ids  # a cut response has no EOS


def test_collate_mask_positions(tokenizer):
    p1 = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    r1 = encode_response(tokenizer, "Hello, nice to meet you.")
    p2 = encode_prompt(tokenizer, [{"role": "user", "content": "Name a colour, please."}])
    r2 = encode_response(tokenizer, "Red.")
    batch = collate([p1, p2], [r1, r2], tokenizer.pad_token_id)
    for i, (p, r) in enumerate([(p1, r1), (p2, r2)]):
        mask = batch.response_mask[i].tolist()
        assert mask == [0] * len(p) + [1] * len(r) + [0] * (batch.input_ids.shape[1] - len(p) - len(r))
        assert batch.input_ids[i, len(p) + len(r) - 1] == tokenizer.eos_token_id  # the EOS is inside the mask
        assert batch.attention_mask[i].sum() == len(p) + len(r)
    # the shorter row is padded with id 2 == EOS, and those positions are outside the mask
    short = 0 if len(p1) + len(r1) < len(p2) + len(r2) else 1
    assert (batch.input_ids[short][batch.attention_mask[short] == 0] == tokenizer.eos_token_id).all()


def test_sequence_logprobs_by_hand(tokenizer, tiny_model_dir):
    """Summed log-probs equal a token-by-token sum over the response, EOS included, prompt and padding not."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p1 = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    r1 = encode_response(tokenizer, "Hello, nice to meet you.")
    p2 = encode_prompt(tokenizer, [{"role": "user", "content": "Name a colour, please."}])
    r2 = encode_response(tokenizer, "Red.")
    batch = collate([p1, p2], [r1, r2], tokenizer.pad_token_id)
    with torch.no_grad():
        total, count = sequence_logprobs(model, batch, chunk=5)
        for i, (p, r) in enumerate([(p1, r1), (p2, r2)]):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            expected = sum(logp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r)))
            assert total[i].item() == pytest.approx(expected, abs=1e-4)
            assert count[i].item() == len(r)
        # dropping the EOS changes the sum by exactly the EOS token's log-prob: it is counted
        no_eos, _ = sequence_logprobs(model, collate([p1], [r1[:-1]], tokenizer.pad_token_id))
        ids = torch.tensor([p1 + r1])
        eos_logp = torch.log_softmax(model(ids).logits[0, -2].double(), -1)[tokenizer.eos_token_id].item()
        assert total[0].item() - no_eos[0].item() == pytest.approx(eos_logp, abs=1e-4)
