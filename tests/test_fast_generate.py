"""The fast generation path against transformers `generate`, on a tiny random model with the real tokenizer.

Greedy tokens must be transformers' own: from the model as it is (generate_batch, used by evaluation), and
from the merged copy that generate_all decodes from (compared with transformers on PEFT's own merge of the
same adapter: the same weights). Prompts of different lengths (left padding) and an EOS that some rows
reach early (rows leaving the batch) are part of every comparison. Both decoding engines (eager: dynamic KV
cache; static: preallocated KV cache, the step a CUDA graph on a GPU) are held to the same tokens; more on the
static engine in tests/test_static_engine.py.
Run alone: .venv/bin/python -m pytest -q tests/test_fast_generate.py
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from spin_lite import generate as gen
from spin_lite.config import GenerationSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from spin_lite.config import ModelConfig
    from spin_lite.model import embedded_model_dir, load_tokenizer
    return load_tokenizer(ModelConfig(name=str(embedded_model_dir())))


@pytest.fixture(scope="module")
def tiny(tok):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    """Nine chat prompts of the demo data, of different lengths."""
    from spin_lite.data import encode_prompt
    rows = [json.loads(l) for l in (REPO / "examples" / "data" / "demo_sft.jsonl").read_text().splitlines()[:9]]
    out = []
    for n, row in enumerate(rows):
        chat = row["messages"][:-1] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        out.append(encode_prompt(tok, chat)[: 14 + 3 * n])  # cut differently: every length differs
    assert len({len(p) for p in out}) == len(out)
    return out


@pytest.fixture(scope="module")
def peft_model(tiny):
    """The tiny model with a LoRA adapter whose B matrices are not zero (so merging it changes the weights)."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model.eval()


def hf_greedy(model, prompts, eos_id, pad_id, max_new):
    from transformers import GenerationConfig
    ids, mask = gen._left_pad(prompts, pad_id)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [gen.split_at_eos(row, eos_id) for row in out[:, ids.shape[1]:].tolist()]


