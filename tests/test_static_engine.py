"""The static decoding engine and the stop ids, on the CPU: the static-cache step that a GPU records in a CUDA
graph runs here eagerly, so what it computes is tested here (that the graph replays it: tests/test_gpu.py).

Run alone: .venv/bin/python -m pytest -q tests/test_static_engine.py
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from spin_lite import generate as gen
from spin_lite.config import GenerationSettings
from test_fast_generate import early_eos, hf_greedy, peft_model, prompts, tiny, tok  # noqa: F401 - fixtures


def test_stop_token_ids_are_the_union_of_eos_config_and_end_of_turn(tok, tiny):
    """SmolLM2's EOS is its end-of-turn token <|im_end|>; a tokenizer whose EOS is another token still stops
    at <|im_end|> when its chat template ends turns with it, and at every id of the model's generation config."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.stop_token_ids(tok) == [im_end] == [tok.eos_token_id]
    other = copy.copy(tok)
    other.eos_token_id = 0  # <|endoftext|>, as a base model's tokenizer has it
    model = copy.copy(tiny)
    model.generation_config = copy.deepcopy(tiny.generation_config)
    model.generation_config.eos_token_id = [5, im_end]
    assert gen.stop_token_ids(other, model) == sorted({0, 5, im_end})
    model.generation_config.eos_token_id = 7  # an int works too
    assert gen.stop_token_ids(other, model) == sorted({0, 7, im_end})
    no_template = copy.copy(other)
    no_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert gen.stop_token_ids(no_template) == [0]


