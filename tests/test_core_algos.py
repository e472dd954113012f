"""The preference maths: every loss type against hand-computed values, their monotonicity, and reward pairing."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spinlm.core_algos import (
    LOSS_TYPES,
    apply_missing_eos_penalty,
    pair_by_reward,
    preference_loss,
    segment_sum,
)

BETA = 0.5
# Three pairs (pc, pr, rc, rr) with chosen log-ratio cr = pc - rc, rejected log-ratio rj = pr - rr, h = cr - rj:
#   pair 0: cr = -1 - (-1.5) =  0.5, rj = -2 - (-1.5) = -0.5, h =  1   (policy prefers chosen a little)
#   pair 1: cr = -3 - (-2)   = -1,   rj = -1 - (-2)   =  1,   h = -2   (policy prefers rejected)
#   pair 2: cr = -1 - (-2)   =  1,   rj = -4 - (-2)   = -2,   h =  3   (policy prefers chosen a lot)
PC, PR, RC, RR = [-1.0, -3.0, -1.0], [-2.0, -1.0, -4.0], [-1.5, -2.0, -2.0], [-1.5, -2.0, -2.0]


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x): so -log sigmoid(z) = softplus(-z)."""
    return math.log(1 + math.exp(x))


def losses(loss_type: str, *, label_smoothing: float = 0.0, dpop_lambda: float = 0.0, data=(PC, PR, RC, RR)) -> list[float]:
    tensors = [torch.tensor(v, dtype=torch.float64) for v in data]
    out = preference_loss(*tensors, beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing,
                          dpop_lambda=dpop_lambda)
    assert out.shape == (len(data[0]),)
    return out.tolist()


# beta*h per pair: 0.5, -1, 1.5
HAND = {
    # -log sigmoid(beta h) = softplus(-beta h)
    "sigmoid": [softplus(-0.5), softplus(1.0), softplus(-1.5)],
    # max(0, 1 - beta h)
    "hinge": [1 - 0.5, 1 + 1.0, 0.0],
    # (h - 1/(2 beta))^2 = (h - 1)^2
    "ipo": [(1 - 1) ** 2, (-2 - 1) ** 2, (3 - 1) ** 2],
    # exp(-beta h)
    "exponential": [math.exp(-0.5), math.exp(1.0), math.exp(-1.5)],
    # (cr - 1/(2 beta))^2 + (rj + 1/(2 beta))^2 = (cr - 1)^2 + (rj + 1)^2
    "sppo_hard": [(0.5 - 1) ** 2 + (-0.5 + 1) ** 2, (-1 - 1) ** 2 + (1 + 1) ** 2, (1 - 1) ** 2 + (-2 + 1) ** 2],
    # -log sigmoid(beta cr) - log sigmoid(-beta rj) = softplus(-beta cr) + softplus(beta rj)
    "bco_pair": [softplus(-0.25) + softplus(-0.25), softplus(0.5) + softplus(0.5), softplus(-0.5) + softplus(-1.0)],
    # no preference term: the trainer's sft_weight * NLL is the whole loss (the continued-SFT baseline)
    "sft": [0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_loss_known_values(loss_type):
    assert losses(loss_type) == pytest.approx(HAND[loss_type], abs=1e-12)


def test_cdpo_label_smoothing():
    # cDPO, eps = 0.1: 0.9 * softplus(-beta h) + 0.1 * softplus(beta h)
    expected = [0.9 * softplus(-z) + 0.1 * softplus(z) for z in (0.5, -1.0, 1.5)]
    assert losses("sigmoid", label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)
    assert expected[0] == pytest.approx(0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)))


def test_robust_loss():
    # robust DPO, eps = 0.1: (0.9 * softplus(-beta h) - 0.1 * softplus(beta h)) / (1 - 0.2)
    expected = [(0.9 * softplus(-z) - 0.1 * softplus(z)) / 0.8 for z in (0.5, -1.0, 1.5)]
    assert losses("robust", label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)
    # eps = 0 is plain DPO
    assert losses("robust") == pytest.approx(HAND["sigmoid"], abs=1e-12)


# DPOP, lambda = 2: pair 1 has pc = -3 < rc = -2, so cr -> -1 - 2 * relu(-2 - (-3)) = -3 and h -> -3 - 1 = -4 (beta h = -2).
# Pairs 0 and 2 have pc > rc: the guard is inactive and they keep their plain losses.
DPOP_PAIR1 = {
    "sigmoid": softplus(2.0),
    "hinge": 1 + 2.0,
    "ipo": (-4 - 1) ** 2,
    "exponential": math.exp(2.0),
    "sppo_hard": (-3 - 1) ** 2 + (1 + 1) ** 2,
    "bco_pair": softplus(1.5) + softplus(0.5),
}


@pytest.mark.parametrize("loss_type", sorted(DPOP_PAIR1))
def test_dpop_guard(loss_type):
    plain = losses(loss_type)
    guarded = losses(loss_type, dpop_lambda=2.0)
    assert guarded[0] == plain[0] and guarded[2] == plain[2]  # guard inactive: bit-identical to lambda = 0
    assert guarded[1] == pytest.approx(DPOP_PAIR1[loss_type], abs=1e-12)


