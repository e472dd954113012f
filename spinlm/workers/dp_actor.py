"""Log-probs of responses and the micro-batched preference update, on one rank."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spinlm.core_algos import preference_loss
from spinlm.workers.logprobs import pack_sequences, packed_response_logps


@dataclass
class Pairs:
    """Token-level preference pairs: chosen and rejected responses to the same prompt."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: list[int]) -> "Pairs":
        return Pairs([self.prompts[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx])


@dataclass
class LossSettings:
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    dpop_lambda: float = 0.0
    sft_weight: float = 0.0
    length_normalize: bool = False


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


class DataParallelActor:
    """Computes response log-probs and applies preference updates to `model` (plain or FSDP2-sharded)."""

    def __init__(self, model, *, micro_batch_size: int, max_tokens_per_micro_batch: int | None, logprob_chunk_size: int,
                 block_mask: bool = True):
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.chunk = logprob_chunk_size
        self.block_mask = block_mask

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _logps(self, model, prompts, responses):
        batch = pack_sequences(prompts, responses, self.device, block_mask=self.block_mask)
        return packed_response_logps(model, batch, chunk=self.chunk)

    @torch.no_grad()
    def sequence_logps(self, prompts: list[list[int]], responses: list[list[int]], model=None) -> torch.Tensor:
        """SUM of response-token log-probs for each (prompt, response), under `model` (default: the policy). fp32, CPU."""
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        # two sequences per pair in training, so a log-prob pass fits twice micro_batch_size sequences
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        out = torch.empty(len(prompts), dtype=torch.float32)
        for idx in micro_batches(lengths, max_items=2 * self.micro_batch_size, max_tokens=self.max_tokens):
            logps, _ = self._logps(model, [prompts[i] for i in idx], [responses[i] for i in idx])
            out[idx] = logps.float().cpu()
        model.train(was_training)
        return out

    def preference_step(self, pairs: Pairs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, loss: LossSettings,
                        optimizer, *, grad_clip: float, global_pairs: int | None = None) -> dict[str, float]:
        """One optimizer step over `pairs` (split into micro-batches, gradients accumulated).

        Each micro-batch packs its chosen and rejected sequences into ONE forward. The loss is the mean over the
        global batch (global_pairs, for data parallelism), so accumulation gives exactly the full-batch gradient.
        A step whose loss or gradient norm is not finite is skipped (no parameter changes) and reported.
        """
        global_pairs = global_pairs or len(pairs)
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["loss", "pc", "pr", "rc", "rr", "acc", "sft_nll"], 0.0)
        tokens = 0
        lengths = [len(p) * 2 + len(c) + len(r) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected)]
        for idx in micro_batches(lengths, max_items=self.micro_batch_size, max_tokens=self.max_tokens):
            mb = pairs.select(idx)
            logps, lens = self._logps(self.model, mb.prompts + mb.prompts, mb.chosen + mb.rejected)
            k = len(idx)
            lens = lens.to(logps.dtype)
            pc, pr = logps[:k], logps[k:]
            rc, rr = ref_chosen[idx].to(logps.device), ref_rejected[idx].to(logps.device)
            if loss.length_normalize:
                pc, pr, rc, rr = pc / lens[:k], pr / lens[k:], rc / lens[:k], rr / lens[k:]
            losses = preference_loss(pc, pr, rc, rr, beta=loss.beta, loss_type=loss.loss_type,
                                     label_smoothing=loss.label_smoothing, dpop_lambda=loss.dpop_lambda)
            sft_nll = -logps[:k] / lens[:k]  # mean NLL per token of the chosen response
            total = losses.sum() + loss.sft_weight * sft_nll.sum()
            (total / global_pairs).backward()
            with torch.no_grad():
                sums["loss"] += total.item()
                sums["pc"] += pc.sum().item()
                sums["pr"] += pr.sum().item()
                sums["rc"] += rc.sum().item()
                sums["rr"] += rr.sum().item()
                sums["acc"] += ((pc - rc) > (pr - rr)).float().sum().item()
                sums["sft_nll"] += sft_nll.sum().item()
            tokens += int(lens.sum().item()) + 2 * sum(len(p) for p in mb.prompts)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        finite = math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = len(pairs)
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
            "train/grad_norm": float(grad_norm),
            "train/step_skipped": 0.0 if finite else 1.0,
            "train/tokens": float(tokens),
        }
