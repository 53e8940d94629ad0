"""Summed log-probabilities of responses given their prompts: the quantity the SPIN loss compares.

A batch holds sequences `prompt + response`, right-padded. Only response tokens are scored: the prompt and
the padding are masked out by position (never by token id: many tokenizers pad with their EOS token, and
the response's closing EOS must be counted).

The full-vocabulary logits are never made for the whole batch: the model body gives the hidden states,
the response positions are picked out of them, and the output layer runs on those a chunk at a time in
float32. When gradients are wanted, each chunk's gradient with respect to its hidden states is formed at
once (softmax minus one-hot, times the output weights) and the chunk's logits are dropped, so the memory
is a [chunk, vocab] float32 block plus [response tokens, hidden] gradients, whatever the vocabulary and
the sequence length: the fused linear-cross-entropy idea of Liger and cut-cross-entropy, in plain torch.
Prompt and padding positions never reach the output layer, which saves its compute for them as well.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA from pinned memory without blocking: a blocking copy waits for every kernel
    queued before it, which would stall the host once a micro batch."""
    if torch.device(device).type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens, 0 for padding."""
    response_mask: torch.Tensor
    """[B, T] 1 where the token belongs to the response (closing EOS included)."""
    picked: torch.Tensor | None = None
    """[N] the positions whose next token is a response token, as flat indices into [B, T] (row x T + position),
    built by `collate` on the host so that the device picks them without boolean indexing (which waits for it)."""
    tokens: int | None = None
    """Real (not padding) tokens of the batch, counted by `collate` on the host (for tokens/s, without a read)."""

    def to(self, device) -> "Batch":
        """The batch on `device` (to_device: without blocking on CUDA)."""
        move = lambda t: None if t is None else to_device(t, device)
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.response_mask), move(self.picked),
                     self.tokens)


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Right-padded batch of `prompt + response` sequences with the response mask."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    response = torch.zeros((len(prompts), length), dtype=torch.long)
    picked = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :n] = 1
        response[i, len(p):n] = 1
        picked.append(torch.arange(i * length + max(len(p), 1) - 1, i * length + n - 1))
    return Batch(ids, attention, response, torch.cat(picked), sum(len(p) + len(r) for p, r in zip(prompts, responses)))


def autocasts(model, setting: str) -> bool:
    """Whether `mixed_precision(model, setting)` autocasts: where the model computes in bfloat16 (its weights, or a
    4-bit base's compute dtype) and `setting` (train.autocast) is always, or auto on CUDA."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    computes = {getattr(m, "compute_dtype", None) for m in model.modules()} - {None}  # bitsandbytes layers
    bfloat16 = torch.bfloat16 in (weights | computes) and torch.float16 not in (weights | computes)
    device = next(model.parameters()).device.type
    return bfloat16 and (setting == "always" or (setting == "auto" and device == "cuda"))


def mixed_precision(model, setting: str = "auto"):
    """A context for the forward and the loss: torch.autocast(bfloat16) where `autocasts(model, setting)`, with
    PEFT's cast of each LoRA layer's input to the adapter's float32 turned off, so the LoRA matmuls run in bfloat16
    on the bfloat16 activations (no float32 copy of every LoRA input, no float32 GEMMs; the weights stay float32,
    autocast reads them as bfloat16, and their gradients come back float32). Elsewhere a context that does nothing:
    float16 models keep float32 adapters and their loss scaling (spin_lite.train.loss_scaler)."""
    stack = contextlib.ExitStack()
    if autocasts(model, setting):
        from peft.helpers import disable_input_dtype_casting
        stack.enter_context(torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16))
        stack.enter_context(disable_input_dtype_casting(model))
    return stack