def test_split_at_eos_takes_one_id_or_several():
    assert gen.split_at_eos([4, 5, 6, 7], 6) == ([4, 5, 6], False)
    assert gen.split_at_eos([4, 5, 6, 7], [7, 5]) == ([4, 5], False)
    assert gen.split_at_eos([4, 5, 6, 7], [9]) == ([4, 5, 6, 7], True)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_generation_stops_at_every_stop_id(tiny, tok, prompts, engine):
    """Two stop ids: each row ends at the first of either, as transformers `generate` with a list of EOS ids."""
    max_new, pad = 12, tok.pad_token_id
    reference = hf_greedy(tiny, prompts, tok.eos_token_id, pad, max_new)
    first = early_eos(reference, max_new)
    second = early_eos([(ids, t) for ids, t in reference if first not in ids[: max_new // 2]] or reference, max_new)
    stops = sorted({first, second})
    expected = hf_greedy(tiny, prompts, stops, pad, max_new)
    got = gen.generate_batch(tiny, prompts, GenerationSettings(max_new_tokens=max_new, do_sample=False, engine=engine),
                             stops, pad, seed=0)
    assert got == expected
    assert any(not t and len(ids) < max_new for ids, t in got)


def test_static_sampling_is_per_batch_deterministic_and_resumable(peft_model, tok, prompts, tmp_path, monkeypatch):
    """The static engine keeps generate_all's contract: a batch draws only from its own generator (the same
    tokens decoded alone or with other batches), the same seed gives the same tokens, and a batch regenerated
    after a crash gives what it gave before."""
    keyed = {f"train:{i}": p for i, p in enumerate(prompts)}
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, batch_size=3,
                                  engine="static")
    runs = []
    for rows in (3, 9):
        monkeypatch.setattr(gen, "CPU_ROWS", rows)
        path = tmp_path / f"rows{rows}.jsonl"
        runs.append({k: r["ids"] for k, r in gen.generate_all(peft_model, tok, keyed, settings, path, seed=5).items()})
    assert runs[0] == runs[1]
    # a crash after the first batch: the file keeps it, the rest is generated again
    path = tmp_path / "rows9.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])["batch"]
    path.write_text("".join(l + "\n" for l in lines if json.loads(l)["batch"] == first))
    resumed = gen.generate_all(peft_model, tok, keyed, settings, path, seed=5)
    assert {k: r["ids"] for k, r in resumed.items()} == runs[0]
    other = gen.generate_all(peft_model, tok, keyed, settings, tmp_path / "seed6.jsonl", seed=6)
    assert {k: r["ids"] for k, r in other.items()} != runs[0]  # the seed matters


def test_auto_engine_is_static_only_for_a_plain_model_on_cuda(tiny, peft_model, monkeypatch):
    assert gen.engine_for("auto", tiny) == "eager"  # a CPU
    assert gen.engine_for("static", tiny) == "static" and gen.engine_for("eager", tiny) == "eager"
    monkeypatch.setattr(gen, "_device", lambda model: torch.device("cuda"))
    assert gen.engine_for("auto", gen.merged_copy(peft_model)) == "static"  # what generate_all decodes from
    # passes of many rows decode eagerly: measured faster there on an H200 (STATIC_MAX_ROWS)
    assert gen.engine_for("auto", gen.merged_copy(peft_model), rows=gen.STATIC_MAX_ROWS) == "static"
    assert gen.engine_for("auto", gen.merged_copy(peft_model), rows=gen.STATIC_MAX_ROWS + 1) == "eager"
    assert gen.engine_for("auto", peft_model) == "eager"
    # the Unsloth backend (spin_lite.model marks its base): its forward returns a new cache, never static
    unsloth = copy.deepcopy(peft_model)
    unsloth.get_base_model()._spin_lite_unsloth = True
    assert gen.engine_for("auto", gen.merged_copy(unsloth)) == "eager"  # the merged copy keeps the mark


def test_auto_engine_is_chosen_for_the_rows_in_the_pass_not_the_room_for_them(peft_model, tok, prompts, tmp_path,
                                                                               monkeypatch):
    """9 prompts on a card with room for 512 rows a pass: the pass holds 9 rows, so auto picks static (on CUDA),
    as it would for 9 rows; given the room (512 > STATIC_MAX_ROWS), it picked eager on every large card."""
    chosen = []
    engine_for = gen.engine_for
    monkeypatch.setattr(gen, "CPU_ROWS", 512)
    monkeypatch.setattr(gen, "engine_for", lambda engine, model, rows=None: chosen.append(rows) or engine_for(
        engine, model, rows))
    keyed = {f"train:{i}": p for i, p in enumerate(prompts)}
    gen.generate_all(peft_model, tok, keyed, GenerationSettings(max_new_tokens=2, batch_size=2), tmp_path / "g.jsonl",
                     seed=0)
    assert chosen == [len(prompts)]
    monkeypatch.setattr(gen, "_device", lambda model: torch.device("cuda"))
    assert engine_for("auto", gen.merged_copy(peft_model), chosen[0]) == "static"


def test_static_step_reads_no_empty_cache_slot(tiny, tok, prompts):
    """Without left padding (one prompt), sdpa may drop the attention mask for a one-token query; the static
    cache's empty slots must still be masked, so a lone prompt decodes as transformers decodes it."""
    one = [prompts[-1]]
    expected = hf_greedy(tiny, one, -1, tok.pad_token_id, 10)
    got = gen.generate_batch(tiny, one, GenerationSettings(max_new_tokens=10, do_sample=False, engine="static"),
                             -1, tok.pad_token_id, seed=0)
    assert got == expected


# -- sliding-window models: a CUDA graph would freeze the window's offset ------------------------------------
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _graph_refusal(config, length: int = 30):
    from transformers import StaticCache
    return gen._no_graph_reason(StaticCache(config=config, max_cache_len=length), length)


def test_cuda_graph_is_refused_where_a_sliding_window_is_shorter_than_the_answer():
    """transformers' StaticSlidingWindowLayer counts its tokens in a Python int, which a recorded graph would
    replay frozen; a cache of 30 tokens is recorded only where no sliding layer holds fewer than 30."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    assert _graph_refusal(MistralConfig(sliding_window=4, **SMALL)) == \
        "a sliding-window layer holds 4 tokens, fewer than the 30 of prompt and answer"
    # Qwen2 with use_sliding_window: layers from max_window_layers on slide (here the second of two)
    assert _graph_refusal(Qwen2Config(sliding_window=4, use_sliding_window=True, max_window_layers=1, **SMALL))
    assert _graph_refusal(LlamaConfig(**SMALL)) is None
    assert _graph_refusal(MistralConfig(sliding_window=None, **SMALL)) is None
    assert _graph_refusal(MistralConfig(sliding_window=30, **SMALL)) is None  # the window holds it all: never slides
    assert _graph_refusal(Qwen2Config(sliding_window=4, **SMALL)) is None  # use_sliding_window off, Qwen2.5's default


def test_sliding_window_model_decodes_greedy_tokens_without_a_graph(tok, prompts, monkeypatch, capsys):
    """A Mistral with a 4-token window, prompts of 14-38 tokens, 14 new tokens: the static engine asked to record
    its step (graphs=True, as on CUDA) declines, says why, and decodes transformers' greedy tokens, as the eager
    engine does."""
    from transformers import AutoModelForCausalLM, MistralConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(
        sliding_window=4, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SMALL)).eval()
    max_new, pad = 14, tok.pad_token_id
    eos = early_eos(hf_greedy(model, prompts, tok.eos_token_id, pad, max_new), max_new)
    expected = hf_greedy(model, prompts, eos, pad, max_new)
    assert any(not t for _, t in expected) and any(t for _, t in expected)  # rows end early, others run to the cap

    def record(step):
        raise AssertionError("a sliding-window step must not be recorded in a CUDA graph")
    monkeypatch.setattr(gen, "_record", record)
    out = {}
    sampling = gen.Sampling(False, 1.0, 1.0, [0] * len(prompts), [gen._generator(0, torch.device("cpu"))])
    gen.decode_static(model, prompts, eos, pad, max_new, sampling, lambda i, ids, t: out.__setitem__(i, (ids, t)),
                      graphs=True)
    assert [out[i] for i in range(len(prompts))] == expected
    assert "static engine without a CUDA graph (a sliding-window layer holds 4 tokens" in capsys.readouterr().out
    eager = gen.generate_batch(model, prompts, GenerationSettings(max_new_tokens=max_new, do_sample=False,
                                                                  engine="eager"), eos, pad, seed=0)
    assert eager == expected


# -- the grouped-query decode attention -------------------------------------------------------------------------
def test_gqa_decode_attention_equals_attention_over_repeated_keys_and_values():
    """4 query heads over 2 key/value heads, one query position, a left-padding mask: the same numbers as attention
    with each key/value head repeated for its 2 query heads (what transformers' sdpa computes up to 5.17)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False
    mask[2, ..., :7] = False
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    got, _ = gen.gqa_decode_attention(module, q, k, v, mask, scaling=0.3)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3
    expected = (scores.masked_fill(~mask, -float("inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
    assert got.shape == (3, 1, 4, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_static_engine_decodes_with_grouped_heads_and_transformers_tokens(tiny, tok, prompts, attention, monkeypatch):
    """The tiny Llama (4 query heads, 2 key/value heads), nine prompts of different lengths (left padding), an EOS
    some rows reach early: under decode_attention auto every decoding step of every layer goes through
    gqa_decode_attention, and the greedy tokens are transformers' generate's; sdpa (the A/B switch) never does. The
    model's own attention is back afterwards."""
    calls = []
    original = gen.gqa_decode_attention
    monkeypatch.setattr(gen, "gqa_decode_attention",
                        lambda module, query, *a, **k: calls.append(query.shape[2]) or original(module, query, *a, **k))
    max_new, pad = 12, tok.pad_token_id
    eos = early_eos(hf_greedy(tiny, prompts, tok.eos_token_id, pad, max_new), max_new)
    expected = hf_greedy(tiny, prompts, eos, pad, max_new)
    settings = GenerationSettings(max_new_tokens=max_new, do_sample=False, engine="static", decode_attention=attention)
    assert gen.generate_batch(tiny, prompts, settings, eos, pad, seed=0) == expected
    if attention == "auto":
        assert calls.count(1) >= 2 * (max_new - 1)  # 2 layers, every decoding step
    else:
        assert calls == []
    assert tiny.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bucket", [4, 7])
def test_decoding_attends_to_the_written_slots_rounded_up_to_a_bucket(tiny, tok, prompts, bucket, monkeypatch):
    """With length buckets, each decoding step's attention reads the slots written so far rounded up to a multiple of
    `bucket` (a bucket past the cache's end: the whole cache), and the greedy tokens are still transformers' (left
    padding, rows ending early)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: seen.append(k.shape[-2]) or sdpa(q, k, *a, **kw))
    max_new, pad = 12, tok.pad_token_id
    eos = early_eos(hf_greedy(tiny, prompts, tok.eos_token_id, pad, max_new), max_new)
    expected = hf_greedy(tiny, prompts, eos, pad, max_new)
    seen.clear()
    out = {}
    sampling = gen.Sampling(False, 1.0, 1.0, [0] * len(prompts), [gen._generator(0, torch.device("cpu"))])
    gen.decode_static(tiny, prompts, eos, pad, max_new, sampling, lambda i, ids, t: out.__setitem__(i, (ids, t)),
                      bucket=bucket)
    assert [out[i] for i in range(len(prompts))] == expected
    width = max(map(len, prompts))
    total = width + max_new
    layers = tiny.config.num_hidden_layers
    steps = seen[layers:]  # after the prompt's pass
    assert seen[:layers] == [total] * layers  # the prompt's pass: the whole static cache
    bounds = [min(total, -(-(width + s) // bucket) * bucket) for s in range(1, len(steps) // layers + 1)]
    assert steps == [b for b in bounds for _ in range(layers)]
    assert min(steps) < total  # the early steps read fewer slots than the cache holds