def test_dpop_robust_and_cdpo():
    # the guard composes with label smoothing: beta h = -2 for pair 1
    assert losses("sigmoid", label_smoothing=0.1, dpop_lambda=2.0)[1] == pytest.approx(0.9 * softplus(2.0) + 0.1 * softplus(-2.0))
    assert losses("robust", label_smoothing=0.1, dpop_lambda=2.0)[1] == pytest.approx(
        (0.9 * softplus(2.0) - 0.1 * softplus(-2.0)) / 0.8)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="'kto'") as err:
        losses("kto")
    assert "sigmoid" in str(err.value)  # the message lists what is accepted
    assert set(LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "exponential", "robust", "sppo_hard", "bco_pair", "sft"}


# --- properties -----------------------------------------------------------------------------------------------

logp = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
beta_st = st.floats(min_value=0.01, max_value=2.0)


def _loss(pc: float, pr: float, rc: float, rr: float, **kw) -> float:
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return preference_loss(t(pc), t(pr), t(rc), t(rr), **kw).item()


# cDPO (sigmoid with label_smoothing > 0) is deliberately absent: its soft target makes it rise again past its
# minimum (see test_cdpo_minimum); robust DPO with eps < 0.5 stays monotone.
MONOTONE = [("sigmoid", 0.0), ("hinge", 0.0), ("exponential", 0.0), ("robust", 0.0), ("robust", 0.2), ("robust", 0.45)]


@pytest.mark.parametrize("loss_type,eps", MONOTONE)
@settings(max_examples=60, deadline=None)
@given(pc=logp, step=st.floats(min_value=0.0, max_value=10.0), pr=logp, rc=logp, rr=logp, beta=beta_st)
def test_loss_non_increasing_in_margin(loss_type, eps, pc, step, pr, rc, rr, beta):
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    low, high = _loss(pc, pr, rc, rr, **kw), _loss(pc + step, pr, rc, rr, **kw)  # raising pc raises h
    assert high <= low + 1e-12 * max(1.0, abs(low))


@pytest.mark.parametrize("loss_type,eps", MONOTONE)
@settings(max_examples=60, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=beta_st, lam=st.floats(min_value=0.0, max_value=50.0))
def test_dpop_never_lowers_the_loss(loss_type, eps, pc, pr, rc, rr, beta, lam):
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    plain, guarded = _loss(pc, pr, rc, rr, **kw), _loss(pc, pr, rc, rr, dpop_lambda=lam, **kw)
    assert guarded >= plain - 1e-12 * max(1.0, abs(plain))
    if pc >= rc:
        assert guarded == plain


@settings(max_examples=100, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=beta_st, lam=st.sampled_from([0.0, 5.0]))
def test_sigmoid_gradient_pushes_chosen_up(pc, pr, rc, rr, beta, lam):
    x = torch.tensor([pc], dtype=torch.float64, requires_grad=True)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    preference_loss(x, t(pr), t(rc), t(rr), beta=beta, dpop_lambda=lam).sum().backward()
    assert x.grad.item() <= 0.0


def test_cdpo_minimum():
    # d/dz [(1-eps) softplus(-z) + eps softplus(z)] = 0 at sigmoid(z) = 1 - eps, i.e. z = log((1-eps)/eps):
    # cDPO stops pushing the margin once the policy agrees with the label with probability 1 - eps.
    eps, beta = 0.1, 0.5
    z_star = math.log((1 - eps) / eps)
    h = torch.tensor([z_star / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    preference_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps).sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


# --- pairing --------------------------------------------------------------------------------------------------

def test_pair_by_reward_groups_by_prompt_id_not_position():
    # ids interleaved: positions 0,2,4 are prompt 7; 1,3,5 are prompt 3
    ids = [7, 3, 7, 3, 7, 3]
    scores = [0.2, 1.0, 0.9, -1.0, 0.5, 0.0]
    pairs = pair_by_reward(ids, scores)
    assert pairs.chosen == [2, 1] and pairs.rejected == [0, 3] and pairs.prompt_ids == [7, 3]
    assert pairs.ties_dropped == 0


def test_pair_by_reward_shuffled_string_ids():
    ids = ["b", "a", "c", "a", "b", "b", "c"]
    scores = [3.0, 1.0, 5.0, 2.0, 1.0, 2.0, 5.0]   # prompt c: both 5.0 -> a tie
    pairs = pair_by_reward(ids, scores)
    assert list(zip(pairs.prompt_ids, pairs.chosen, pairs.rejected)) == [("b", 0, 4), ("a", 3, 1)]
    assert pairs.ties_dropped == 1


def test_pair_by_reward_ties_and_singletons():
    # prompt 1: all equal (tie); prompt 2: single sample (not a tie, no pair); prompt 3: a real pair
    pairs = pair_by_reward([1, 1, 1, 2, 3, 3], [0.5, 0.5, 0.5, 9.0, 0.0, 1.0])
    assert pairs.chosen == [5] and pairs.rejected == [4] and pairs.prompt_ids == [3]
    assert pairs.ties_dropped == 1
    empty = pair_by_reward([], [])
    assert (empty.chosen, empty.rejected, empty.ties_dropped) == ([], [], 0)


def test_pair_by_reward_min_margin():
    # best - worst per prompt: 1.0, 0.25, 0.9 (a correct answer with the missing-EOS penalty 0.1), 0.0
    ids, scores = [0, 0, 1, 1, 2, 2, 3, 3], [0.0, 1.0, 0.0, 0.25, 0.0, 0.9, 1.0, 1.0]
    pairs = pair_by_reward(ids, scores, min_margin=0.25)  # a gap equal to the margin pairs
    assert (pairs.chosen, pairs.rejected, pairs.ties_dropped) == ([1, 3, 5], [0, 2, 4], 1)
    pairs = pair_by_reward(ids, scores, min_margin=1.0)  # correct vs incorrect only
    assert (pairs.chosen, pairs.rejected, pairs.prompt_ids, pairs.ties_dropped) == ([1], [0], [0], 3)
    pairs = pair_by_reward(ids, scores)  # margin 0: only exact ties are dropped
    assert (pairs.chosen, pairs.ties_dropped) == ([1, 3, 5], 1)


def test_pair_by_reward_length_mismatch():
    with pytest.raises(ValueError, match="3 prompt ids but 2 scores"):
        pair_by_reward([0, 0, 1], [1.0, 2.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from([0.0, 0.5, 1.0, 2.0])), max_size=30))
