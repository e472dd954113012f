"""The fast log-prob path (chunked lm-head, packed sequences) against the plain padded one, and the micro-batched
preference step against a hand reduction. Real tiny transformers models, fp32, fixed seeds."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from spinlm.core_algos import preference_loss
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import DataParallelActor, LossSettings, micro_batches
from spinlm.workers.logprobs import (PACKED_SDPA, ResponseLogProbs, auto_chunk_size, chunked_token_logps, pack_sequences,
                                     packed_response_logps, padded_response_logps, use_packed_attention)

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
BUILDERS = {
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**SIZES, **kw)),
    "llama_tied": lambda **kw: LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True, **kw)),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**SIZES, **kw)),
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**SIZES, **kw)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP's spinning threads make them
    up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(kind: str = "llama", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind](**kw).float().eval()


def random_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=gen).tolist()  # 0 is the pad id


# --- chunked lm-head -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 50, None])
def test_chunked_token_logps_matches_naive(chunk):
    gen = torch.Generator().manual_seed(0)
    N, D, V = 7, 5, 11
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)  # a non-uniform incoming gradient, so each row's scale is checked

    naive = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    gh_ref, gw_ref = torch.autograd.grad((naive * upstream).sum(), (hidden, weight))
    fast = chunked_token_logps(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad((fast * upstream).sum(), (hidden, weight))

    torch.testing.assert_close(fast, naive.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["autocast", "bf16_tensors"])
def test_chunked_token_logps_in_bf16_matches_naive(how):
    """The backward's bf16 branch (probabilities and products in bf16, the weight gradient accumulated in fp32), for
    both ways bf16 arrives: autocast over fp32 weights (one process), and bf16 tensors with no autocast (FSDP2's
    MixedPrecisionPolicy casts the parameters; this once failed with 'Found dtype Float but expected BFloat16')."""
    gen = torch.Generator().manual_seed(2)
    N, D, V = 40, 16, 300
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(V, D, generator=gen)).requires_grad_()
    targets = torch.randint(0, 8, (N,), generator=gen)  # many repeated targets: index_add_ must sum them
    upstream = torch.randn(N, generator=gen)
    naive = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    gh_ref, gw_ref = torch.autograd.grad((naive * upstream).sum(), (hidden, weight))
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = chunked_token_logps(hidden, weight, targets, 7)
        gh, gw = torch.autograd.grad((fast * upstream).sum(), (hidden, weight))
        assert gw.dtype == torch.float32
    else:
        h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
        fast = chunked_token_logps(h16, w16, targets, 7)
        gh, gw = (g.float() for g in torch.autograd.grad((fast * upstream).sum(), (h16, w16)))
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, naive.detach(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(gh, gh_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(gw, gw_ref, atol=0.05, rtol=0.05)


def test_auto_chunk_size_keeps_one_chunk_of_logits_near_64_mib():
    assert auto_chunk_size(152064) == 110  # 67108864 // (4 * 152064): 64 MiB of fp32 logits, not 0.6 GB at 1024
    assert auto_chunk_size(32000) == 524
    assert auto_chunk_size(512) == 32768  # a small vocabulary: the whole response in one chunk
    assert auto_chunk_size(10**9) == 16  # never degenerate to one-token matmuls


def test_chunked_token_logps_weight_only_grad():
    # a frozen hidden state (needs_input_grad[0] False) still gives the weight its gradient
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 3, generator=gen), torch.randn(6, 3, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2])
    naive = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).sum()
    (g_ref,) = torch.autograd.grad(naive, weight)
    (g,) = torch.autograd.grad(chunked_token_logps(hidden, weight, targets, 3).sum(), weight)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


# --- packing --------------------------------------------------------------------------------------------------

def test_pack_sequences_hand_made():
    # lengths 6, 2, 3 -> rows of L = 6; first-fit decreasing places seq 0 alone, then seq 2 and seq 1 share row 1
    prompts = [[1, 2, 3], [4], [5]]
    responses = [[6, 7, 8], [9], [10, 11]]
    b = pack_sequences(prompts, responses, "cpu")
    assert b.input_ids.tolist() == [[1, 2, 3, 6, 7, 8], [5, 10, 11, 4, 9, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    # flat position row * 6 + col of the token BEFORE each response token: seq 0 at 2,3,4; seq 2 at 6,7; seq 1 at 9
    assert b.predict_positions.tolist() == [2, 3, 4, 6, 7, 9]
    assert b.targets.tolist() == [6, 7, 8, 10, 11, 9]
    assert b.segment.tolist() == [0, 0, 0, 2, 2, 1]
    assert (b.num_sequences, b.num_tokens) == (3, 11)
    assert b.response_lengths().tolist() == [3, 1, 2]
    assert b.attention_mask.shape == (2, 1, 6, 6) and b.attention_mask.dtype == torch.bool
    assert b.attention_mask[0, 0].tolist() == torch.ones(6, 6, dtype=torch.bool).tril().tolist()
    assert b.attention_mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],   # seq 2 (cols 0-2): causal within itself
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],   # seq 1 (cols 3-4): never sees seq 2
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],   # padding: only itself, so no softmax row is all masked
    ]
    assert b.spans == (((0, 6),), ((0, 3), (3, 5)))  # per row, each sequence's columns; (5, 6) is padding
    assert pack_sequences(prompts, responses, "cpu", block_mask=False).attention_mask is None


def test_pack_sequences_row_length_and_errors():
    b = pack_sequences([[1], [2, 3]], [[4, 5], [6]], "cpu", row_length=8)
    assert b.input_ids.tolist() == [[1, 4, 5, 2, 3, 6, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    assert b.predict_positions.tolist() == [0, 1, 4] and b.targets.tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="sequence 1 has an empty prompt"):
        pack_sequences([[1], []], [[2], [3]], "cpu")
    with pytest.raises(ValueError, match=r"empty prompt \(1\) or response \(0\)"):
        pack_sequences([[1]], [[]], "cpu")


def _mixed_lengths() -> tuple[list[list[int]], list[list[int]]]:
    """One long sequence and several short ones, so short ones share rows."""
    gen = torch.Generator().manual_seed(3)
    shape = [(12, 8), (1, 1), (2, 3), (3, 1), (1, 2), (5, 4), (2, 2)]
    return [random_tokens(gen, p) for p, _ in shape], [random_tokens(gen, r) for _, r in shape]


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("row_length", [None, 40])
def test_packed_equals_padded(kind, row_length):
    model = tiny_model(kind)
    prompts, responses = _mixed_lengths()
    batch = pack_sequences(prompts, responses, "cpu", row_length=row_length)
    assert batch.input_ids.shape[0] < len(prompts) - 2  # several sequences really share rows
    packed, lens = packed_response_logps(model, batch, chunk=5)
    packed.sum().backward()
    g_packed = _grads(model)
    padded = padded_response_logps(model, prompts, responses, pad_id=0, device="cpu")
    padded.sum().backward()
    g_padded = _grads(model)

    assert lens.tolist() == [len(r) for r in responses]
    torch.testing.assert_close(packed, padded.double(), atol=1e-5, rtol=0)
    assert g_packed.keys() == g_padded.keys() and len(g_packed) == len(list(model.parameters()))
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_packed_attention_equals_the_block_mask(kind):
    """PACKED_SDPA (one causal call per sequence span) gives the masked packed path's log-probs and gradients, and
    the padded path's; a sliding-window model (Mistral's default config) keeps sdpa and the mask."""
    masked_model = tiny_model(kind)
    model = copy.deepcopy(masked_model)
    switched = use_packed_attention(model)
    assert switched == (kind != "mistral")
    assert model.config._attn_implementation == (PACKED_SDPA if switched else "sdpa")
    prompts, responses = _mixed_lengths()
    batch = pack_sequences(prompts, responses, "cpu", row_length=40)
    assert any(len(row) > 1 for row in batch.spans) and batch.spans[-1][-1][1] < 40  # shared rows and a padded tail
    packed, _ = packed_response_logps(model, batch, chunk=5)
    packed.sum().backward()
    g_packed = _grads(model)
    masked, _ = packed_response_logps(masked_model, batch, chunk=5)
    masked.sum().backward()
    g_masked = _grads(masked_model)
    padded = padded_response_logps(masked_model, prompts, responses, pad_id=0, device="cpu")
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, padded.double(), atol=1e-5, rtol=0)
    assert g_packed.keys() == g_masked.keys()
    for name in g_masked:
        torch.testing.assert_close(g_packed[name], g_masked[name], atol=1e-5, rtol=0, msg=name)


def test_packed_attention_leaves_generation_unchanged():
    """The rollout generates with the same model object: without packed spans PACKED_SDPA is sdpa, padding
    mask included (a left-padded batch of two prompts)."""
    model = tiny_model("llama")
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    attention = (ids != 0).long()
    kwargs = dict(attention_mask=attention, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(ids, **kwargs)
    assert ResponseLogProbs(model).model.config._attn_implementation == PACKED_SDPA
    assert torch.equal(model.generate(ids, **kwargs), before)


def test_masked_attention_path_the_gpu_takes_equals_padded():
    """packed_attention=False (the worker's choice on a GPU): the model keeps sdpa and one block-masked call per
    layer gives the padded baseline's log-probs."""
    model = tiny_model("llama")
    wrapper = ResponseLogProbs(model, packed_attention=False)
    assert wrapper.model.config._attn_implementation == "sdpa"
    prompts, responses = _mixed_lengths()
    masked, _ = wrapper(pack_sequences(prompts, responses, "cpu"))
    padded = padded_response_logps(model, prompts, responses, pad_id=0, device="cpu")
    torch.testing.assert_close(masked, padded.double(), atol=1e-5, rtol=0)


def test_packed_equals_padded_eager_attention():
    """eager attention adds a 4D mask to the scores, so the packed path must pass it as 0 / -inf."""
    model = tiny_model("llama", attn_implementation="eager")
    prompts, responses = _mixed_lengths()
    packed, _ = packed_response_logps(model, pack_sequences(prompts, responses, "cpu"))
    padded = padded_response_logps(model, prompts, responses, pad_id=0, device="cpu")
    torch.testing.assert_close(packed, padded.double(), atol=1e-5, rtol=0)


# --- micro-batches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,max_items,max_tokens,expected", [
    ([3, 5, 2, 7, 1], 2, None, [[0, 1], [2, 3], [4]]),
    ([3, 5, 2, 7, 1], 10, 8, [[0, 1], [2], [3, 4]]),       # 3+5 = 8 fits; +2 would be 10; 2+7 = 9 too; 7+1 = 8
    ([1, 1, 1, 6], 2, 8, [[0, 1], [2, 3]]),                # the item cap splits first
    ([10, 1, 9], 4, 4, [[0], [1], [2]]),                   # an item longer than max_tokens goes alone, not dropped
    ([2, 2, 2, 2], 8, None, [[0, 1, 2, 3]]),
    ([], 2, None, []),
])
def test_micro_batches(lengths, max_items, max_tokens, expected):
    assert micro_batches(lengths, max_items=max_items, max_tokens=max_tokens) == expected


