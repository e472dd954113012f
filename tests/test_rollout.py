"""The `hf` rollout engine against transformers' own `generate` and against sampling theory.

Tiny random fp32 models (Llama with grouped-query attention; Qwen2 with q/k/v biases and one sliding-window layer).
Greedy decoding has one right answer, which `model.generate(do_sample=False)` gives; the EOS set is picked from a
free-running greedy pass so that some rows really end early (and leave the batch) while others run to the limit.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from spinlm.data.tokenize import cut_at_eos
from spinlm.rollout.hf_rollout import Rollout, SamplingParams, generate

PAD = 0
VOCAB = 128
PROMPT_LENGTHS = [3, 9, 5, 12, 7, 1, 10, 4, 6, 2, 11, 8, 3, 12, 5, 9]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=None,
              eos_token_id=None, initializer_range=0.2)  # a wide init: varied, peaked next-token distributions


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(kind: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**COMMON))
        else:   # layer 0 full attention, layer 1 a 4-token sliding window: both cache layer types get dropped rows
            model = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def llama():
    return _build("llama")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def plain_generate(model, prompts, *, max_new_tokens: int, eos: set[int] | None, **kw) -> list[list[int]]:
    """transformers' generate on one left-padded batch, rows cut after the first EOS (all rows when eos is None)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=PAD,
                         eos_token_id=sorted(eos) if eos else None, **kw)
    new = out[:, width:].tolist()
    return new if eos is None else [cut_at_eos(r, eos)[0] for r in new]


def early_eos(free: list[list[int]]) -> set[int]:
    """EOS ids that end some rows early: the commonest token of the first 8 steps, plus row 0's 5th token."""
    return {Counter(t for r in free for t in r[:8]).most_common(1)[0][0], free[0][4]}


def greedy(model, prompts, max_new_tokens, eos, batch_size=64) -> Rollout:
    return generate(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True), pad_id=PAD,
                    eos_ids=eos, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("batch_size", [16, 3])   # one batch (rows dropped two at a time), or six batches
def test_greedy_equals_transformers_generate(model, prompts, batch_size):
    max_new = 12
    free = plain_generate(model, prompts, max_new_tokens=max_new, eos=None, do_sample=False)
    eos = early_eos(free)
    expected = [cut_at_eos(r, eos)[0] for r in free]
    ends = sorted({len(r) for r in expected if len(r) < max_new})
    # The setup must really exercise row dropping: rows end at two or more different steps, others run on.
    assert len(ends) >= 2 and any(len(r) == max_new for r in expected), (eos, expected)
    reference = plain_generate(model, prompts, max_new_tokens=max_new, eos=eos, do_sample=False)
    assert reference == expected   # transformers agrees that stopping a row does not change the others

    out = greedy(model, prompts, max_new, eos, batch_size=batch_size)
    assert [r[0] for r in out.responses] == expected   # caller's order, even across several length-sorted batches
    assert [e[0] for e in out.ended] == [r[-1] in eos for r in expected]
    assert all(len(rs) == 1 and len(es) == 1 for rs, es in zip(out.responses, out.ended))


def test_greedy_ignores_n(llama, prompts):
    out = generate(llama, prompts, SamplingParams(n=4, max_new_tokens=5, greedy=True), pad_id=PAD, eos_ids=set(),
                   progress=False)
    assert [len(r) for r in out.responses] == [1] * len(prompts)


def test_max_new_tokens_and_ended_flags(llama, prompts):
    free = plain_generate(llama, prompts, max_new_tokens=12, eos=None, do_sample=False)
    # No EOS at all: every response is exactly max_new_tokens long and not ended.
    out = greedy(llama, prompts, 7, set())
    assert [r[0] for r in out.responses] == [r[:7] for r in free]
    assert [e[0] for e in out.ended] == [False] * len(prompts)
    # An EOS first emitted exactly at the last allowed step: full length, and ended.
    row, step = next((r, k) for r in range(len(free)) for k in range(2, 12) if free[r][k] not in free[r][:k])
    out = greedy(llama, prompts, step + 1, {free[row][step]})
    assert out.responses[row][0] == free[row][: step + 1] and out.ended[row] == [True]
    for r, (resp, ended) in enumerate(zip(out.responses, out.ended)):
        assert len(resp[0]) <= step + 1
        assert ended[0] == (resp[0][-1] == free[row][step])