def test_pair_by_reward_properties(samples):
    ids = [i for i, _ in samples]
    scores = [s for _, s in samples]
    pairs = pair_by_reward(ids, scores)
    assert len(pairs.chosen) == len(pairs.rejected) == len(pairs.prompt_ids)
    for c, r, pid in zip(pairs.chosen, pairs.rejected, pairs.prompt_ids):
        assert c != r and ids[c] == ids[r] == pid
        assert scores[c] > scores[r]
        group = [scores[i] for i in range(len(ids)) if ids[i] == pid]
        assert scores[c] == max(group) and scores[r] == min(group)
    assert len(set(pairs.prompt_ids)) == len(pairs.prompt_ids)  # at most one pair per prompt
    counts = Counter(ids)
    assert pairs.ties_dropped + len(pairs.chosen) == sum(1 for n in counts.values() if n >= 2)
    tied = {pid for pid, n in counts.items() if n >= 2 and len({scores[i] for i in range(len(ids)) if ids[i] == pid}) == 1}
    assert pairs.ties_dropped == len(tied)


# --- small helpers --------------------------------------------------------------------------------------------

def test_missing_eos_penalty():
    assert apply_missing_eos_penalty([1.0, 0.5, -2.0], [True, False, False], 1.5) == [1.0, -1.0, -3.5]
    assert apply_missing_eos_penalty([1.0], [False], 0.0) == [1.0]


def test_segment_sum_ignores_minus_one():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    seg = torch.tensor([0, 2, -1, 0, 2, -1])
    # segment 0: 1 + 8; segment 1: nothing; segment 2: 2 + 16; -1 positions (4, 32) dropped
    assert segment_sum(values, seg, 3).tolist() == [9.0, 0.0, 18.0]


def test_segment_sum_accumulates_in_float64():
    values = torch.full((1000,), 0.1, dtype=torch.float32)
    out = segment_sum(values, torch.zeros(1000, dtype=torch.long), 1)
    assert out.dtype == torch.float64
    assert abs(out.item() - 1000 * float(torch.tensor(0.1, dtype=torch.float32))) < 1e-9  # fp32 sums drift ~1e-5 here


def test_weight_decay_spares_norm_weights_and_biases():
    """The Hugging Face Trainer's rule (and so TRL's): no decay on LayerNorm/RMSNorm weights and biases."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from spinlm.workers.fsdp_workers import parameter_groups

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2, attention_bias=True))
    decay, no_decay = parameter_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # per layer: 2 norms + q/k/v/o biases = 6 one-dimensional tensors; plus the final norm
    assert len(no_decay["params"]) == 3 * 6 + 1
    # per layer q/k/v/o + gate/up/down = 7 matrices; plus embeddings and the (untied) lm-head
    assert len(decay["params"]) == 3 * 7 + 2
    assert all(p.ndim >= 2 for p in decay["params"])


def test_ipo_is_length_normalised_by_default_and_sigmoid_is_not():
    from types import SimpleNamespace

    from spinlm.config import load_config
    from spinlm.spin_trainer import SpinTrainer

    def settings(*overrides):
        return SpinTrainer.loss_settings(SimpleNamespace(cfg=load_config(["model.path=m", *overrides])), 0)

    assert settings("algorithm.loss_type=ipo").length_normalize is True
    assert settings().length_normalize is False
    assert settings("algorithm.loss_type=ipo", "algorithm.length_normalize=false").length_normalize is False
