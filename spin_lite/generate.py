"""Generation: the opponent answers every prompt, batch by batch, each finished batch saved at once.

Prompts are sorted by length (longest first) so a batch pads little, then cut into batches of
`generation.batch_size`. Batch b is sampled from its own random generator, seeded from b, so a batch
regenerated after a crash gives the same tokens as it would have the first time. The output file holds one
JSON line per response:
    {"batch": b, "key": "train:12", "ids": [...], "truncated": false}
A response ends with the first stop id (kept): the tokenizer's EOS, the ids of the model's generation config
and the chat template's end-of-turn token (`stop_token_ids`); one with none within max_new_tokens is marked
truncated.

Where the time goes, and what this module does about it (numbers: docs/PERFORMANCE.md):
- An unmerged LoRA adds two small matmuls to every linear layer of every decoding step. generate_all
  decodes from a merged copy instead: each LoRA layer's base weight (de-quantized for a 4-bit base) plus
  its delta in one 16/32-bit linear layer, every other tensor shared; the copy is freed when it returns.
- One decoding step reads all the weights whatever the batch size, so several planned batches are decoded
  together, as many rows as fit (`rows_per_pass`); the plan, the seeds and the files stay per batch.
- A finished response leaves the batch: its rows of the KV cache are dropped once a quarter of the batch
  has finished, so the long tail decodes a smaller batch.
- The decoding loop is this module's own (`decode`): prefill with logits of the last position only, then
  one token per step, the logits processed exactly as transformers does (float32, temperature, top-p);
  greedy decoding gives transformers `generate`'s tokens (tests/test_fast_generate.py).
- On a GPU a decoding step of a small model is bound by launching its few hundred kernels, not by the GPU.
  The static engine (`generation.engine`, `decode_static`) preallocates the KV cache for the whole
  answer and records one decoding step (forward and sampling) in a CUDA graph, replayed once a token;
  on a CPU the same static-cache step runs without the graph (tests/test_static_engine.py).
- The static engine always passes an attention mask, and with a mask transformers' sdpa (up to 5.17) repeats the
  keys and values for every query head of a grouped-query model: its decoding steps attend with
  `gqa_decode_attention` instead (generation.decode_attention), each key/value head read once.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GenerationSettings
from .data import end_of_turn_ids
from .state import _confine_write, fault_point, open_append


def plan_batches(prompts: dict[str, list[int]], batch_size: int) -> list[list[str]]:
    """Keys grouped into batches, longest prompts first (ties broken by key, so the plan is stable)."""
    keys = sorted(prompts, key=lambda k: (-len(prompts[k]), k))
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]


def read_generations(path: Path) -> dict[str, dict]:
    """Responses saved in `path` (a missing file is empty; a line cut by a crash is ignored)."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["key"]] = record
    return done


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [len(seqs), longest], each sequence at the right end."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the chat template's end-of-turn token
    (`data.end_of_turn_ids`: Qwen2.5 and Llama-3 end a turn with <|im_end|> / <|eot_id|>, which is not always
    the tokenizer's EOS), and the ids in the model's generation config (`eos_token_id`, an int or a list).
    Sorted, no repeats."""
    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _stop_set(stop_ids: int | list[int]) -> set[int]:
    return {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)


def split_at_eos(new_tokens: list[int], stop_ids: int | list[int]) -> tuple[list[int], bool]:
    """(response ids up to and including the first stop id, truncated?); `stop_ids`: one id or several."""
    stops = _stop_set(stop_ids)
    for n, token in enumerate(new_tokens):
        if token in stops:
            return new_tokens[: n + 1], False
    return new_tokens, True


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], settings: GenerationSettings, eos_id: int | list[int],
                   pad_id: int, seed: int, max_new_tokens: int | None = None, do_sample: bool | None = None):
    """Responses to `prompts` as lists of (ids, truncated), from `model` as it is (no merged copy).

    `eos_id`: the stop id, or a list of them (`stop_token_ids`). `settings.engine` chooses the decoder
    (`engine_for`: under auto a PEFT or 4-bit model decodes with the eager engine)."""
    do_sample = settings.do_sample if do_sample is None else do_sample
    sampling = Sampling(do_sample, settings.temperature, settings.top_p, [0] * len(prompts),
                        [_generator(seed, _device(model))])
    out = {}
    _decoder(engine_for(settings.engine, model), settings)(
        model, prompts, eos_id, pad_id, max_new_tokens or settings.max_new_tokens, sampling,
        lambda i, ids, truncated: out.__setitem__(i, (ids, truncated)))
    return [out[i] for i in range(len(prompts))]


# One function on purpose: plan, skip what is on disk, decode, append each batch as it finishes: the resume
# contract reads top to bottom.
def generate_all(model, tokenizer, prompts: dict[str, list[int]], settings: GenerationSettings, path: Path,
                 seed: int, rank: int = 0, world_size: int = 1, desc: str = "generate",
                 stop_ids: list[int] | None = None, progress=None) -> dict[str, dict]:
    """Generate a response for every prompt not yet in `path`, appending each finished batch to it.

    With `world_size` > 1 this process takes batches rank, rank + world_size, ... and writes only those.
    A response ends at any of `stop_ids` (default: `stop_token_ids(tokenizer, model)`).
    `progress(done, total)` is called with this process's finished batches (state.Progress: progress.json).
    Returns this process's records by key.
    """
    batches = plan_batches(prompts, settings.batch_size)
    mine = [b for b in range(len(batches)) if b % world_size == rank]
    done = read_generations(path)
    # Rewrite the file with complete batches only, dropping a batch half-written by a crash.
    complete = [b for b in mine if all(k in done for k in batches[b])]
    keep = {k for b in complete for k in batches[b]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(done[k]) + "\n" for b in complete for k in batches[b]), encoding="utf-8")
    os.replace(tmp, path)
    done = {k: v for k, v in done.items() if k in keep}

    model.eval()
    todo = [b for b in mine if b not in complete]
    if progress is not None:
        progress(len(complete), len(mine))
    if complete and rank == 0:
        print(f"{desc}: {len(complete)} of {len(mine)} batches already on disk, generating {len(todo)}", flush=True)
    if not todo:
        return done
    # The passes are planned over all of this process's batches, done or not, and a pass with a batch still to do
    # is decoded whole: every batch is decoded in the same company (the same rows, padding and matrix shapes) as
    # in an uninterrupted run, so a resumed run samples the same tokens. Batches already on disk are decoded again
    # with their pass (at most one pass of work a resume) but not written again.
    longest = max(len(prompts[k]) for b in mine for k in batches[b])
    # the merged copy only where it leaves room to decode one planned batch and half as much again
    cuda = _device(model).type == "cuda"
    reserve = settings.batch_size * 3 // 2 * row_bytes(model, longest, settings.max_new_tokens) if cuda else 0
    opponent = merged_copy(model, reserve) or model
    capacity = rows_per_pass(opponent, longest, settings.max_new_tokens, settings.batch_size)
    per_pass = max(1, capacity // settings.batch_size)
    groups = [mine[g:g + per_pass] for g in range(0, len(mine), per_pass)]
    # the engine is chosen for the rows a pass actually holds (128 prompts on a card that holds 512 rows: 128), not
    # for what the card could hold; one engine for every pass, so a resumed run decodes as an uninterrupted one
    rows = max(sum(len(batches[b]) for b in group) for group in groups)
    stops = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
    engine = engine_for(settings.engine, opponent, rows)
    decoder = _decoder(engine, settings)
    if rank == 0:
        print(f"{desc}: {engine} engine, {rows} rows a pass (room for {capacity}), stop ids {stops}", flush=True)
    written = len(complete)
    with open_append(path) as f, tqdm(total=len(mine), initial=len(complete), desc=desc,
                                                       unit="batch", disable=rank != 0) as bar:
        for group in groups:
            if all(b in complete for b in group):
                continue
            keys = [k for b in group for k in batches[b]]
            owners = [n for n, b in enumerate(group) for _ in batches[b]]
            results, left = {}, [len(batches[b]) for b in group]

            def finished(i, ids, truncated):
                nonlocal written
                results[i] = (ids, truncated)
                left[owners[i]] -= 1
                if left[owners[i]]:
                    return
                b = group[owners[i]]
                if b in complete:  # on disk already: decoded again only to keep its pass as it was
                    return
                records = [{"batch": b, "key": keys[j], "ids": results[j][0], "truncated": results[j][1]}
                           for j in range(len(keys)) if owners[j] == owners[i]]
                _confine_write(path)  # each batch: the folder is still the run's own (no link swapped in since)
                f.write("".join(json.dumps(r) + "\n" for r in records))  # one write: a batch lands whole or not
                f.flush()
                os.fsync(f.fileno())
                done.update({r["key"]: r for r in records})
                bar.update(1)
                written += 1
                if progress is not None:
                    progress(written, len(mine))
                fault_point("generate_batch", written)

            device = _device(opponent)
            sampling = Sampling(settings.do_sample, settings.temperature, settings.top_p, owners,
                                [_generator(seed * 100_003 + b, device) for b in group])
            decoder(opponent, [prompts[k] for k in keys], stops, tokenizer.pad_token_id, settings.max_new_tokens,
                    sampling, finished)
    del opponent
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return done


# -- the decoding loop -------------------------------------------------------------------------------
# Above this many rows a pass, auto decodes with the eager engine even where the static one could run. Measured on
# an H200 (bench.gen, Llama-3.2-1B shape, bf16, 128 + 256 tokens, bench/results/nvidia-h200.json): static 7,236
# vs eager 5,034 tok/s at 64 rows, but static 12,009 vs eager 27,662 at 512 rows. Where between the two the
# lines cross is not measured yet.
STATIC_MAX_ROWS = 64


def engine_for(engine: str, model, rows: int | None = None) -> str:
    """"eager" or "static" for decoding from `model`. auto: static on CUDA for a plain model (the merged copy
    generate_all decodes from), eager elsewhere: on a CPU (no launch overhead to save, and the eager engine
    drops finished rows) and for a PEFT or 4-bit model on CUDA (not tried in a CUDA graph yet). Never static
    for a model loaded by the Unsloth backend (spin_lite.model marks it `_spin_lite_unsloth`; a merged copy keeps
    the mark): its forward returns a new KV cache instead of filling the static one in place. Nor for passes of
    more than STATIC_MAX_ROWS rows, where the eager engine measured faster."""
    if engine != "auto":
        return engine
    # a plain model: no LoRA layers (named lora_A, lora_B), no bitsandbytes layers, not Unsloth's
    plain = not any(hasattr(m, "lora_A") or type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                    or getattr(m, "_spin_lite_unsloth", False) for m in model.modules())
    small = rows is None or rows <= STATIC_MAX_ROWS  # (rows: the rows decoded together; None: not known)
    return "static" if _device(model).type == "cuda" and plain and small else "eager"


def _decoder(engine: str, settings: GenerationSettings):
    if engine == "static":
        return functools.partial(decode_static, attention=settings.decode_attention)
    return decode


@torch.no_grad()
def decode(model, prompts: list[list[int]], stop_ids: int | list[int], pad_id: int, max_new_tokens: int, pick,
           on_finished):
    """The eager engine. Continue every prompt until a stop id or `max_new_tokens`; `on_finished(i, new_ids,
    truncated)` is called as row i finishes. `pick` (a `Sampling`, or a function
    `pick(scores [n, V] float32, rows [n] row numbers, active [n] bool)`) chooses the next tokens.
    A dynamic KV cache; finished rows leave the batch (and the cache) once a quarter of it has finished (a
    transformers cache; with a legacy tuple they stay, fed padding). Each step
    continues with the cache the model returned (`_forward`): the one passed in, filled in place, for a transformers
    model; a new one (a legacy tuple) for Unsloth's fast forward."""
    from transformers import DynamicCache

    if isinstance(pick, Sampling):
        pick = pick.pick
    stops = _stop_set(stop_ids)
    device = _device(model)
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate makes them
    logits, cache = _forward(model, ids, mask, positions, DynamicCache(), last_only=True)
    rows = list(range(len(prompts)))  # row number of each line of the batch
    active = [True] * len(rows)  # still generating (a finished row stays until the batch is compacted)
    next_position = positions[:, -1] + 1
    new = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = pick(logits[:, -1].float(), rows, active)
        listed = tokens.tolist()
        for n, (row, token) in enumerate(zip(rows, listed)):
            if active[n]:
                new[row].append(token)
                if token in stops or step == max_new_tokens - 1:
                    active[n] = False
                    on_finished(row, new[row], token not in stops)
        running = sum(active)
        if running == 0:
            break
        # Only a transformers Cache is cut down: Unsloth's fast decoding keeps its own key/value buffers sized to the
        # batch of its first decoding step and reads only the length from the tuple it is given, so there finished
        # rows stay in the batch, fed padding, to the end.
        can_drop = hasattr(cache, "batch_select_indices")
        if (len(rows) - running) * 4 >= len(rows) and can_drop:
            keep = [n for n in range(len(rows)) if active[n]]
            index = torch.tensor(keep, device=device)
            cache = _keep_rows(cache, index)
            tokens, mask, next_position = tokens[index], mask[index], next_position[index]
            rows, active = [rows[n] for n in keep], [True] * len(keep)
        else:
            tokens = tokens.masked_fill(~torch.tensor(active, device=device), pad_id)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        logits, cache = _forward(model, tokens[:, None], mask, next_position[:, None], cache)
        next_position = next_position + 1


def _keep_rows(cache, index: torch.Tensor):
    """The transformers Cache `cache` reduced, in place, to the batch lines `index`."""
    cache.batch_select_indices(index)
    return cache


def decode_static(model, prompts: list[list[int]], stop_ids: int | list[int], pad_id: int, max_new_tokens: int,
                  sampling: Sampling, on_finished, graphs: bool | None = None, attention: str = "auto",
                  bucket: int | None = None):
    """The static engine: what `decode` does, over a KV cache preallocated for prompt + `max_new_tokens`.

    Every tensor a decoding step touches (cache, attention mask, positions, the last tokens, the step
    counter, the pre-drawn uniform numbers, the output table) lives at a fixed address and the step updates
    them in place: forward of the last tokens, their slot of the mask set, sampling (`Sampling.choose`),
    the tokens written to column t of the output table. On CUDA (`graphs` None: on CUDA) that step is
    recorded once in a CUDA graph after two eager warm-up steps and replayed for every later token: one
    launch a token instead of a few hundred. Where recording fails, or would replay wrong tokens (a sliding
    window shorter than the answer: `_no_graph_reason`), the steps run eagerly, with a note. A model that
    returns a new KV cache instead of filling the static one (Unsloth's) is decoded by `decode`, with a note.
    The host reads the new tokens every `STATIC_CHECK_EVERY` steps on CUDA (every step on a CPU) to call
    `on_finished` and stop once every row has ended; finished rows stay in the batch (static shapes) and
    their later tokens are dropped. Greedy tokens equal `decode`'s (tests/test_static_engine.py).
    `attention` (generation.decode_attention): auto decodes Llama/Qwen/Mistral-type models with
    `gqa_decode_attention` (`decode_attention`); sdpa with transformers' own.
    Under gqa_decode_attention a step attends only to the cache slots written so far, rounded up to a multiple of
    `bucket` (DECODE_BUCKET; 0: every slot, as before): on CUDA one graph a bucket, all in one memory pool, so the
    attention reads on average about half the answer's slots fewer (128-token prompts, 256 new: 256 of 384).
    """
    with decode_attention(model, attention):
        _decode_static(model, prompts, stop_ids, pad_id, max_new_tokens, sampling, on_finished, graphs,
                       DECODE_BUCKET if bucket is None else bucket)


@torch.no_grad()
# One function on purpose: the CUDA graph captures one decoding step, so the step's tensors (cache, slots,
# sampling state) must be made and reused in one scope.
def _decode_static(model, prompts: list[list[int]], stop_ids: int | list[int], pad_id: int, max_new_tokens: int,
                   sampling: Sampling, on_finished, graphs: bool | None, bucket: int):
    from transformers import StaticCache

    stops = _stop_set(stop_ids)
    device = _device(model)
    graphs = device.type == "cuda" if graphs is None else graphs
    n = len(prompts)
    ids, prompt_mask = _left_pad(prompts, pad_id)
    width = ids.shape[1]
    # slots [0, width) hold the prompt, slot width + s - 1 the token chosen at step s - 1 (the last one chosen
    # is never fed back); a slot is unmasked when it is written, so no step sees an empty slot
    mask = torch.zeros((n, width + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask.to(device)
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1).to(device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cache = StaticCache(config=config, max_cache_len=width + max_new_tokens)
    logits, returned = _forward(model, ids.to(device), mask, positions, cache, last_only=True)
    if returned is not cache:  # Unsloth's forward: the steps would not see the prompt (no sampling drawn yet)
        print(f"generate: eager engine instead of static: the model returned a new KV cache "
              f"({type(returned).__name__}) instead of filling the static one", flush=True)
        return decode(model, prompts, stop_ids, pad_id, max_new_tokens, sampling, on_finished)
    why = _no_graph_reason(cache, width + max_new_tokens) if graphs else None
    if why:
        print(f"generate: static engine without a CUDA graph ({why})", flush=True)
        graphs = False
    u = sampling.uniforms(max_new_tokens, device)
    out = torch.empty((n, max_new_tokens), dtype=torch.long, device=device)
    out[:, 0] = sampling.choose(logits[:, -1].float(), u[0])
    del logits
    last = out[:, :1].clone()  # the token each row feeds next, [n, 1]
    position = positions[:, -1:] + 1  # its position, [n, 1]
    t = torch.ones(1, dtype=torch.long, device=device)  # the step: column of `out` it writes

    def step():
        mask.index_fill_(1, t + width - 1, 1)
        scores = _forward(model, last, mask, position, cache)[0][:, -1].float()
        tokens = sampling.choose(scores, u.index_select(0, t).squeeze(0))
        out.index_copy_(1, t, tokens[:, None])
        last.copy_(tokens[:, None])
        position.add_(1)
        t.add_(1)

    new = [[] for _ in range(n)]
    done = [False] * n
    checked = 0  # columns of `out` read so far

    def read(upto: int) -> bool:
        """Hand finished rows to on_finished; True when every row has ended."""
        nonlocal checked
        for i, tokens in enumerate(out[:, checked:upto].tolist()):
            if done[i]:
                continue
            for token in tokens:
                new[i].append(token)
                if token in stops:
                    done[i] = True
                    on_finished(i, new[i], False)
                    break
        checked = upto
        return all(done)

    total = width + max_new_tokens
    if getattr(model.config, "_attn_implementation", None) != GQA_DECODE:
        bucket = 0  # only gqa_decode_attention reads the bound: one bucket, the whole cache

    def upto(s: int) -> int:
        """The slots step s attends to: the prompt and the s tokens fed so far, rounded up to a bucket."""
        return min(total, -(-(width + s) // bucket) * bucket) if bucket else total

    every = STATIC_CHECK_EVERY if device.type == "cuda" else 1
    replays, eager = {}, {}  # per bucket: its recorded step; the eager steps run in it so far (warm-up)
    pool = None  # one memory pool for every bucket's graph (made with the first)
    finished = read(1)
    try:
        for s in range(1, max_new_tokens):
            if finished:
                break
            bound = _ATTEND_UPTO[0] = upto(s)  # read by gqa_decode_attention: eagerly, or once as a graph records
            run = replays.get(bound)
            # warm-up: 2 eager steps before the first graph, 1 in each later bucket (its attention's new shapes)
            last_step = min(max_new_tokens - 1, bound - width)  # the last step of this bucket
            if run is None and graphs and eager.get(bound, 0) >= (1 if replays else 2) and last_step > s:
                pool = pool or torch.cuda.graph_pool_handle()
                run = replays[bound] = _record(step, pool)
                if run is None:  # recording failed (said): every later step eagerly
                    graphs = False
            (run or step)()
            if run is None:
                eager[bound] = eager.get(bound, 0) + 1
            if (s + 1) % every == 0 or s == max_new_tokens - 1:
                finished = read(s + 1)
    finally:
        _ATTEND_UPTO[0] = None
    for i in range(n):
        if not done[i]:
            on_finished(i, new[i], True)


# -- the static engine's decode attention ------------------------------------------------------------------
GQA_DECODE = "spin_lite_gqa_decode"  # its name in transformers' AttentionInterface and AttentionMaskInterface
DECODE_BUCKET = 64  # cache slots: a static decoding step attends to the slots written so far, rounded up to this
_ATTEND_UPTO: list[int | None] = [None]  # that bound for the step running (or recording) now; None: every slot
# models whose attention is sdpa over rotary queries and keys, nothing more (no soft-capping, no sinks, no bias)
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def gqa_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' sdpa attention (same arguments, same result), with a one-position query computed without
    repeating keys and values: the G query heads that share a key/value head become G query rows of that head
    ([B, H, 1, D] -> [B, Hkv, G, D]), so one SDPA call reads each head's keys and values once, and a [B, 1, 1, L] mask
    broadcasts over heads and rows. With a mask, transformers' sdpa up to 5.17 repeats keys and values G-fold (and
    CUDA's flash kernel takes no mask): at 512 rows x 384 slots of Llama-3.2-1B that is most of a decoding step's
    memory traffic (../shared/GPU_LEVERS.md). Newer transformers pack the heads this way themselves (pack_gqa).
    A prompt (several positions), a model without grouped heads or a per-head mask go to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    upto = _ATTEND_UPTO[0]  # the static engine's bucket: the slots past it are unwritten (and masked)
    if upto is not None and length == 1 and attention_mask is not None and key.shape[2] > upto:
        key, value, attention_mask = key[:, :, :upto], value[:, :, :upto], attention_mask[..., :upto]
    mask = attention_mask
    if (length != 1 or kv_heads == heads or heads % kv_heads or (mask is not None and mask.shape[1] != 1)
            or any(kwargs.get(k) is not None for k in ("softcap", "sinks", "s_aux", "position_bias"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def decode_attention(model, setting: str = "auto"):
    """Within the block, `model` attends with `gqa_decode_attention` where `setting` is auto and the model is of a
    GQA_MODEL_TYPES type with grouped heads and transformers' sdpa attention; its own attention again after. Where
    transformers refuses the switch, the model keeps its attention, with a note."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 0)
    grouped = (getattr(config, "num_key_value_heads", None) or heads) < heads
    before = getattr(model.config, "_attn_implementation", None)
    if setting != "auto" or getattr(config, "model_type", None) not in GQA_MODEL_TYPES or not grouped \
            or before != "sdpa":
        yield
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(GQA_DECODE, gqa_decode_attention)
        AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)  # the masks sdpa gets
        model.set_attn_implementation(GQA_DECODE)
    except Exception as e:  # noqa: BLE001 - an older transformers without the interface: decode with sdpa
        print(f"generate: transformers' sdpa attention for decoding ({type(e).__name__}: {str(e)[:200]})", flush=True)
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _no_graph_reason(cache, length: int) -> str | None:
    """Why a decoding step over the StaticCache `cache`, holding `length` tokens at most, must not be recorded in
    a CUDA graph; None where it may be.

    A sliding-window layer (transformers' StaticSlidingWindowLayer: Mistral-7B-v0.1, Phi-3, Gemma-2/3, Qwen2 with
    use_sliding_window; StaticCache makes one for every sliding or chunked layer of the config) whose window is
    shorter than `length` keeps the tokens it holds in a Python int (`cumulative_length_int`) that chooses its update
    branch and the attention mask's offset: a graph would replay the step with the value it had when recorded, and
    give wrong tokens. Within the window that int changes neither, so the step records safely."""
    import transformers.cache_utils as cache_utils

    # the class is StaticSlidingWindowLayer in transformers 5, SlidingWindowLayer in 4.5x; is_sliding on either
    kinds = tuple(k for k in (getattr(cache_utils, "StaticSlidingWindowLayer", None),
                              getattr(cache_utils, "SlidingWindowLayer", None)) if k is not None)
    for layer in cache.layers:
        window = getattr(layer, "max_cache_len", 0)  # its slots: min(window, length)
        sliding = isinstance(layer, kinds) or getattr(layer, "is_sliding", False)
        if sliding and window < length:
            return f"a sliding-window layer holds {window} tokens, fewer than the {length} of prompt and answer"
    return None


def _record(step, pool=None):
    """`step` recorded in a CUDA graph (in the memory `pool` shared with the other buckets' graphs: safe, as they
    replay one at a time and keep nothing between steps but the engine's own tensors), as a function replaying it;
    None where it cannot be recorded. Recording runs nothing, so the step's in-place updates happen only at each
    replay."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            step()
    except Exception as e:  # noqa: BLE001 - any failure to record means: decode eagerly, and say so
        torch.cuda.synchronize()
        print(f"generate: static engine without a CUDA graph ({type(e).__name__}: {str(e)[:300]})", flush=True)
        return None
    return graph.replay


def _forward(model, ids, mask, positions, cache, last_only: bool = False) -> tuple[torch.Tensor, object]:
    """(logits, the KV cache to continue with). A transformers model fills `cache` in place and returns it;
    Unsloth's fast forward drops an empty cache, builds its own and returns that (a legacy tuple), so the
    returned cache is the one to pass next (`cache` where the model returns none)."""
    name = _cache_argument(model)
    # return_dict: Unsloth's one-token decoding branch returns a bare tuple unless it is asked (seen on an H200,
    # unsloth 2026.10.9: "'tuple' object has no attribute 'logits'")
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True,
                  **{name: cache})
    out = None
    if last_only:
        try:  # the logits of the last position only: [B, 1, V], not [B, T, V]
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:  # a model whose forward has no logits_to_keep
            pass
    if out is None:
        out = model(**kwargs)
    if isinstance(out, tuple):  # (logits, cache, ...) from a forward that ignores return_dict
        logits, returned = out[0], (out[1] if len(out) > 1 else None)
    else:
        logits, returned = out.logits, getattr(out, name, None)  # the output field is named as the argument
    return logits, cache if returned is None else returned


def _cache_argument(model) -> str:
    """`cache` in newer transformers (which deprecates `past_key_values`), else `past_key_values`."""
    import inspect
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@dataclass
class Sampling:
    """How the next token is chosen: argmax, or sampling where row i draws from generators[owners[i]].

    Temperature and top-p are applied as transformers' logits warpers apply them, then one uniform number a
    row picks the token by inverse CDF. A batch draws only from its own generator and only for its own rows,
    so its tokens do not depend on which other batches it is decoded with.
    The eager engine draws each step's numbers as it goes, for the rows still active (`pick`); the static
    engine draws a [max_new_tokens, rows] table once, owner by owner, before decoding (`uniforms`, then
    `choose` inside the recorded step). So for the same seed the two engines do not sample the same tokens in
    general (they agree only while one generator serves every row and no row has finished); both sample from
    the same distribution, each is deterministic for a given seed and engine, and greedy decoding gives the
    same tokens with both.
    """
    do_sample: bool
    temperature: float
    top_p: float
    owners: list[int]
    generators: list

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """[n, V] float32 logits -> [n, V] sampling probabilities (temperature, then top-p)."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            outside = ordered.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            outside[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(outside.scatter(1, order, outside), -float("inf"))
        return torch.log_softmax(scores, -1).exp_()  # on a CPU faster than softmax

    def pick(self, scores: torch.Tensor, rows: list[int], active: list[bool]) -> torch.Tensor:
        """The eager engine's choice for lines `rows` (row numbers) of `scores`; draws for active lines only."""
        if not self.do_sample:
            return scores.argmax(-1)
        probs = self.probabilities(scores)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=scores.device)
        by_owner: dict[int, list[int]] = {}
        for n, row in enumerate(rows):
            if active[n]:
                by_owner.setdefault(self.owners[row], []).append(n)
        for owner, lines in sorted(by_owner.items()):
            # Inverse-CDF sampling: one uniform number a row. torch.multinomial draws one exponential
            # number per vocabulary entry, which on a CPU costs as much as a tenth of a decoding step.
            index = torch.tensor(lines, device=scores.device)
            u = torch.rand((len(lines),), generator=self.generators[owner], device=scores.device)
            tokens[index] = _inverse_cdf(probs[index], u)
        return tokens

    def uniforms(self, steps: int, device) -> torch.Tensor:
        """[steps, rows] uniform numbers for the static engine, each owner's rows from its own generator."""
        table = torch.zeros((steps, len(self.owners)), device=device)
        if self.do_sample:
            for owner in sorted(set(self.owners)):
                index = torch.tensor([i for i, o in enumerate(self.owners) if o == owner], device=device)
                table[:, index] = torch.rand((steps, len(index)), generator=self.generators[owner], device=device)
        return table

    def choose(self, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Every row's next token from [n, V] float32 scores and [n] uniform numbers; no host work, no
        Python branch on values, so it can be recorded in a CUDA graph."""
        if not self.do_sample:
            return scores.argmax(-1)
        return _inverse_cdf(self.probabilities(scores), u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row of [n, V] `probs` where its cumulative sum passes u (in [0, 1)) of the total."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(1)


def sampler(do_sample: bool, temperature: float, top_p: float, owners: list[int], generators: list):
    """The eager engine's `pick` (kept for callers of the earlier interface)."""
    return Sampling(do_sample, temperature, top_p, owners, generators).pick


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -- what to decode from, and how many rows at once ---------------------------------------------------
def merged_copy(model, reserve: int = 0):
    """A plain model computing what the PEFT `model` computes, or None (no LoRA layers, or no room for it).

    Each LoRA layer becomes one linear layer whose weight is the base weight (de-quantized from 4 bits
    where it is quantized) plus the active adapters' deltas, in the compute dtype; every other tensor is
    shared with `model`. Nothing of `model` is changed. On a GPU the copy is made only if it leaves
    `reserve` bytes free, and a margin (2 GiB or a tenth of the card) for the allocator and activations.
    """
    import copy
    import itertools

    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils.integrations import dequantize_module_weight
    except ImportError:
        return None
    if not isinstance(model, PeftModel):
        return None
    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        return None
    for m in layers.values():
        adapters = [a for a in m.active_adapters if a in m.lora_A]
        if (not isinstance(m.get_base_layer(), torch.nn.Linear) or m.merged
                or any(m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) for a in adapters)):
            return None  # DoRA, LoRA biases, embeddings, merged layers: decode from the model itself

    def dtype_of(layer):
        w = layer.weight
        return w.dtype if w.dtype.is_floating_point and w.element_size() > 1 else \
            (getattr(layer, "compute_dtype", None) or torch.bfloat16)

    if torch.cuda.is_available():
        need = sum(m.get_base_layer().in_features * m.get_base_layer().out_features
                   * torch.finfo(dtype_of(m.get_base_layer())).bits // 8 for m in layers.values())
        free, total = _cuda_memory(_device(model))
        if need + reserve > free - max(2 << 30, total // 10):
            return None
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    plain = copy.deepcopy(base, shared)  # the modules are copied, their tensors are not
    for name, lora in layers.items():
        layer = lora.get_base_layer()
        dtype = dtype_of(layer)
        weight = dequantize_module_weight(layer).to(dtype)
        for adapter in (a for a in lora.active_adapters if a in lora.lora_A and not lora.disable_adapters):
            weight = weight + lora.get_delta_weight(adapter).to(dtype)
        with torch.device("meta"):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    return plain.eval()


def rows_per_pass(model, prompt_length: int, max_new_tokens: int, batch_size: int) -> int:
    """How many rows to decode at once: on a GPU, what a third of the free memory holds (KV cache and
    float32 logits); on a CPU `CPU_ROWS`: a decoding step of a small batch is bound by reading the weights,
    so up to about 64 rows cost little more than 8 (docs/PERFORMANCE.md)."""
    if _device(model).type != "cuda":
        return max(batch_size, CPU_ROWS)
    free, _ = _cuda_memory(_device(model))
    return max(batch_size, min(GPU_MAX_ROWS, int(free // 3 // row_bytes(model, prompt_length, max_new_tokens))))


def row_bytes(model, prompt_length: int, max_new_tokens: int) -> int:
    """Memory one decoded row takes: its KV cache at full length, float32 logits, probabilities and the
    top-p sort, and its share of the prefill's widest activation (the MLP's)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    weight = next(p for p in model.parameters() if p.is_floating_point())
    element = weight.element_size()
    return (2 * c.num_hidden_layers * kv_heads * head_dim * element * (prompt_length + max_new_tokens)
            + 4 * 4 * c.vocab_size
            + 4 * prompt_length * max(c.hidden_size * 4, getattr(c, "intermediate_size", 0) or 0) * element)


def _cuda_memory(device) -> tuple[int, int]:
    """(bytes this process may still allocate, bytes it may use in all), within a per-process fraction
    set with torch.cuda.set_per_process_memory_fraction (how a benchmark stands in for a smaller card)."""
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    if fraction < 1.0:
        total = int(total * fraction)
        free = min(free, total - torch.cuda.memory_allocated(device))
    return free, total


CPU_ROWS = 64
GPU_MAX_ROWS = 512
STATIC_CHECK_EVERY = 16  # decoding steps between reads of the new tokens on CUDA (each read waits for the GPU)
