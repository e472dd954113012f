"""Response log-probs without ever building a [batch, seq, vocab] logits tensor.

Two ideas, both measured in benchmarks/:
- Packing: the sequences of a micro-batch are concatenated into one row; position_ids restart per sequence and a
  block-causal mask keeps attention inside each sequence, so padding costs nothing. (With flash_attention_2 the
  mask is omitted: transformers detects packed sequences from position_ids.) Under sdpa, a plain causal model is
  switched to PACKED_SDPA: one causal attention call per sequence over its own span, where the masked call costs
  rows x L^2 (every block of the mask computed, most of them thrown away).
- Chunked lm-head: only the hidden states that predict a response token go through the output embedding, a
  chunk of tokens at a time (logsumexp + gather of the target); backward recomputes each chunk's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from spinlm.core_algos import segment_sum

PACKED_SDPA = "spinlm_packed_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 packed_spans: tuple[tuple[tuple[int, int], ...], ...] | None = None, **kwargs):
    """transformers' sdpa attention, except on a packed batch (`packed_spans`: per row, the [start, end) column
    span of each sequence): there each sequence attends causally within its span, one is_causal call each, and
    the padding at a row's end gets zeros. The block-causal mask gives the same result at rows x L^2 cost."""
    if packed_spans is None:  # generation, or any forward that is not a packed batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    heads, length = query.shape[1], query.shape[2]
    rows = []
    # unbind and split, not indexing: their backward is one stack / cat, where each slice's backward would
    # write into a zero-filled gradient of the whole tensor
    for spans, q_row, k_row, v_row in zip(packed_spans, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [b - a for a, b in spans]
        pad = length - spans[-1][1]
        q_seq, k_seq, v_seq = (t.split(sizes + [pad] if pad else sizes, dim=1) for t in (q_row, k_row, v_row))
        parts = [F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, scale=scaling,
                                                is_causal=True)[0]  # 4D: the flash kernel; 3D falls back to math
                 for q, k, v, _ in zip(q_seq, k_seq, v_seq, spans)]  # zip with spans: the padding piece is left out
        if pad:
            parts.append(value.new_zeros(heads, pad, value.shape[-1]))
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # generation builds its masks as under sdpa


