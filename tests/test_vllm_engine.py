"""The vllm rollout engine against the hf engine, opt-in: it runs only where vllm imports (its own virtual
environment on CPU, see scripts/setup_vllm_env.sh and the README's "vLLM rollout engine" section):

    scripts/setup_vllm_env.sh && PYTHONPATH=$PWD /work/vllm-venv/bin/python -m pytest -q tests/test_vllm_engine.py

A real tiny Llama saved to disk; the PolicyWorker starts a colocated vLLM engine from it, takes one update that
changes its greedy answers, and the next vLLM rollout (after the in-place weight push) must equal the hf engine's
greedy rollout of the updated weights token for token, EOS flags included."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import save_arith_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (opt-in: scripts/setup_vllm_env.sh)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention kernels do not take 16
    return save_arith_model(tmp_path_factory.mktemp("tiny_model"), hidden_size=64, intermediate_size=128)


def test_vllm_greedy_equals_hf_greedy_after_an_update(model_dir):
    from spinlm.config import load_config
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = load_config([f"model.path={model_dir}", "trainer.device=cpu", "rollout.engine=vllm", "actor.lr=0.05",
                       "actor.warmup_ratio=0", "actor.lr_scheduler=constant", "actor.micro_batch_size=8",
                       "data.max_prompt_length=32", "data.max_response_length=24"])
    torch.manual_seed(0)
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    try:
        check_greedy_after_update(worker)
    finally:
        worker.close()


def check_greedy_after_update(worker):
    from spinlm.rollout.hf_rollout import SamplingParams, generate
    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import LossSettings

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 64, (int(n),), generator=gen).tolist() for n in torch.randint(3, 12, (12,), generator=gen)]
    greedy = SamplingParams(max_new_tokens=24, greedy=True)

    def hf_greedy():
        return generate(worker.model, prompts, greedy, pad_id=worker.tokenizer.pad_token_id, eos_ids=worker.eos_ids,
                        progress=False)

    before = worker.generate(prompts, greedy, seed=0)
    assert before.responses == hf_greedy().responses  # the engine loaded the same starting weights

    # one update that pushes the sampled answers down and an EOS-ending answer up: greedy outputs must change
    eos = min(worker.eos_ids)
    chosen = [[7, 8, eos] for _ in prompts]
    rejected = [r[0] for r in before.responses]
    ref_c, ref_r = worker.sequence_logps(prompts, chosen), worker.sequence_logps(prompts, rejected)
    worker.start_schedule(1)
    worker.update(Pairs(prompts, chosen, rejected), LossSettings(beta=0.1), len(prompts), ref=(ref_c, ref_r))
    assert worker.weights_stale

    after_hf = hf_greedy()
    assert after_hf.responses != before.responses  # the update changed the greedy answers
    pushes = worker.vllm.pushes
    after_vllm = worker.generate(prompts, greedy, seed=0)
    assert worker.vllm.pushes == pushes + 1 and not worker.weights_stale
    assert after_vllm.responses == after_hf.responses
    assert after_vllm.ended == after_hf.ended
    assert any(e for es in after_vllm.ended for e in es)  # some answers end in EOS: the stop rule is exercised


def test_vllm_sampling_follows_n_and_the_response_contract(model_dir):
    from spinlm.config import load_config
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = load_config([f"model.path={model_dir}", "trainer.device=cpu", "rollout.engine=vllm",
                       "data.max_prompt_length=32", "data.max_response_length=16"])
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    try:
        check_sampling(worker)
    finally:
        worker.close()
    assert not torch.distributed.is_initialized()  # the engine's own one-rank group is gone with it


def check_sampling(worker):
    from spinlm.rollout.hf_rollout import SamplingParams

    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    params = SamplingParams(n=3, max_new_tokens=16, temperature=1.5, top_k=20, top_p=0.9)
    a = worker.generate(prompts, params, seed=3)
    b = worker.generate(prompts, params, seed=3)
    assert a.responses == b.responses  # seeded per prompt
    assert [len(rs) for rs in a.responses] == [3, 3]
    for rs, es in zip(a.responses, a.ended):
        for r, e in zip(rs, es):
            assert 1 <= len(r) <= 16
            assert e == (r[-1] in worker.eos_ids)
            assert not any(t in worker.eos_ids for t in r[:-1])  # nothing after the first EOS


def test_vllm_seeded_sampling_of_a_batch_larger_than_one_scheduler_step(model_dir):
    # More prompt tokens than vLLM schedules in one step: with chunked prefill, a seeded request whose prompt is
    # split over steps made vLLM's CPU runner rewind a CPU generator and fail ("CPU Generator does not use offset");
    # the engine turns chunked prefill off on CPU, so whole prompts are prefilled and the seeds hold.
    from spinlm.config import load_config
    from spinlm.rollout.hf_rollout import SamplingParams
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = load_config([f"model.path={model_dir}", "trainer.device=cpu", "rollout.engine=vllm",
                       "data.max_prompt_length=220", "data.max_response_length=8"])
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    try:
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(5, 64, (200,), generator=gen).tolist() for _ in range(24)]  # 4,800 prompt tokens
        params = SamplingParams(n=2, max_new_tokens=8)
        a = worker.generate(prompts, params, seed=5)
        b = worker.generate(prompts[::-1], params, seed=5, keys=list(range(24))[::-1])
        assert a.responses == b.responses[::-1]  # a prompt's samples follow its key, not its place in the batch
        assert all(len(rs) == 2 for rs in a.responses)
    finally:
        worker.close()
