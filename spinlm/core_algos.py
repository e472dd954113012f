"""The rulebook: pure tensor maths for preference learning. No I/O, no models.

Notation (per pair): pc, pr = policy log-probs of chosen / rejected; rc, rr = the opponent's (reference's).
The log-ratio margin is h = (pc - rc) - (pr - rr); the implicit rewards are beta*(pc - rc) and beta*(pr - rr).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spinlm.choices import LOSS_TYPES


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses, shape [pairs], unreduced.

    dpop_lambda > 0 applies the DPOP guard (Pal et al. 2024) to every loss type: h -> h - lambda*relu(rc - pc),
    so lowering the chosen response's log-prob below the opponent's is penalised instead of rewarded.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if dpop_lambda:  # shifting the chosen log-ratio shifts h by the same amount, for every loss type
        chosen_ratio = chosen_ratio - dpop_lambda * torch.relu(-chosen_ratio)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":  # DPO; label_smoothing > 0 is conservative DPO (cDPO)
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "robust":  # Chowdhury et al. 2024: unbiased under label-flip probability eps
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exponential":
        return torch.exp(-beta * h)
    if loss_type == "sppo_hard":  # SPPO with hard labels (TRL): chosen's log-ratio -> 1/(2 beta), rejected's -> -1/(2 beta)
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "bco_pair":  # BCO on pairs with the reward shift delta fixed at 0 (TRL keeps a running mean)
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if loss_type == "sft":  # no preference term (TRL's "sft" loss type): only algorithm.sft_weight's NLL on chosen
        return torch.zeros_like(h)
    raise ValueError(f"algorithm.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of a flat [T] tensor per segment id (for packed sequences), accumulated and returned in float64 (a
    1000-token sum in fp32 is off by ~1e-6 relative). Positions with id -1 are ignored."""
    keep = segment_ids >= 0
    out = values.new_zeros(num_segments, dtype=torch.float64)
    return out.index_add(0, segment_ids[keep], values[keep].to(torch.float64))


@dataclass
class RewardPairs:
    """Pairs chosen from scored samples: indices into the flat list of samples."""

    chosen: list[int]
    rejected: list[int]
    prompt_ids: list  # the prompt id of each pair
    ties_dropped: int


def pair_by_reward(prompt_ids: list, scores: list[float], *, min_margin: float = 0.0) -> RewardPairs:
    """Online-DPO pairing: for every prompt id, its highest-scored sample is chosen and its lowest rejected.

    Samples are grouped by prompt id, never by position in the batch, so pairs never mix prompts. A prompt gives a
    pair only when best - worst > 0 and >= min_margin (algorithm.min_reward_margin); otherwise it is a tie, counted
    in ties_dropped. A prompt with a single sample gives no pair either (and is not a tie).
    """
    if len(prompt_ids) != len(scores):
        raise ValueError(f"pair_by_reward: {len(prompt_ids)} prompt ids but {len(scores)} scores")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"pair_by_reward: score of sample {bad[0]} is {scores[bad[0]]}; scores must be finite")
    groups: dict = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    chosen, rejected, pids, ties = [], [], [], 0
    for pid, idx in groups.items():
        if len(idx) < 2:
            continue
        best = max(idx, key=lambda i: scores[i])  # max/min keep the first on equal scores: deterministic
        worst = min(idx, key=lambda i: scores[i])
        gap = scores[best] - scores[worst]
        if gap <= 0 or gap < min_margin:
            ties += 1
            continue
        chosen.append(best)
        rejected.append(worst)
        pids.append(pid)
    return RewardPairs(chosen, rejected, pids, ties)


def apply_missing_eos_penalty(scores: list[float], ended_with_eos: list[bool], penalty: float) -> list[float]:
    """TRL's missing_eos_penalty: a sample that never emitted EOS loses `penalty` reward."""
    return [s - (0.0 if eos else penalty) for s, eos in zip(scores, ended_with_eos)]
