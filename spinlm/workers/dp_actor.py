"""Log-probs of responses and the micro-batched preference update, on one rank."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from torch.distributed.tensor import DTensor

from spinlm.core_algos import preference_loss
from spinlm.pairs import Pairs
from spinlm.workers.logprobs import pack_sequences


@dataclass
class LossSettings:
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    dpop_lambda: float = 0.0
    sft_weight: float = 0.0
    length_normalize: bool = False
    # The policy still has the opponent's weights (a round's first update): the opponent's log-probs are the
    # policy's own from this very forward, so step 1 gives exactly loss ln 2 and zero rewards, whatever packing the
    # precomputed numbers had.
    reference_is_policy: bool = False


def micro_batches(lengths: list[int], *, max_items: int, max_tokens: int | None) -> list[list[int]]:
    """Split indices into consecutive micro-batches of at most max_items items and (if set) max_tokens tokens."""
    out, cur, cur_tokens = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) == max_items or (max_tokens is not None and cur_tokens + n > max_tokens)):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out


def same_count_on_every_rank(batches: list[list[int]], device: torch.device) -> list[list[int] | None]:
    """Every rank must run as many forwards as the others (FSDP all-gathers the weights in each forward and
    reduce-scatters the gradients in each backward), but a token budget can cut ranks' shards into different
    numbers of micro-batches: a rank with fewer gets padding entries (None), forwards that count for nothing."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batches
    most = torch.tensor([len(batches)], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return batches + [None] * (int(most.item()) - len(batches))


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: the norm over all shards


def _total_norm(tensors) -> float:
    """The 2-norm of all the tensors together (over every shard under FSDP2): finite iff every entry is."""
    tensors = list(tensors)
    if not tensors:
        return 0.0
    return float(_full(torch.nn.utils.get_total_norm(tensors)))


class DataParallelActor:
    """Computes response log-probs and applies preference updates on one rank.

    `module` is a ResponseLogProbs (plain, or the FSDP2 root when sharded); other modules of the same shape (the
    opponent) can be passed to sequence_logps.
    """

    def __init__(self, module, *, micro_batch_size: int, max_tokens_per_micro_batch: int | None, block_mask: bool = True,
                 forward_context=nullcontext):
        self.module = module
        # a context factory entered around each forward (mixed precision, attention backends); backward runs outside
        self.forward_context = forward_context
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.block_mask = block_mask

    @property
    def device(self):
        return next(self.module.parameters()).device

    def _logps(self, module, prompts, responses):
        batch = pack_sequences(prompts, responses, self.device, block_mask=self.block_mask)
        with self.forward_context():
            return module(batch)

    @torch.no_grad()
    def sequence_logps(self, prompts: list[list[int]], responses: list[list[int]], module=None,
                       desc: str | None = None) -> torch.Tensor:
        """SUM of response-token log-probs for each (prompt, response) under `module` (default: the policy). fp32, CPU.
        ``desc``: show a progress bar under that name (None: no bar)."""
        module = module if module is not None else self.module
        was_training = module.training
        module.eval()
        # two sequences per pair in training, so a log-prob pass fits twice micro_batch_size sequences
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        out = torch.empty(len(prompts), dtype=torch.float32)
        bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=desc is None, leave=False)
        batches = micro_batches(lengths, max_items=2 * self.micro_batch_size, max_tokens=self.max_tokens)
        for idx in same_count_on_every_rank(batches, self.device):
            if idx is None:  # padding: the same collectives as the other ranks' forwards, the result unused
                self._logps(module, prompts[:1], responses[:1])
                continue
            logps, _ = self._logps(module, [prompts[i] for i in idx], [responses[i] for i in idx])
            out[idx] = logps.float().cpu()
            bar.update(len(idx))
        bar.close()
        module.train(was_training)
        return out

    def preference_step(self, pairs: Pairs, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                        loss: LossSettings, optimizer, *, grad_clip: float,
                        loss_denominator: float | None = None) -> dict[str, float]:
        """One optimizer step over `pairs` (split into micro-batches, gradients accumulated). The reference's
        log-probs ref_chosen / ref_rejected are not read (may be None) when loss.reference_is_policy.

        Each micro-batch packs its chosen and rejected sequences into ONE forward. Each pair's loss is divided by
        loss_denominator (default: the number of pairs here; under data parallelism, global pairs / world size, since
        FSDP averages gradients over ranks), so accumulation gives exactly the full-batch mean's gradient.
        A step whose loss or gradient norm is not finite is skipped (no parameter changes) and reported.
        """
        loss_denominator = loss_denominator or len(pairs)
        self.module.train()
        optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["loss", "pc", "pr", "rc", "rr", "acc", "sft_nll", "sft_share"], 0.0)
        tokens = 0
        lengths = [len(p) * 2 + len(c) + len(r) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected)]
        batches = micro_batches(lengths, max_items=self.micro_batch_size, max_tokens=self.max_tokens)
        for idx in same_count_on_every_rank(batches, self.device):
            padding = idx is None  # a forward and backward the other ranks also run, of weight 0
            idx = [0] if padding else idx
            mb = pairs.select(idx)
            logps, lens = self._logps(self.module, mb.prompts + mb.prompts, mb.chosen + mb.rejected)
            k = len(idx)
            w = torch.tensor(mb.weights, dtype=logps.dtype, device=logps.device) * (0.0 if padding else 1.0)
            sft_w = w * torch.tensor(mb.sft_mask, dtype=logps.dtype, device=logps.device)
            lens = lens.to(logps.dtype)
            pc, pr = logps[:k], logps[k:]
            if loss.reference_is_policy:
                rc, rr = pc.detach(), pr.detach()
            else:
                rc, rr = ref_chosen[idx].to(logps.device, logps.dtype), ref_rejected[idx].to(logps.device, logps.dtype)
            if loss.length_normalize:
                pc, pr, rc, rr = pc / lens[:k], pr / lens[k:], rc / lens[:k], rr / lens[k:]
            losses = preference_loss(pc, pr, rc, rr, beta=loss.beta, loss_type=loss.loss_type,
                                     label_smoothing=loss.label_smoothing, dpop_lambda=loss.dpop_lambda)
            sft_nll = -logps[:k] / lens[:k]  # mean NLL per token of the chosen response
            total = (w * losses).sum() + loss.sft_weight * (sft_w * sft_nll).sum()
            (total / loss_denominator).backward()
            with torch.no_grad():
                sums["loss"] += total.item()
                sums["pc"] += (w * pc).sum().item()
                sums["pr"] += (w * pr).sum().item()
                sums["rc"] += (w * rc).sum().item()
                sums["rr"] += (w * rr).sum().item()
                sums["acc"] += (w * ((pc - rc) > (pr - rr)).float()).sum().item()
                sums["sft_nll"] += (w * sft_nll).sum().item()
                sums["sft_share"] += sft_w.sum().item()
            if not padding:
                tokens += int(lens.sum().item()) + 2 * sum(len(p) for p in mb.prompts)
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip))
        # the norm above is taken BEFORE clipping; clipping itself can make finite gradients NaN (a NaN grad_clip)
        clipped = _total_norm(p.grad for p in self.module.parameters() if p.grad is not None)
        finite = math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm)) and math.isfinite(clipped)
        params_finite = True
        if finite:
            optimizer.step()
            # finite gradients can still give non-finite weights (an infinite learning rate, an overflow in the
            # optimizer's state): such a step cannot be undone, so it is reported and the run stops unsaved
            params_finite = math.isfinite(_total_norm(p.detach() for p in self.module.parameters()))
        optimizer.zero_grad(set_to_none=True)
        n = max(sum(pairs.weight_list()), 1.0)
        b = loss.beta
        return {
            "loss": sums["loss"] / n,
            "rewards/chosen": b * (sums["pc"] - sums["rc"]) / n,
            "rewards/rejected": b * (sums["pr"] - sums["rr"]) / n,
            "rewards/accuracies": sums["acc"] / n,
            "rewards/margins": b * (sums["pc"] - sums["rc"] - sums["pr"] + sums["rr"]) / n,
            "logps/chosen": sums["pc"] / n,
            "logps/rejected": sums["pr"] / n,
            "logps/ref_chosen": sums["rc"] / n,
            "logps/ref_rejected": sums["rr"] / n,
            "train/sft_nll": sums["sft_nll"] / n,
            "train/sft_share": sums["sft_share"] / n,  # share of pairs whose chosen the SFT term trained on
            "train/grad_norm": float(grad_norm),
            "train/step_skipped": 0.0 if finite else 1.0,
            "train/params_non_finite": 0.0 if params_finite else 1.0,
            "train/tokens": float(tokens),
            "train/pairs": float(sum(pairs.weight_list())),
        }