def sequence_logprobs(model, batch: Batch, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs [B] float32, number of response tokens [B]).

    `chunk` response tokens go through the output layer at a time. Models whose logits are more than
    `output_layer(last hidden state)` (soft-capped or scaled logits), or whose output layer is quantized,
    adapted or trained, take the plain path: full logits, log-softmax a chunk of positions at a time.
    """
    parts = _body_and_head(model)
    mask = batch.response_mask[:, 1:].bool()  # token t is predicted by the hidden state at position t - 1
    if parts is None:
        return _logprobs_from_full_logits(model, batch, mask, chunk)
    body, head = parts
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
    width = hidden.shape[1]
    if batch.picked is not None:  # (index_select: no wait for the device, unlike a boolean mask)
        flat = batch.picked
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)  # [N, H]: the states that predict
        targets = batch.input_ids.reshape(-1).index_select(0, flat + 1)      # response tokens, and those tokens
        rows = flat // width
    else:
        picked, targets, rows = hidden[:, :-1][mask], batch.input_ids[:, 1:][mask], mask.nonzero()[:, 0]
    token_logps = _TokenLogprobs.apply(picked, head.weight, targets, chunk)
    sums = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(-1).to(token_logps.dtype)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T)[target] for each row of h, with its gradient for h formed chunk by chunk in the
    forward pass: d logp / d h = W[target] - softmax(h @ W.T) @ W (W is frozen: no gradient for it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            # log_softmax, not logits - logsumexp: one pass, and on a CPU logsumexp costs 8x as much
            logp = torch.log_softmax((h @ weight.T).float(), dim=-1)
            out[start:start + chunk] = logp.gather(-1, t[:, None]).squeeze(-1)
            if grad is not None:
                probs = logp.exp_()  # in place: the log-probs are not needed any more
                probs[torch.arange(len(t), device=t.device), t] -= 1
                grad[start:start + chunk] = -(probs.to(weight.dtype) @ weight)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None


def _body_and_head(model):
    """(the model's body, its output layer) where logits are just output_layer(body(...)[0]), else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_body, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if get_body is None or get_head is None:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0)
           for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")):
        return None
    body, head = get_body(), get_head()
    if (body is None or body is inner or type(head) is not torch.nn.Linear or head.bias is not None
            or head.weight.requires_grad or not head.weight.is_floating_point()):
        return None
    return body, head


def _logprobs_from_full_logits(model, batch: Batch, mask: torch.Tensor, chunk: int):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   return_dict=True).logits
    logits, targets = logits[:, :-1], batch.input_ids[:, 1:]
    pieces = []
    for start in range(0, logits.shape[1], chunk):
        part = torch.log_softmax(logits[:, start:start + chunk].float(), dim=-1)
        pieces.append(part.gather(-1, targets[:, start:start + chunk, None]).squeeze(-1))
    token_logps = torch.cat(pieces, dim=1)
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


# -- the shared prompt processed once: [prompt | response 1 | response 2 | ...] in one row ----------------------------
@dataclass
class Packed:
    """Responses that share a prompt packed into one row each, [prompt | response 1 | ... | response K], right-padded.

    Each response sees the prompt and itself, never another response (a document mask), and its positions continue
    from the prompt's as if it stood alone, so its log-probs are those of prompt + response on its own, for about
    1/K of the prompt's compute (a SPIN pair: the prompt once instead of twice). Its first token is predicted by the
    prompt's last hidden state, which the prompt computes once for all K."""
    input_ids: torch.Tensor
    """[B, T] token ids."""
    position_ids: torch.Tensor
    """[B, T] the prompt 0..P-1, each response P, P+1, ... (padding: 0)."""
    document: torch.Tensor
    """[B, T] 0 for the prompt, k for response k (1-based), -1 for padding."""
    picked: torch.Tensor
    """[N] flat indices into [B, T] of the hidden states that predict each response token."""
    targets: torch.Tensor
    """[N] the response tokens, in the same order."""
    owner: torch.Tensor
    """[N] row x K + (k - 1): which response each token belongs to."""
    responses: int
    """K: responses a row."""
    tokens: int | None = None
    """The tokens the K sequences prompt + response hold apart (the prompt counted K times): tokens/s stays
    comparable with unpacked scoring and with other trainers."""

    def to(self, device) -> "Packed":
        """The rows on `device` (to_device: without blocking on CUDA)."""
        return Packed(*(to_device(t, device) for t in (self.input_ids, self.position_ids, self.document, self.picked,
                                                       self.targets, self.owner)), self.responses, self.tokens)


