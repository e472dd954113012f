"""LoRA (peft): the opponent is the base with the adapter off, the adapter is merged at every round's end and a
fresh one started, and checkpoints are plain Hugging Face models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spinlm.config import load_config, resolved
from spinlm.data.items import load_items
from spinlm.main_spin import run
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.fsdp_workers import PolicyWorker

pytest.importorskip("peft")
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "actor.lr=1e-2"]


def smoke(tmp_path: Path, *extra: str):
    return load_config(["preset=smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_before_training=false",
                        *LORA, *extra])


def test_adapter_trains_merges_exactly_and_becomes_the_opponent(tiny_task, tmp_path):
    cfg = resolved(smoke(tmp_path, "algorithm.mode=online_dpo", "rollout.n=2"))
    worker = PolicyWorker(cfg, cfg.model.path, keep_opponent=True)
    assert worker.opponent is None  # no second model: the opponent is the base
    trainable = {n: p.numel() for n, p in worker.policy.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable)
    # rank 4 on q, k, v, o (128 -> 128), gate, up (128 -> 384), down (384 -> 128), 4 layers: 4 * (4 * 4 * 256 + 3 * 4 * 512)
    assert sum(trainable.values()) == 4 * (4 * 4 * 256 + 3 * 4 * 512) == 40960

    items, _ = load_items(cfg.data, worker.tokenizer, cfg.data.train_files, need_response=True)
    items = items[:8]
    prompts, chosen = [it.prompt_ids for it in items], [it.response_ids for it in items]
    rejected = [it.response_ids[:-3] + [worker.tokenizer.eos_token_id] for it in items]
    start = worker.sequence_logps(prompts, chosen)
    assert torch.equal(start, worker.sequence_logps(prompts, chosen, opponent=True))  # B = 0: policy == base

    worker.start_schedule(10)
    ref_c, ref_r = (worker.sequence_logps(prompts, r, opponent=True) for r in (chosen, rejected))
    for _ in range(2):
        worker.update(Pairs(prompts, chosen, rejected), LossSettings(beta=0.1), len(prompts), ref=(ref_c, ref_r))
    trained = worker.sequence_logps(prompts, chosen)
    assert not torch.allclose(trained, start, atol=1e-3)
    torch.testing.assert_close(worker.sequence_logps(prompts, chosen, opponent=True), start, atol=0, rtol=0)

    lr_before = worker.scheduler.get_last_lr()
    worker.refresh_opponent()  # merge into the base, fresh adapter, fresh optimizer at the same schedule position
    # merged W + BA against W x + B(A x): the same numbers up to fp32 rounding of sums of about 30 nats
    torch.testing.assert_close(worker.sequence_logps(prompts, chosen), trained, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(worker.sequence_logps(prompts, chosen, opponent=True), trained, atol=1e-5, rtol=1e-6)
    assert worker.scheduler.get_last_lr() == lr_before
    assert [g["lr"] for g in worker.optimizer.param_groups] == lr_before
    assert not worker.optimizer.state  # a fresh adapter starts with no moments

    worker.save(str(tmp_path / "ckpt"), with_optimizer=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # a plain HF model: no adapter keys
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    ids = torch.tensor([prompts[0] + chosen[0]])
    torch.testing.assert_close(plain(ids).logits, worker.model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["spin", "online_dpo"])
def test_lora_runs_rounds_end_to_end(tiny_task, tmp_path, mode):
    # n=4: at the smoke model's ~10% accuracy, 2 samples per prompt can tie on all 32 prompts of a round (no pair)
    extra = ["algorithm.mode=online_dpo", "rollout.n=4"] if mode == "online_dpo" else []
    table = run(smoke(tmp_path, "trainer.rounds=2", *extra))
    assert [r["round"] for r in table] == [1, 2]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["kind"] == "train" and r["round"] == 2][0]
    # round 2's opponent is round 1's merged policy: before its first step the policy equals it exactly
    assert first["logps/chosen"] == pytest.approx(first["logps/ref_chosen"], abs=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "2")
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_lora_needs_one_rank(tiny_task, tmp_path):
    from spinlm.config_check import check_config

    problems = check_config(smoke(tmp_path, "trainer.cpu_workers=2", "trainer.launcher=ray"))
    assert ("model.lora.rank=4: LoRA runs on one rank for now (world size 2); use full fine-tuning with FSDP2 across "
            "ranks") in problems


def test_zero_adapter_is_skipped_with_the_same_numbers(tiny_task, tmp_path):
    from spinlm.rollout.hf_rollout import SamplingParams, generate
    from spinlm.workers.lora import adapter_is_zero

    cfg = resolved(smoke(tmp_path))
    worker = PolicyWorker(cfg, cfg.model.path, keep_opponent=False)
    items, _ = load_items(cfg.data, worker.tokenizer, cfg.data.train_files, need_response=True)
    items = items[:8]
    prompts, chosen = [it.prompt_ids for it in items], [it.response_ids for it in items]
    rejected = [it.response_ids[:-3] + [worker.tokenizer.eos_token_id] for it in items]
    calls = []  # forwards through one adapter's A: whether the adapter ran at all

    def watch_adapter():
        lora_a = next(m for n, m in worker.model.named_modules() if n.endswith("q_proj.lora_A.default"))
        lora_a.register_forward_hook(lambda *_: calls.append(1))

    watch_adapter()
    params = SamplingParams(n=1, max_new_tokens=6)

    def with_adapter_on():  # the same passes straight through the model, adapter in every layer
        logps = worker.actor.sequence_logps(prompts, chosen, module=worker.policy)
        rollout = generate(worker.model, prompts, params, pad_id=worker.tokenizer.pad_token_id, eos_ids=worker.eos_ids,
                           batch_size=cfg.rollout.batch_size, seed=3, progress=False)
        return logps, rollout.responses

    assert adapter_is_zero(worker.peft)  # fresh: B = 0
    logps, responses = worker.sequence_logps(prompts, chosen), worker.generate(prompts, params, seed=3).responses
    assert not calls  # skipped
    on_logps, on_responses = with_adapter_on()
    assert calls
    assert torch.equal(logps, on_logps) and responses == on_responses  # bit for bit: base + 0

    worker.start_schedule(10)
    ref = (worker.sequence_logps(prompts, chosen), worker.sequence_logps(prompts, rejected))
    worker.update(Pairs(prompts, chosen, rejected), LossSettings(beta=0.1), len(prompts), ref=ref)
    assert not adapter_is_zero(worker.peft)  # trained: the adapter stays on
    calls.clear()
    logps, responses = worker.sequence_logps(prompts, chosen), worker.generate(prompts, params, seed=3).responses
    assert calls
    on_logps, on_responses = with_adapter_on()
    assert torch.equal(logps, on_logps) and responses == on_responses
    assert not torch.allclose(logps, ref[0], atol=1e-3)

    worker.refresh_opponent()  # merged, fresh adapter: skipped again
    assert adapter_is_zero(worker.peft)
    watch_adapter()  # the fresh adapter's modules
    calls.clear()
    torch.testing.assert_close(worker.sequence_logps(prompts, chosen), logps, atol=1e-5, rtol=0)
    assert not calls