def sample(model, prompts, seed, **kw) -> Rollout:
    params = SamplingParams(**{"n": 4, "max_new_tokens": 10, **kw})
    return generate(model, prompts, params, pad_id=PAD, eos_ids={3, 5, 7}, batch_size=3, seed=seed, progress=False)


def test_sampling_n_reproducible_and_leaves_global_rng_alone(model, prompts):
    state = torch.get_rng_state()
    a = sample(model, prompts, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a.responses) == len(prompts)
    assert all(len(rs) == 4 and len(es) == 4 for rs, es in zip(a.responses, a.ended))
    for rs, es in zip(a.responses, a.ended):
        for r, e in zip(rs, es):
            assert 1 <= len(r) <= 10 and e == (r[-1] in {3, 5, 7})
            assert not set(r[:-1]) & {3, 5, 7}   # cut after the first EOS
    assert sample(model, prompts, seed=11) == a
    b = sample(model, prompts, seed=12)
    assert b != a
    # Samples of one prompt differ from each other (one shared prefill, independent draws after it).
    assert all(len({tuple(r) for r in rs}) > 1 for rs in a.responses)


def test_a_prompts_samples_depend_on_its_key_not_its_batch_rank_or_order(model, prompts):
    """Rank- and batch-invariant sampling: the same (seed, key) gives the same samples whatever batch_size, order,
    or subset of prompts (a rank's share) they are generated in, and whatever rows finished early."""
    params = SamplingParams(n=3, max_new_tokens=10)
    keys = [100 + 7 * i for i in range(len(prompts))]
    whole = generate(model, prompts, params, pad_id=PAD, eos_ids={3, 5, 7}, batch_size=64, seed=9, keys=keys,
                     progress=False)
    small = generate(model, prompts, params, pad_id=PAD, eos_ids={3, 5, 7}, batch_size=1, seed=9, keys=keys,
                     progress=False)
    assert small.responses == whole.responses and small.ended == whole.ended
    order = list(reversed(range(len(prompts))))[::2]  # another rank's share, in another order
    part = generate(model, [prompts[i] for i in order], params, pad_id=PAD, eos_ids={3, 5, 7}, batch_size=2, seed=9,
                    keys=[keys[i] for i in order], progress=False)
    assert part.responses == [whole.responses[i] for i in order]
    other_keys = generate(model, prompts, params, pad_id=PAD, eos_ids={3, 5, 7}, batch_size=64, seed=9,
                          keys=[k + 1 for k in keys], progress=False)
    assert other_keys.responses != whole.responses


def test_mix64_is_splitmix64():
    """The int64 tensor hash equals splitmix64's finaliser computed with Python's unbounded integers."""
    from spinlm.rollout.hf_rollout import mix64

    def reference(x: int) -> int:
        x %= 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)

    xs = [0, 1, -5, 2**62 + 12345, -(2**63), 2**63 - 1]
    assert [int(v) % 2**64 for v in mix64(torch.tensor(xs, dtype=torch.int64))] == [reference(x) for x in xs]
    assert reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64's first output for seed 0


def test_block_size_is_the_divisor_nearest_the_square_root():
    from spinlm.rollout.hf_rollout import block_size

    assert [block_size(v) for v in (49152, 32000, 128, 50257, 7, 1)] == [192, 160, 8, 29, 1, 1]