def pack(prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int) -> Packed:
    """Row i: prompts[i] (at least one token), then responses[i][0], ..., responses[i][K - 1] (K the same for all)."""
    k = len(responses[0])
    length = max(len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(prompts), length), dtype=torch.long)
    document = torch.full((len(prompts), length), -1, dtype=torch.long)
    picked, targets, owner = [], [], []
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        if not p or len(rs) != k:
            raise ValueError("pack: every row needs a prompt of at least one token and the same number of responses")
        ids[i, :len(p)] = torch.tensor(p)
        positions[i, :len(p)] = torch.arange(len(p))
        document[i, :len(p)] = 0
        start = len(p)
        for n, r in enumerate(rs):
            ids[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
            positions[i, start:start + len(r)] = torch.arange(len(p), len(p) + len(r))
            document[i, start:start + len(r)] = n + 1
            # token j of the response is predicted by the hidden state of token j - 1, the first by the prompt's last
            if r:
                picked += [i * length + len(p) - 1] + list(range(i * length + start, i * length + start + len(r) - 1))
            targets += r
            owner += [i * k + n] * len(r)
            start += len(r)
    return Packed(ids, positions, document, torch.tensor(picked, dtype=torch.long),
                  torch.tensor(targets, dtype=torch.long), torch.tensor(owner, dtype=torch.long), k,
                  sum(k * len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses)))


def document_mask(document: torch.Tensor, implementation: str):
    """The attention mask of packed rows for the model's attention `implementation`: query q sees key kv when
    kv <= q and kv is in the prompt or in q's own response. flex_attention: a BlockMask (blocks of 128, the fully
    masked ones skipped); sdpa: [B, 1, T, T] bool; eager: the same as an additive float mask."""
    def may_attend(b, h, q, kv):
        return (kv <= q) & ((document[b, kv] == 0) | (document[b, kv] == document[b, q]))

    batch, length = document.shape
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask
        return create_block_mask(may_attend, batch, None, length, length, device=document.device)
    positions = torch.arange(length, device=document.device)
    dense = may_attend(torch.arange(batch, device=document.device)[:, None, None], None, positions[None, :, None],
                       positions[None, None, :])[:, None]
    if implementation == "sdpa":
        return dense
    if implementation == "eager":
        return torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    raise ValueError(f"packed sequences need sdpa, eager or flex_attention, not {implementation}")


def hidden_dtype(model) -> torch.dtype:
    """The dtype the model's body computes its states in: its embeddings'."""
    return model.get_input_embeddings().weight.dtype


PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def why_not_packed(model) -> str | None:
    """Why `model` cannot score packed rows (None: it can): its logits must be its output layer of its body's
    states, and its attention one that takes a document mask."""
    if _body_and_head(model) is None:
        return "its logits are not an output layer applied to its body's states"
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if attention not in PACKED_ATTENTION:
        return f"its attention is {attention}, not one of {', '.join(PACKED_ATTENTION)}"
    return None


def packed_logprobs(model, packed: Packed, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [B, K] float32, response tokens [B, K]) of packed rows: what `sequence_logprobs`
    gives for each prompt + response on its own (tests/test_precision.py), with the prompt computed once."""
    parts = _body_and_head(model)
    if parts is None:
        raise ValueError("packed_logprobs needs a model whose logits are its output layer of its body's states")
    body, head = parts
    config = getattr(model, "config", None)
    mask = document_mask(packed.document, getattr(config, "_attn_implementation", None) or "sdpa")  # (why_not_packed)
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():  # (eager's additive mask: the model's dtype)
        mask = mask.to(hidden_dtype(model))
    hidden = body(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                  use_cache=False)[0]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.picked)
    token_logps = _TokenLogprobs.apply(picked, head.weight, packed.targets, chunk)
    rows, k = packed.input_ids.shape[0], packed.responses
    sums = torch.zeros(rows * k, dtype=token_logps.dtype, device=token_logps.device).index_add(0, packed.owner,
                                                                                               token_logps)
    counts = torch.zeros(rows * k, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, packed.owner, torch.ones_like(token_logps))
    return sums.view(rows, k), counts.view(rows, k)