# --- the preference step --------------------------------------------------------------------------------------

BETA = 0.1
# reference offsets: rc = pc0 + A, rr = pr0 + B, so at the starting weights h = (pc0 - rc) - (pr0 - rr) = B - A exactly
A = torch.tensor([0.3, -0.2, 0.5, -0.4, 0.1, 0.2, -0.3, 0.6])
B = torch.tensor([0.0, 0.1, -0.2, 0.0, 0.3, 0.0, 0.0, 0.1])


def _pairs() -> Pairs:
    gen = torch.Generator().manual_seed(5)
    sizes = [(3, 4, 2), (5, 1, 3), (2, 2, 2), (4, 6, 1), (1, 3, 5), (6, 2, 2), (2, 5, 4), (3, 1, 1)]
    return Pairs([random_tokens(gen, p) for p, _, _ in sizes], [random_tokens(gen, c) for _, c, _ in sizes],
                 [random_tokens(gen, r) for _, _, r in sizes])


def _step(model, pairs, rc, rr, micro_batch_size: int, max_tokens: int | None = None):
    actor = DataParallelActor(ResponseLogProbs(model, chunk=4), micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return actor.preference_step(pairs, rc, rr, LossSettings(beta=BETA), opt, grad_clip=1.0)


def test_preference_step_accumulation_and_metrics():
    base = tiny_model("llama_tied", seed=2)
    pairs = _pairs()
    with torch.no_grad():
        pc0 = padded_response_logps(base, pairs.prompts, pairs.chosen, 0, "cpu")
        pr0 = padded_response_logps(base, pairs.prompts, pairs.rejected, 0, "cpu")
    rc, rr = pc0 + A, pr0 + B

    models = {mbs: copy.deepcopy(base) for mbs in (2, 8)}
    metrics = {mbs: _step(m, pairs, rc, rr, mbs) for mbs, m in models.items()}
    small_tokens = copy.deepcopy(base)
    metrics["tok"] = _step(small_tokens, pairs, rc, rr, 8, max_tokens=36)  # micro-batches of 3, 2, 2, 1 pairs

    start = dict(base.named_parameters())
    for name, p in models[8].named_parameters():
        torch.testing.assert_close(models[2].get_parameter(name), p, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(small_tokens.get_parameter(name), p, atol=1e-6, rtol=0, msg=name)
    moved = sum(not torch.equal(p, start[n]) for n, p in models[8].named_parameters())
    assert moved == len(start)  # the step really changed every parameter

    # hand reduction of per-pair values at the starting weights
    h = B - A
    per_pair = preference_loss(pc0, pr0, rc, rr, beta=BETA)
    for m in metrics.values():
        assert m["train/step_skipped"] == 0.0
        assert m["loss"] == pytest.approx(per_pair.mean().item(), abs=1e-6)
        assert m["rewards/accuracies"] == 4 / 8            # h = B - A > 0 for pairs 1, 3, 4, 6
        assert m["rewards/margins"] == pytest.approx(BETA * h.mean().item(), abs=1e-6)
        assert m["rewards/chosen"] == pytest.approx(-BETA * A.mean().item(), abs=1e-6)
        assert m["rewards/rejected"] == pytest.approx(-BETA * B.mean().item(), abs=1e-6)
        assert m["logps/chosen"] == pytest.approx(pc0.mean().item(), abs=1e-5)
        assert m["train/tokens"] == sum(2 * len(p) + len(c) + len(r)
                                        for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected))
    # the loss at h = B - A by hand: mean of log(1 + exp(-beta h))
    assert metrics[2]["loss"] == pytest.approx(torch.log1p(torch.exp(-BETA * h)).mean().item(), abs=1e-6)


def test_preference_step_skips_non_finite_loss():
    model = tiny_model("llama", seed=4)
    pairs = _pairs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rc, rr = torch.full((8,), -5.0), torch.full((8,), -5.0)
    rc[3] = float("nan")
    actor = DataParallelActor(ResponseLogProbs(model, chunk=4), micro_batch_size=2, max_tokens_per_micro_batch=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    m = actor.preference_step(pairs, rc, rr, LossSettings(beta=BETA), opt, grad_clip=1.0)
    assert m["train/step_skipped"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opt.state  # AdamW never stepped: no moments were recorded from the bad gradient
    assert all(p.grad is None for p in model.parameters())
    # the same batch with finite references does step
    rc[3] = -5.0
    m = actor.preference_step(pairs, rc, rr, LossSettings(beta=BETA), opt, grad_clip=1.0)
    assert m["train/step_skipped"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("settings", [
    LossSettings(beta=BETA),
    LossSettings(beta=BETA, loss_type="ipo", length_normalize=True, sft_weight=0.5, dpop_lambda=1.0),
    LossSettings(beta=BETA, loss_type="sft", sft_weight=1.0),
], ids=["sigmoid", "ipo_lengthnorm_sft_dpop", "sft_only"])
def test_preference_step_gradient_is_full_batch_mean(settings):
    """AdamW's first step is blind to a uniform gradient scale, so this checks the gradient itself: with SGD at
    lr = 1 and no clipping the parameter change IS minus the gradient, which must be that of the mean loss over
    all 8 pairs, whatever the micro-batching."""
    base = tiny_model("llama_tied", seed=2)
    pairs = _pairs()
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected)]
    assert micro_batches(lengths, max_items=8, max_tokens=36) == [[0, 1, 2], [3, 4], [5, 6], [7]]  # uneven sizes

    ref = copy.deepcopy(base).train()
    pc = padded_response_logps(ref, pairs.prompts, pairs.chosen, 0, "cpu")
    pr = padded_response_logps(ref, pairs.prompts, pairs.rejected, 0, "cpu")
    rc, rr = pc.detach() + A, pr.detach() + B
    lc = torch.tensor([len(c) for c in pairs.chosen], dtype=torch.float32)
    lr = torch.tensor([len(r) for r in pairs.rejected], dtype=torch.float32)
    n_pc, n_pr, n_rc, n_rr = (pc / lc, pr / lr, rc / lc, rr / lr) if settings.length_normalize else (pc, pr, rc, rr)
    per_pair = preference_loss(n_pc, n_pr, n_rc, n_rr, beta=settings.beta, loss_type=settings.loss_type,
                               dpop_lambda=settings.dpop_lambda) + settings.sft_weight * (-pc / lc)
    per_pair.mean().backward()
    expected = {n: p.grad for n, p in ref.named_parameters()}
    expected_norm = torch.cat([g.flatten() for g in expected.values()]).norm().item()

    for mbs, max_tokens in [(2, None), (8, None), (8, 36)]:
        model = copy.deepcopy(base)
        actor = DataParallelActor(ResponseLogProbs(model, chunk=4), micro_batch_size=mbs, max_tokens_per_micro_batch=max_tokens)
        m = actor.preference_step(pairs, rc, rr, settings, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=1e9)
        for name, p in model.named_parameters():
            torch.testing.assert_close(base.get_parameter(name) - p, expected[name], atol=1e-5, rtol=0, msg=name)
        assert m["loss"] == pytest.approx(per_pair.mean().item(), abs=1e-5)
        assert m["train/grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
        assert m["train/sft_nll"] == pytest.approx((-pc / lc).mean().item(), abs=1e-5)


def test_chunked_token_logps_with_no_rows_gives_zero_gradients():
    weight = torch.randn(6, 3, requires_grad=True)
    hidden = torch.randn(0, 3, requires_grad=True)
    out = chunked_token_logps(hidden, weight, torch.zeros(0, dtype=torch.long), 4)
    (g,) = torch.autograd.grad(out.sum() + 0 * weight.sum(), weight, allow_unused=True)
    assert out.shape == (0,) and torch.equal(g, torch.zeros(6, 3))