@pytest.mark.parametrize("vocab", [120, 97])  # 120: blocks of 10 (two levels); 97 is prime: one level of 97
def test_sample_from_is_the_exact_inverse_cdf_and_never_draws_a_zero(vocab):
    from spinlm.rollout.hf_rollout import sample_from

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(64, vocab, generator=g), -1)
    probs[:, 10:30] = 0          # two whole zero blocks at 120
    probs[:, -vocab // 4:] = 0   # the last blocks are zero: a target at the total must not land there
    probs[::3, 0] = 0
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1 - 2**-53, 0.5, 1e-300], dtype=torch.float64)
    drawn = sample_from(probs, u)
    assert bool((probs[torch.arange(64), drawn] > 0).all())
    # the exact rule, on a float64 cumulative sum of the whole row: cdf[i - 1] <= u * total < cdf[i]
    cdf = probs.double().cumsum(-1)
    target = u * cdf[:, -1]
    upper = cdf[torch.arange(64), drawn]
    lower = torch.where(drawn > 0, cdf[torch.arange(64), (drawn - 1).clamp(min=0)], 0.0)
    tol = 1e-6 * cdf[:, -1]   # fp32 block sums against a float64 sum of the same numbers
    assert bool((lower <= target + tol).all()) and bool(((target < upper + tol) | (u > 1 - 1e-12)).all())
    assert int(drawn[1]) == int(probs[1].nonzero().max())  # u just below 1: the last token of probability > 0
    # a row's draw does not depend on the other rows
    assert torch.equal(torch.stack([sample_from(probs[i : i + 1], u[i : i + 1])[0] for i in range(64)]), drawn)


def test_top_k_1_samples_equal_greedy(model, prompts):
    expected = [r[0] for r in greedy(model, prompts, 10, {3, 5, 7}).responses]
    out = sample(model, prompts, seed=5, top_k=1, temperature=0.7, top_p=0.9)
    assert out.responses == [[e] * 4 for e in expected]


def first_token_frequencies(model, prompt, count, **kw) -> torch.Tensor:
    out = generate(model, [prompt], SamplingParams(n=count, max_new_tokens=1, **kw), pad_id=PAD, eos_ids=set(),
                   seed=0, progress=False)
    tokens = torch.tensor([r[0] for r in out.responses[0]])
    return torch.bincount(tokens, minlength=VOCAB).double() / count


@pytest.fixture(scope="module")
def next_token_probs(llama, prompts) -> torch.Tensor:
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([prompts[1]])).logits[0, -1].double()
    return logits


def test_first_token_distribution_matches_softmax(llama, prompts, next_token_probs):
    logits = next_token_probs
    p1, p_half = logits.softmax(-1), (logits / 0.5).softmax(-1)
    # Peaked enough that ignoring the temperature (or sampling uniformly) would fail the 0.03 tolerance.
    assert (p1 - p_half).abs().max() > 0.1 and p1.max() > 0.1
    count = 8000   # sampling error of a frequency is at most 0.5 / sqrt(8000) = 0.0056 (one standard deviation)
    assert (first_token_frequencies(llama, prompts[1], count) - p1).abs().max() < 0.03
    assert (first_token_frequencies(llama, prompts[1], count, temperature=0.5) - p_half).abs().max() < 0.03


def test_top_k_and_top_p_follow_transformers_definitions(llama, prompts, next_token_probs):
    p = next_token_probs.softmax(-1)
    # top-k: the k likeliest tokens, renormalised.
    top3 = p.topk(3).indices
    expected = torch.zeros_like(p)
    expected[top3] = p[top3] / p[top3].sum()
    freq = first_token_frequencies(llama, prompts[1], 8000, top_k=3)
    assert set(freq.nonzero().flatten().tolist()) <= set(top3.tolist())
    assert (freq - expected).abs().max() < 0.03
    # top-p: drop the tokens whose ascending cumulative probability is <= 1 - top_p, renormalise the rest.
    sorted_p, order = p.sort()
    kept = order[sorted_p.cumsum(0) > 1 - 0.6]
    assert 2 <= len(kept) < VOCAB // 2
    expected = torch.zeros_like(p)
    expected[kept] = p[kept] / p[kept].sum()
    freq = first_token_frequencies(llama, prompts[1], 8000, top_p=0.6)
    assert set(freq.nonzero().flatten().tolist()) <= set(kept.tolist())
    assert (freq - expected).abs().max() < 0.03


def test_restores_training_mode(llama, prompts):
    llama.train()
    try:
        greedy(llama, prompts[:2], 2, set())
        assert llama.training
    finally:
        llama.eval()


