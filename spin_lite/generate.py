"""Generation: the opponent answers every prompt, batch by batch, each finished batch saved at once.

Prompts are sorted by length (longest first) so a batch pads little, then cut into batches of
`generation.batch_size`. Batch b is sampled with its own seed, so a batch regenerated after a crash gives
the same tokens as it would have the first time. The output file holds one JSON line per response:
    {"batch": b, "key": "train:12", "ids": [...], "truncated": false}
A response ends with the first EOS (kept); one with no EOS within max_new_tokens is marked truncated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GenerationSettings
from .state import fault_point


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
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def split_at_eos(new_tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    """(response ids up to and including the first EOS, truncated?)."""
    if eos_id in new_tokens:
        return new_tokens[: new_tokens.index(eos_id) + 1], False
    return new_tokens, True


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], settings: GenerationSettings, eos_id: int, pad_id: int,
                   seed: int, max_new_tokens: int | None = None, do_sample: bool | None = None):
    """Responses to `prompts` as lists of (ids, truncated)."""
    from transformers import GenerationConfig

    do_sample = settings.do_sample if do_sample is None else do_sample
    config = GenerationConfig(
        max_new_tokens=max_new_tokens or settings.max_new_tokens, do_sample=do_sample,
        temperature=settings.temperature if do_sample else None, top_p=settings.top_p if do_sample else None,
        top_k=0 if do_sample else None,  # 0 = off: the model's own top_k default must not sneak in
        eos_token_id=eos_id, pad_token_id=pad_id)
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out[:, ids.shape[1]:].tolist()
    return [split_at_eos(tokens, eos_id) for tokens in new]


def generate_all(model, tokenizer, prompts: dict[str, list[int]], settings: GenerationSettings, path: Path,
                 seed: int, rank: int = 0, world_size: int = 1, desc: str = "generate") -> dict[str, dict]:
    """Generate a response for every prompt not yet in `path`, appending each finished batch to it.

    With `world_size` > 1 this process takes batches rank, rank + world_size, ... and writes only those.
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
    if complete and rank == 0:
        print(f"{desc}: {len(complete)} of {len(mine)} batches already on disk, generating {len(todo)}", flush=True)
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(mine), initial=len(complete), desc=desc,
                                                       unit="batch", disable=rank != 0) as bar:
        for b in todo:
            keys = batches[b]
            results = generate_batch(model, [prompts[k] for k in keys], settings, tokenizer.eos_token_id,
                                     tokenizer.pad_token_id, seed=seed * 100_003 + b)
            records = [{"batch": b, "key": k, "ids": ids, "truncated": truncated}
                       for k, (ids, truncated) in zip(keys, results)]
            f.write("".join(json.dumps(r) + "\n" for r in records))  # one write: a batch lands whole or not
            f.flush()
            os.fsync(f.fileno())
            done.update({r["key"]: r for r in records})
            bar.update(1)
            fault_point("generate_batch", len(mine) - len(todo) + todo.index(b) + 1)
    return done