def use_packed_attention(model) -> bool:
    """Switch an sdpa model to PACKED_SDPA when its attention is plain causal (no sliding window, no logit
    softcap: those need the mask). Generation is unchanged: without packed spans PACKED_SDPA is sdpa."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its wrapped model
    text = base.config.get_text_config()
    if base.config._attn_implementation != "sdpa" or getattr(text, "sliding_window", None) is not None \
            or getattr(text, "attn_logit_softcapping", None) is not None:
        return False
    base.set_attn_implementation(PACKED_SDPA)
    return True


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """One [chunk, vocab] fp32 buffer that every chunk's logits are written into, when the matmul runs in fp32 (no
    autocast): at 64 MiB a chunk, a fresh tensor per chunk costs a fresh mmap and its page faults each time."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) or hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    return hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of one chunk: into `buffer` when there is one, else a new tensor (the autocast dtype's product)."""
    if buffer is None:
        return (h @ weight.T).float()
    return torch.mm(h, weight.T, out=buffer[: h.shape[0]])


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, computed `chunk` rows at a time in fp32.

    Each chunk's logits are worked on in place: the forward keeps the target's logit and the row's logsumexp; the
    backward recomputes the logits and turns them into probabilities (exp(logits - lse)). With
    d logp[t] / d logits = onehot(t) - softmax and the incoming per-row gradient c, the row scale goes onto
    hidden-sized tensors, never vocabulary-sized ones: grad_hidden = c * (W[t] - P @ W) and
    grad_W = index_add(t, c * h) - P.T @ (c * h), the subtractions inside the matmuls (addmm).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        buffer = _logits_buffer(hidden, weight, chunk)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s : s + chunk], weight, buffer)
            target_logit = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            top = logits.amax(1, keepdim=True)
            lse[s : s + chunk] = logits.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))  # logsumexp, in place
            out[s : s + chunk] = target_logit - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        # autograd runs backward outside autocast: remember it, so the backward matmuls use the forward's dtype
        kind = hidden.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.autocast is not None:
            with torch.autocast(device_type=ctx.autocast[0], dtype=ctx.autocast[1]):
                return _ChunkedTokenLogps._backward(ctx, grad_out)
        return _ChunkedTokenLogps._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # no rows (no chunk writes it): zeros
        alloc = torch.empty if hidden.shape[0] else torch.zeros
        grad_weight = alloc(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        buffer = _logits_buffer(hidden, weight, chunk)
        # the products in the forward's compute dtype: under autocast the hidden states are fp32, and in-place addmm_
        # is not autocast (an fp32 GEMM was 24% of an H200 update step)
        compute = ctx.autocast[1] if ctx.autocast is not None else hidden.dtype
        for s in range(0, hidden.shape[0], chunk):
            h, t, c = hidden[s : s + chunk], targets[s : s + chunk], grad_out[s : s + chunk, None]
            probs = _chunk_logits(h, weight, buffer).sub_(lse[s : s + chunk, None]).exp_().to(compute)
            if want_hidden:
                grad_hidden[s : s + chunk] = torch.addmm(weight[t], probs, weight, alpha=-1).mul_(c.to(hidden.dtype))
            if want_weight:
                ch = h * c.to(h.dtype)
                first = s == 0  # beta 0: the first chunk's product overwrites the uninitialised buffer
                if probs.dtype == grad_weight.dtype:
                    grad_weight.addmm_(probs.T, ch, beta=0 if first else 1, alpha=-1)
                elif first:  # bf16/fp16 compute (autocast, or FSDP2's cast parameters): accumulated in fp32
                    grad_weight.copy_(probs.T @ ch).neg_()
                else:
                    grad_weight -= (probs.T @ ch).float()
        if grad_weight is not None:
            grad_weight.index_add_(0, targets, (hidden * grad_out[:, None].to(hidden.dtype)).float())
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


# One chunk's fp32 logits (the forward and backward each hold about two such buffers at once). At 64 MiB a chunk is
# 105 tokens for a 152k vocabulary and the whole response for a 512 one; the matmuls stay large enough to run at
# full speed (benchmarks/bench_update.py), while a fixed 1024 tokens costs 0.6 GB per buffer at 152k.
CHUNK_LOGITS_BYTES = 64 * 2**20


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per lm-head chunk so that one chunk's fp32 logits take about CHUNK_LOGITS_BYTES."""
    return max(16, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """chunk: tokens per lm-head chunk; None picks it from the vocabulary size (auto_chunk_size)."""
    return _ChunkedTokenLogps.apply(hidden, weight, targets, chunk or auto_chunk_size(weight.shape[0]))


@dataclass
class PackedBatch:
    """Sequences packed into rows of at most `row_length` tokens, with where their response tokens are."""

    input_ids: torch.Tensor        # [R, L]
    position_ids: torch.Tensor     # [R, L], restarting at 0 for each sequence
    attention_mask: torch.Tensor | None  # [R, 1, L, L] bool block-causal, or None (flash attention uses position_ids)
    predict_positions: torch.Tensor  # [N] flat positions (row * L + col) whose hidden state predicts a response token
    targets: torch.Tensor          # [N] the response tokens predicted there
    segment: torch.Tensor          # [N] which sequence each target belongs to
    num_sequences: int
    num_tokens: int                # real tokens (no padding)
    spans: tuple[tuple[tuple[int, int], ...], ...] = ()  # per row, the [start, end) columns of each sequence

    def response_lengths(self) -> torch.Tensor:
        return torch.bincount(self.segment, minlength=self.num_sequences)


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: few rows, each holding whole sequences, none longer than capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], device, *, block_mask: bool = True,
                   row_length: int | None = None) -> PackedBatch:
    """Pack (prompt, response) token lists into rows no longer than row_length (default: the longest sequence).

    Under the block mask attention costs rows x L^2, so rows as long as the longest sequence cost what a
    length-sorted padded batch costs in attention (under PACKED_SDPA, which uses `spans`, the sum of each
    sequence's L_i^2 / 2), while the MLP and lm-head see no padding at all. The log-prob of response token j comes
    from the hidden state at j-1.
    """
    for k, (p, r) in enumerate(zip(prompts, responses)):
        if not p or not r:
            raise ValueError(f"pack_sequences: sequence {k} has an empty prompt ({len(p)}) or response ({len(r)})")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(max(lengths), row_length or 0)
    rows = _first_fit(lengths, L)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros(len(rows), L, dtype=torch.long)
    seg_tok = torch.full((len(rows), L), -1, dtype=torch.long)  # -1: padding at a row's end
    predict, targets, segment, spans = [], [], [], []
    for r, members in enumerate(rows):
        col, row_spans = 0, []
        for k in members:
            p, resp = prompts[k], responses[k]
            n = lengths[k]
            ids[r, col : col + n] = torch.tensor(list(p) + list(resp))
            pos[r, col : col + n] = torch.arange(n)
            seg_tok[r, col : col + n] = k
            start = r * L + col + len(p) - 1
            predict.extend(range(start, start + len(resp)))
            targets.extend(resp)
            segment.extend([k] * len(resp))
            row_spans.append((col, col + n))
            col += n
        spans.append(tuple(row_spans))
    mask = None
    if block_mask:
        same = seg_tok[:, :, None] == seg_tok[:, None, :]
        mask = (same & torch.ones(L, L, dtype=torch.bool).tril())
        mask |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax rows
        mask = mask[:, None].to(device)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return PackedBatch(
        input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask,
        predict_positions=as_long(predict), targets=as_long(targets), segment=as_long(segment),
        num_sequences=len(prompts), num_tokens=sum(lengths), spans=tuple(spans),
    )