@pytest.mark.parametrize("bad, field", [
    (dict(n=0), "n="), (dict(max_new_tokens=0), "max_new_tokens="), (dict(temperature=0.0), "temperature="),
    (dict(top_p=0.0), "top_p="), (dict(top_p=1.5), "top_p="), (dict(top_k=-1), "top_k="),
])
def test_bad_sampling_params_are_named(llama, prompts, bad, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        generate(llama, prompts, SamplingParams(**bad), pad_id=PAD, eos_ids={3}, progress=False)


def test_empty_prompt_is_named(llama, prompts):
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        generate(llama, [prompts[0], prompts[1], []], SamplingParams(), pad_id=PAD, eos_ids={3}, progress=False)


def test_progress_counts_each_sequence_when_it_ends(llama, prompts):
    """The bar ticks per finished row, as rows end inside a batch, and each row exactly once (EOS or limit)."""
    from spinlm.rollout import hf_rollout

    max_new = 12
    free = plain_generate(llama, prompts, max_new_tokens=max_new, eos=None, do_sample=False)
    eos = early_eos(free)
    expected_ends = sorted(len(cut_at_eos(r, eos)[0]) for r in free)
    ticks = []
    ids = torch.tensor(sorted(eos))
    rows, lengths = hf_rollout._generate_batch(llama, prompts, 1, max_new, None, True, PAD, ids,
                                               torch.zeros(len(prompts), dtype=torch.int64), torch.device("cpu"),
                                               ticks.append)
    assert sorted(lengths) == expected_ends
    assert sum(ticks) == len(prompts)
    # rows that ended early were reported before the batch was over: more than one tick
    early = sum(1 for n in expected_ends if n < max_new)
    assert early > 0 and len(ticks) >= 2 and ticks[-1] == len(prompts) - early


def test_preallocated_cache_layer_holds_what_dynamic_layer_holds():
    """Prefill, repeat over n samples, decode steps, drop rows, and a write past the capacity (it grows): the keys and
    values attention reads equal DynamicLayer's concatenated ones at every step."""
    from transformers.cache_utils import DynamicLayer

    from spinlm.rollout.hf_rollout import PreallocatedLayer

    g = torch.Generator().manual_seed(0)
    kv = lambda b, t: (torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g))  # noqa: E731
    ours, theirs = PreallocatedLayer(capacity=7), DynamicLayer()

    def both(op, *args):
        out_ours, out_theirs = getattr(ours, op)(*args), getattr(theirs, op)(*args)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()
        return out_ours, out_theirs

    (k, v), (k2, v2) = both("update", *kv(3, 5))
    assert torch.equal(k, k2) and torch.equal(v, v2)
    both("batch_repeat_interleave", 2)
    for _ in range(4):  # positions 6..9 of a 7-position buffer: the last two grow it
        (k, v), (k2, v2) = both("update", *kv(6, 1))
        assert torch.equal(k, k2) and torch.equal(v, v2)
    both("batch_select_indices", torch.tensor([0, 2, 5]))
    (k, v), (k2, v2) = both("update", *kv(3, 1))
    assert torch.equal(k, k2) and ours.get_seq_length() == 10


def test_rollout_cache_preallocates_full_attention_layers_only():
    from transformers.cache_utils import DynamicLayer

    from spinlm.rollout.hf_rollout import PreallocatedLayer, preallocated_cache

    assert [type(x) for x in preallocated_cache(_build("llama").config, 16).layers] == [PreallocatedLayer] * 2
    qwen = [type(x) for x in preallocated_cache(_build("qwen2").config, 16).layers]
    assert qwen[0] is PreallocatedLayer and issubclass(qwen[1], DynamicLayer) and qwen[1] is not PreallocatedLayer


def test_packed_linears_compute_the_same_linear_and_are_undone(llama, prompts):
    from spinlm.rollout.hf_rollout import _onednn_linear_available, packed_linears

    if not _onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    linears = [m for m in llama.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(5, 3, llama.config.hidden_size)
    with torch.no_grad():
        plain = [torch.nn.functional.linear(x, m.weight, m.bias) for m in linears[:1]]
        with packed_linears(llama):
            assert all("forward" in vars(m) for m in linears)   # every linear layer runs the packed kernel
            packed = [m(x) for m in linears[:1]]
            logits_packed = llama(input_ids=torch.tensor([prompts[3]])).logits
        assert not any("forward" in vars(m) for m in linears)   # the class's forward again
        logits = llama(input_ids=torch.tensor([prompts[3]])).logits
        with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(llama):
            assert not any("forward" in vars(m) for m in linears)  # autocast: left alone
    torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_packed, logits, atol=1e-4, rtol=1e-5)
