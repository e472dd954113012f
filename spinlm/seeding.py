"""Every seed spinlm uses, from one rule: ``seed_for(cfg, purpose, *indices)``.

A seed depends only on the config (``trainer.seed``, and ``rollout.seed_offset`` for the round draws) and on where
in the run it is used (round, epoch, step, rank), never on what ran before: so a resumed run draws exactly what an
uninterrupted one would. The formulas below are fixed: committed results and the resume-equality test depend on
the numbers they give. With s = trainer.seed, o = rollout.seed_offset and R(t) = (s + o) * 1_000_003 + t * 10_007
(the base of round t, counted from 0):

=================  ===================  =======================================================================
purpose            seed                 used for
=================  ===================  =======================================================================
GLOBAL             s                    python / numpy / torch global RNGs (driver and every rank), the LoRA
                                        adapter's initial weights, `spinlm sft` (its batch order and dropout)
ROUND_PROMPTS      R(t) - 1             spin: which training prompts round t uses (data.prompts_per_round)
SPIN_GENERATE      R(t)                 spin: the opponent's samples of round t
SPIN_PAIR_ORDER    R(t) + 1 + epoch     spin: the order of round t's pairs in each epoch
ONLINE_GENERATE    R(t) + step          online_dpo: the samples of a step (step = the global step, not the round)
EPOCH_ORDER        s * 7919 + epoch     online_dpo: the prompt order of each pass over the training set
VLLM_ENGINE        s + rank             the vLLM engine of each rank (its own default sampler; spinlm seeds each
                                        request itself, see spinlm.rollout.hf_rollout.request_seeds)
EVAL_GREEDY        0                    the trainer's greedy val/acc (greedy: the seed changes nothing)
EVAL_SAMPLE        1                    the trainer's val/pass@k draws, the same every round and every run, so
                                        rounds and runs are compared on the same draws (eval.seed defaults to 1:
                                        `spinlm evaluate` draws the same)
=================  ===================  =======================================================================
"""
from __future__ import annotations

GLOBAL = "global"
ROUND_PROMPTS = "round_prompts"
SPIN_GENERATE = "spin_generate"
SPIN_PAIR_ORDER = "spin_pair_order"
ONLINE_GENERATE = "online_generate"
EPOCH_ORDER = "epoch_order"
VLLM_ENGINE = "vllm_engine"
EVAL_GREEDY = "eval_greedy"
EVAL_SAMPLE = "eval_sample"

# the indices each purpose takes, in order
INDICES: dict[str, tuple[str, ...]] = {
    GLOBAL: (), ROUND_PROMPTS: ("round",), SPIN_GENERATE: ("round",), SPIN_PAIR_ORDER: ("round", "epoch"),
    ONLINE_GENERATE: ("round", "step"), EPOCH_ORDER: ("epoch",), VLLM_ENGINE: ("rank",), EVAL_GREEDY: (),
    EVAL_SAMPLE: (),
}


def seed_for(cfg, purpose: str, *indices: int) -> int:
    """The seed of ``purpose`` (one of the names above) at ``indices``, for the run configured by ``cfg``."""
    if purpose not in INDICES:
        raise ValueError(f"seed_for: unknown purpose {purpose!r}; expected one of {', '.join(INDICES)}")
    if len(indices) != len(INDICES[purpose]):
        raise ValueError(f"seed_for({purpose!r}): takes ({', '.join(INDICES[purpose])}), got {indices}")
    seed = cfg.trainer.seed
    if purpose == GLOBAL:
        return seed
    if purpose == EPOCH_ORDER:
        return seed * 7919 + indices[0]
    if purpose == VLLM_ENGINE:
        return seed + indices[0]
    if purpose == EVAL_GREEDY:
        return 0
    if purpose == EVAL_SAMPLE:
        return 1
    round_base = (seed + cfg.rollout.seed_offset) * 1_000_003 + indices[0] * 10_007
    if purpose == ROUND_PROMPTS:
        return round_base - 1
    if purpose == SPIN_GENERATE:
        return round_base
    if purpose == SPIN_PAIR_ORDER:
        return round_base + 1 + indices[1]
    return round_base + indices[1]  # ONLINE_GENERATE


def seed_everything(cfg) -> None:
    """Seed python's, numpy's and torch's global RNGs with the GLOBAL seed (the driver, before anything loads)."""
    import random

    import numpy as np
    import torch  # here, not at the top: the seed rule itself needs no torch

    seed = seed_for(cfg, GLOBAL)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