def packed_response_logps(model, batch: PackedBatch, *, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SUM of response-token log-probs [num_sequences] and response lengths [num_sequences]."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an lm_head with a bias is not supported by the chunked log-prob path")
    mask = batch.attention_mask
    if mask is not None and model.config._attn_implementation == "eager":
        # eager ADDS a ready-made 4D mask to the scores: a bool mask would add 1/0 instead of blocking
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    packed = {"packed_spans": batch.spans} if model.config._attn_implementation == PACKED_SDPA else {}
    hidden = model.base_model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False, **packed
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    token_logps = chunked_token_logps(hidden[batch.predict_positions], head.weight, batch.targets, chunk)
    return segment_sum(token_logps, batch.segment, batch.num_sequences), batch.response_lengths()


class ResponseLogProbs(torch.nn.Module):
    """The causal LM with the packed, chunked log-prob path as its forward.

    Under FSDP2 this wrapper is the root module: calling it unshards the embedding, final norm and lm-head, and
    reduce-scatters their gradients after backward, exactly as calling the model itself would.
    """

    def __init__(self, model, chunk: int | None = None, packed_attention: bool = True):
        super().__init__()
        if packed_attention:
            use_packed_attention(model)
        self.model = model
        self.chunk = chunk

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_response_logps(self.model, batch, chunk=self.chunk)


def padded_response_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """The plain baseline: right-padded batch, full [batch, seq, vocab] logits, log_softmax, gather. For tests and
    benchmarks; the trainer uses the packed path."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
    resp_mask = torch.zeros((len(seqs), T), dtype=torch.float32, device=device)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
        resp_mask[i, len(p) : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (logps * resp_mask[:, 1:]).sum(1)