def early_eos(reference, max_new) -> int:
    """A token that the greedy continuations produce before the end in some rows: used as EOS, it makes
    those rows finish early (and leave the batch) while the others go on."""
    counts = {}
    for ids, _ in reference:
        for t in set(ids[: max_new // 2]):
            counts[t] = counts.get(t, 0) + 1
    token = max(counts, key=lambda t: (counts[t] < len(reference), counts[t]))
    return token


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("early", [False, True], ids=["full-length", "rows-leave"])
def test_greedy_equals_transformers_generate(tiny, tok, prompts, early, engine):
    max_new = 12
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if early:
        eos = early_eos(hf_greedy(tiny, prompts, eos, pad, max_new), max_new)
    expected = hf_greedy(tiny, prompts, eos, pad, max_new)
    settings = GenerationSettings(max_new_tokens=max_new, do_sample=False, engine=engine)
    got = gen.generate_batch(tiny, prompts, settings, eos, pad, seed=0)
    assert got == expected
    if early:
        assert any(not t and len(ids) < max_new for ids, t in got) and any(t for _, t in got)


class NewCacheEachCall(torch.nn.Module):
    """Unsloth's fast forward as the decoders see it (unsloth/models/llama.py): an empty cache it is given is
    dropped (None: the model builds its own), and the cache it returns is a new object, a legacy tuple
    ((keys, values) a layer), the only form it reads back on the next call. Nothing is filled in place. And, as
    its one-token decoding branch does, it returns a bare tuple (logits, cache) unless asked for return_dict; and
    its decoding buffers keep the batch of the first decoding step (rows may not leave the batch)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.decode_batch = None  # Unsloth sizes its own decoding buffers to the first decoding step's batch

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                logits_to_keep=0, return_dict=None):
        from types import SimpleNamespace

        from transformers import DynamicCache
        if isinstance(past_key_values, tuple):
            if input_ids.shape[1] == 1:  # a decoding step: the batch must stay that of the first one
                self.decode_batch = self.decode_batch or input_ids.shape[0]
                assert input_ids.shape[0] == self.decode_batch, "Unsloth's buffers hold the first step's batch"
            past_key_values = DynamicCache(past_key_values)
        else:
            assert past_key_values.get_seq_length() == 0, "a transformers Cache is only ever passed empty"
            past_key_values = None
        name = gen._cache_argument(self.inner)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=logits_to_keep, **{name: past_key_values})
        legacy = tuple((layer.keys, layer.values) for layer in getattr(out, name).layers)
        if past_key_values is not None and input_ids.shape[1] == 1 and not return_dict:
            return out.logits, legacy
        return SimpleNamespace(logits=out.logits, past_key_values=legacy)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_model_returning_a_new_cache_decodes_the_same_greedy_tokens(tiny, tok, prompts, engine, capsys):
    """A model that builds its own KV cache and returns it (Unsloth's) gets transformers' greedy tokens: the eager
    engine continues with the returned cache (rows leaving the batch: the legacy tuple is cut down); the static
    engine, which needs its own cache filled in place, sees that at the prompt and hands over to the eager one."""
    max_new, pad = 12, tok.pad_token_id
    reference = hf_greedy(tiny, prompts, tok.eos_token_id, pad, max_new)
    eos = [early_eos(reference, max_new)]
    for ids, _ in reference:  # more stop ids, until at least a quarter of the rows end early
        if sum(any(t in eos for t in r[: max_new - 2]) for r, _ in reference) * 4 >= len(reference):
            break
        if not any(t in eos for t in ids[: max_new - 2]) and ids[2] not in eos:
            eos.append(ids[2])
    expected = hf_greedy(tiny, prompts, eos, pad, max_new)
    settings = GenerationSettings(max_new_tokens=max_new, do_sample=False, engine=engine)
    got = gen.generate_batch(NewCacheEachCall(tiny), prompts, settings, eos, pad, seed=0)
    assert got == expected
    assert any(not t and len(ids) < max_new for ids, t in got) and any(t for _, t in got)
    # enough rows end early for the eager engine to compact a transformers cache (a quarter): a legacy tuple's
    # rows must stay (NewCacheEachCall refuses a smaller batch, as Unsloth's buffers would)
    assert sum(len(ids) < max_new - 1 for ids, _ in got) * 4 >= len(got)
    handed_over = "eager engine instead of static: the model returned a new KV cache (tuple)" in capsys.readouterr().out
    assert handed_over == (engine == "static")


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_generate_all_decodes_the_merged_adapter(peft_model, tok, prompts, tmp_path, monkeypatch, engine):
    """generate_all decodes from a merged copy, several planned batches at once: greedy tokens equal
    transformers `generate` on PEFT's own merge of the adapter, and the PEFT model is left as it was."""
    max_new = 10
    merged = copy.deepcopy(peft_model).merge_and_unload()
    eos = early_eos(hf_greedy(merged, prompts, tok.eos_token_id, tok.pad_token_id, max_new), max_new)
    expected = hf_greedy(merged, prompts, eos, tok.pad_token_id, max_new)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    keyed = {f"train:{i}": p for i, p in enumerate(prompts)}
    settings = GenerationSettings(max_new_tokens=max_new, do_sample=False, batch_size=2, engine=engine)
    monkeypatch.setattr(gen, "CPU_ROWS", 6)  # 3 planned batches of 2 per pass, the last pass holds 1
    eos_tok = copy.copy(tok)
    eos_tok.eos_token_id = eos
    calls = []
    records = gen.generate_all(peft_model, eos_tok, keyed, settings, tmp_path / "g.jsonl", seed=3,
                               progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert [(records[f"train:{i}"]["ids"], records[f"train:{i}"]["truncated"]) for i in range(9)] == expected
    lines = [json.loads(l) for l in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert sorted(r["batch"] for r in lines) == sorted([0, 0, 1, 1, 2, 2, 3, 3, 4])
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    from peft.tuners.lora import LoraLayer
    assert any(isinstance(m, LoraLayer) for m in peft_model.modules())  # LoRA layers still in place


def test_sampled_batch_does_not_depend_on_its_companions(peft_model, tok, prompts, tmp_path, monkeypatch):
    """Batch b draws from its own generator: decoded alone or with other batches, it gets the same tokens
    (what lets a crashed run regenerate a batch as it would have been)."""
    keyed = {f"train:{i}": p for i, p in enumerate(prompts)}
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, batch_size=3)
    runs = []
    for rows in (3, 9):
        monkeypatch.setattr(gen, "CPU_ROWS", rows)
        path = tmp_path / f"rows{rows}.jsonl"
        runs.append({k: r["ids"] for k, r in gen.generate_all(peft_model, tok, keyed, settings, path, seed=5).items()})
    assert runs[0] == runs[1]
    again = gen.generate_all(peft_model, tok, keyed, settings, tmp_path / "again.jsonl", seed=6)
    assert {k: r["ids"] for k, r in again.items()} != runs[0]  # the seed matters


def test_merged_copy_computes_the_peft_model(peft_model, prompts):
    ids, mask = gen._left_pad(prompts[:3], 0)
    plain = gen.merged_copy(peft_model)
    assert plain is not None and not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits,
                                   peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)


# -- the log-prob path that training and scoring use ------------------------------------------------------
def test_chunked_logprobs_and_gradients_equal_the_full_logits(peft_model, tok, prompts):
    """sequence_logprobs without full-vocabulary logits (response positions only, gradient formed chunk by
    chunk) gives the values and LoRA gradients of the plain full-logits computation."""
    from spin_lite.logprobs import _logprobs_from_full_logits, collate, sequence_logprobs
    responses = [p[-(3 + 2 * i):] + [tok.eos_token_id] for i, p in enumerate(prompts[:4])]
    batch = collate(prompts[:4], responses, tok.pad_token_id)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    results = []
    for fn in (lambda: sequence_logprobs(peft_model, batch, chunk=7),
               lambda: _logprobs_from_full_logits(peft_model, batch, batch.response_mask[:, 1:].bool(), 5)):
        logps, counts = fn()
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        results.append((logps.detach(), counts, [p.grad.clone() for p in params]))
        peft_model.zero_grad(set_to_none=True)
    (fast, fast_n, fast_g), (full, full_n, full_g) = results
    assert fast_n.tolist() == full_n.tolist() == [len(r) for r in responses]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)
    for a, b in zip(fast_g, full_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
