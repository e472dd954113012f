"""The worker-group contract in online DPO: the opponent's log-probs computed on the rank inside the update (each
pair shipped to the ranks once) give exactly the numbers of the driver's separate opponent passes: the same
metrics and the same weights, bit for bit, on the real tiny model, in process and on two Ray ranks with padding."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spinlm.config import load_config, resolved
from spinlm.data.items import load_items
from spinlm.modeling import load_tokenizer
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.worker_group import LocalWorkerGroup, WorkerGroup

# micro_batch_size 2: several micro-batches per log-prob pass and per update; lr 1e-3: the policy leaves the opponent
ONLINE = ["preset=smoke", "trainer.eval_before_training=false", "algorithm.mode=online_dpo", "rollout.n=2",
          "actor.micro_batch_size=2", "actor.lr=1e-3", "actor.warmup_ratio=0"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "actor.lr=1e-2"]


def step_pairs(cfg, steps: int, per_step: int) -> list[Pairs]:
    tok = load_tokenizer(cfg.model.path)
    items, _ = load_items(cfg.data, tok, cfg.data.train_files, need_response=True)
    out = []
    for s in range(steps):
        part = items[s * per_step : (s + 1) * per_step]
        rejected = [it.response_ids[: max(1, len(it.response_ids) // 2)] + [tok.eos_token_id] for it in part]
        out.append(Pairs([it.prompt_ids for it in part], [it.response_ids for it in part], rejected))
    return out


def online_dpo_steps(group: WorkerGroup, steps: list[Pairs], *, ship_reference: bool) -> list[dict]:
    """As the trainer runs online DPO: the first step's reference is the policy itself (exactly ln 2), later ones
    the resident opponent, either computed by the driver's own passes and shipped with the pairs (before) or on
    the ranks inside the update (ref=None)."""
    group.start_schedule(len(steps))
    metrics = []
    for s, pairs in enumerate(steps):
        loss = LossSettings(beta=0.1, reference_is_policy=s == 0)
        ref = None
        if ship_reference:
            ref = (group.sequence_logps(pairs.prompts, pairs.chosen, opponent=True),
                   group.sequence_logps(pairs.prompts, pairs.rejected, opponent=True))
        metrics.append(group.update(pairs, loss, ref))
    return metrics


def check_online_dpo_metrics(shipped: list[dict], on_rank: list[dict]) -> None:
    assert on_rank == shipped  # every metric, exactly
    assert on_rank[0]["loss"] == math.log(2) and on_rank[0]["rewards/margins"] == 0.0
    # afterwards the reference is the opponent, no longer the policy: the log-ratios are not zero
    assert on_rank[-1]["logps/ref_chosen"] != on_rank[-1]["logps/chosen"]
    assert on_rank[-1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("variant", ["full", pytest.param("lora", marks=pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="peft not installed"))])
def test_reference_on_the_rank_equals_the_shipped_reference(tiny_task, tmp_path, one_thread, variant):
    """Full fine-tuning keeps a frozen opponent copy; LoRA's opponent is the base with the adapter off."""
    cfg = resolved(load_config([*ONLINE, *(LORA if variant == "lora" else []), f"trainer.output_dir={tmp_path}"]))
    steps = step_pairs(cfg, steps=3, per_step=5)
    shipped_group = LocalWorkerGroup(cfg, cfg.model.path, keep_opponent=True)
    shipped = online_dpo_steps(shipped_group, steps, ship_reference=True)
    on_rank_group = LocalWorkerGroup(cfg, cfg.model.path, keep_opponent=True)
    on_rank = online_dpo_steps(on_rank_group, steps, ship_reference=False)
    check_online_dpo_metrics(shipped, on_rank)
    a, b = shipped_group.worker.policy.state_dict(), on_rank_group.worker.policy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if variant == "full":  # the frozen copies too
        assert all(torch.equal(x, y) for x, y in zip(shipped_group.worker.opponent.parameters(),
                                                     on_rank_group.worker.opponent.parameters()))


@pytest.mark.slow
def test_reference_on_two_ray_ranks_with_padding_equals_the_shipped_reference(tiny_task, tmp_path):
    """7 pairs a step on 2 ranks: rank 1 gets a zero-weight padding copy, and both ranks run the same forwards."""
    pytest.importorskip("ray")
    from spinlm.workers.worker_group import RayWorkerGroup

    cfg = resolved(load_config([*ONLINE, "trainer.cpu_workers=2", f"trainer.output_dir={tmp_path}"]))
    steps = step_pairs(cfg, steps=2, per_step=7)
    results = {}
    for name, ship in (("shipped", True), ("on_rank", False)):
        group = RayWorkerGroup(cfg, cfg.model.path, keep_opponent=True, run_dir=tmp_path)
        try:
            results[name] = online_dpo_steps(group, steps, ship_reference=ship)
            group.save(tmp_path / name, with_optimizer=False)
        finally:
            group.shutdown()
    check_online_dpo_metrics(results["shipped"], results["on_rank"])
    a, b = (load_file(Path(tmp_path) / name / "model.safetensors") for name in ("shipped", "on_rank"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
