"""The one seeding rule: each purpose gives the numbers the formulas it replaced gave (resume equality and committed
results depend on them), and a purpose asked with the wrong indices is refused."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from spinlm.config import load_config
from spinlm.seeding import (EPOCH_ORDER, EVAL_GREEDY, EVAL_SAMPLE, GLOBAL, INDICES, ONLINE_GENERATE, ROUND_PROMPTS,
                            SPIN_GENERATE, SPIN_PAIR_ORDER, VLLM_ENGINE, seed_for)


def config(seed: int, seed_offset: int):
    return OmegaConf.create({"trainer": {"seed": seed}, "rollout": {"seed_offset": seed_offset}})


# the packaged defaults (trainer.seed=42, rollout.seed_offset=0); numbers worked out by hand from the old formulas:
# round draws (seed + offset) * 1_000_003 + round * 10_007 + k, epoch order seed * 7919 + epoch, vLLM seed + rank
DEFAULT_SEEDS = [
    (GLOBAL, (), 42),
    (ROUND_PROMPTS, (0,), 42_000_125),      # k = -1
    (SPIN_GENERATE, (0,), 42_000_126),      # k = 0
    (SPIN_PAIR_ORDER, (2, 0), 42_020_141),  # k = 1 + epoch
    (SPIN_PAIR_ORDER, (1, 2), 42_010_136),
    (ONLINE_GENERATE, (2, 25), 42_020_165),  # k = the global step
    (EPOCH_ORDER, (0,), 332_598),
    (EPOCH_ORDER, (5,), 332_603),
    (VLLM_ENGINE, (0,), 42),
    (VLLM_ENGINE, (3,), 45),
    (EVAL_GREEDY, (), 0),
    (EVAL_SAMPLE, (), 1),
]


@pytest.mark.parametrize("purpose, indices, expected", DEFAULT_SEEDS)
def test_default_config_seeds(purpose, indices, expected):
    assert seed_for(load_config(), purpose, *indices) == expected


def test_seed_offset_moves_only_the_round_draws():
    cfg = config(seed=7, seed_offset=100)
    assert [seed_for(cfg, ROUND_PROMPTS, 3), seed_for(cfg, SPIN_GENERATE, 3), seed_for(cfg, SPIN_PAIR_ORDER, 3, 1),
            seed_for(cfg, ONLINE_GENERATE, 0, 9)] == [107_030_341, 107_030_342, 107_030_344, 107_000_330]
    # the epoch order, the global RNGs, vLLM's engine and the evaluation draws ignore rollout.seed_offset
    assert [seed_for(cfg, EPOCH_ORDER, 1), seed_for(cfg, GLOBAL), seed_for(cfg, VLLM_ENGINE, 3),
            seed_for(cfg, EVAL_SAMPLE)] == [55_434, 7, 10, 1]


def test_the_old_formulas_over_a_grid():
    for seed, offset in ((0, 0), (42, 0), (3, 5), (123_456, 7)):
        cfg = config(seed, offset)
        base = lambda t, k: (seed + offset) * 1_000_003 + t * 10_007 + k  # noqa: E731  (spin_trainer's old seed_for)
        for t in range(4):
            assert seed_for(cfg, ROUND_PROMPTS, t) == base(t, -1)
            assert seed_for(cfg, SPIN_GENERATE, t) == base(t, 0)
            for epoch in range(3):
                assert seed_for(cfg, SPIN_PAIR_ORDER, t, epoch) == base(t, 1 + epoch)
            for step in range(0, 40, 7):
                assert seed_for(cfg, ONLINE_GENERATE, t, step) == base(t, step)
        for epoch in range(5):
            assert seed_for(cfg, EPOCH_ORDER, epoch) == seed * 7919 + epoch
        for rank in range(4):
            assert seed_for(cfg, VLLM_ENGINE, rank) == seed + rank


def test_wrong_purpose_or_indices_are_refused():
    cfg = config(42, 0)
    with pytest.raises(ValueError, match="unknown purpose 'rollout'; expected one of global, round_prompts"):
        seed_for(cfg, "rollout", 0)
    with pytest.raises(ValueError, match=r"seed_for\('spin_pair_order'\): takes \(round, epoch\), got \(1,\)"):
        seed_for(cfg, SPIN_PAIR_ORDER, 1)
    assert set(INDICES) == {GLOBAL, ROUND_PROMPTS, SPIN_GENERATE, SPIN_PAIR_ORDER, ONLINE_GENERATE, EPOCH_ORDER,
                            VLLM_ENGINE, EVAL_GREEDY, EVAL_SAMPLE}
