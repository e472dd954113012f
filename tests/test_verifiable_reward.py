"""The verifiable-reward recipe (issue 15): algorithm.min_reward_margin, algorithm.sft_on_correct_only and
algorithm.reference=initial, on the real tiny task and model."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spinlm.config import load_config, resolved
from spinlm.data.items import load_items
from spinlm.main_spin import run
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.fsdp_workers import PolicyWorker


def smoke(tmp_path: Path, *extra: str):
    return load_config(["preset=smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_before_training=false",
                        *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def judge(tmp_path, *overrides):
    """Three prompts, two samples each, judged by the GSM8K reward with missing_eos_penalty 0.5:
    prompt 0: right + EOS (1.0) vs wrong + EOS (0.0)          gap 1.0, chosen correct
    prompt 1: right, no EOS (0.5) vs wrong + EOS (0.0)        gap 0.5, chosen correct (raw reward 1)
    prompt 2: wrong + EOS (0.0) vs wrong, no EOS (-0.5)       gap 0.5, chosen wrong (two wrong answers)"""
    from spinlm.rewards import get_reward_fn
    from spinlm.rollout.hf_rollout import Rollout
    from spinlm.run_dir import TrainerState
    from spinlm.spin_trainer import SpinTrainer
    from spinlm.workers.fsdp_workers import load_tokenizer

    cfg = resolved(smoke(tmp_path, "algorithm.mode=online_dpo", "rollout.n=2", "algorithm.missing_eos_penalty=0.5",
                         *overrides))
    tok = load_tokenizer(cfg.model.path)
    items = load_items(cfg.data, tok, cfg.data.train_files, need_response=True)[0][:3]
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    right = [enc(f"#### {it.example.ground_truth}") for it in items]
    wrong = enc("#### 99999")
    eos = tok.eos_token_id
    responses = [[right[0] + [eos], wrong + [eos]], [right[1], wrong + [eos]], [wrong + [eos], wrong]]
    ended = [[True, True], [False, True], [True, False]]
    trainer = SpinTrainer(cfg, None, tok, items, [], get_reward_fn(cfg.reward), tmp_path, None, TrainerState())
    return trainer.judge_by_reward(items, Rollout(responses, ended)), responses


def test_min_reward_margin_pairs_only_correct_against_incorrect(tiny_task, tmp_path):
    (judged, m), responses = judge(tmp_path, "algorithm.min_reward_margin=1")
    assert judged.pairs.chosen == [responses[0][0]] and judged.pairs.rejected == [responses[0][1]]
    assert (judged.chosen_scores, judged.rejected_scores) == ([1.0], [0.0])
    assert (m["rollout/pairs"], m["rollout/ties_dropped"]) == (1, 2)
    (judged, m), _ = judge(tmp_path)  # the default margin 0: every prompt whose samples differ gives a pair
    assert (judged.chosen_scores, judged.rejected_scores) == ([1.0, 0.5, 0.0], [0.0, 0.0, -0.5])
    assert judged.pairs.sft_mask is None  # the SFT term on every chosen, as before
    assert (m["rollout/pairs"], m["rollout/ties_dropped"]) == (3, 0)


def test_sft_on_correct_only_masks_wrong_chosen(tiny_task, tmp_path):
    (judged, _), _ = judge(tmp_path, "algorithm.sft_on_correct_only=true", "algorithm.sft_weight=1")
    assert judged.pairs.sft_mask == [1.0, 1.0, 0.0]  # prompt 1's chosen is right without EOS: still correct


def test_sft_mask_selects_the_chosen_responses_the_nll_trains_on(tiny_task, tmp_path):
    cfg = resolved(smoke(tmp_path))
    worker = PolicyWorker(cfg, cfg.model.path, keep_opponent=False)
    items = load_items(cfg.data, worker.tokenizer, cfg.data.train_files, need_response=True)[0][:2]
    prompts, chosen = [it.prompt_ids for it in items], [it.response_ids for it in items]
    rejected = [c[:-2] + [worker.tokenizer.eos_token_id] for c in chosen]
    nll = -worker.sequence_logps(prompts, chosen) / torch.tensor([len(c) for c in chosen], dtype=torch.float32)
    zeros = torch.zeros(2)
    worker.start_schedule(10)
    sft = LossSettings(beta=0.1, loss_type="sft", sft_weight=1.0)
    before = [p.detach().clone() for p in worker.policy.parameters()]
    m = worker.update(Pairs(prompts, chosen, rejected, sft_mask=[0.0, 0.0]), sft, global_pairs=2, ref=(zeros, zeros))
    assert (m["loss"], m["train/sft_share"]) == (0.0, 0.0)
    assert all(torch.equal(a, p) for a, p in zip(before, worker.policy.parameters()))  # nothing to learn
    m = worker.update(Pairs(prompts, chosen, rejected, sft_mask=[1.0, 0.0]), sft, global_pairs=2, ref=(zeros, zeros))
    assert m["loss"] == pytest.approx(nll[0].item() / 2, rel=1e-5)  # pair 0's NLL, over both pairs
    assert m["train/sft_share"] == 0.5 and m["train/sft_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["spin", "online_dpo"])
def test_reference_initial_keeps_the_start_model_as_reference(tiny_task, tmp_path, mode):
    extra = (["algorithm.mode=online_dpo", "rollout.n=8", "rollout.temperature=1.5"] if mode == "online_dpo"
             else ["trainer.train_batch_size=64"])  # spin: one step per round over all its pairs (and round 1's)
    cfg = smoke(tmp_path, "algorithm.reference=initial", "data.val_files=null", "actor.lr=1e-3", *extra)
    run(cfg)
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    step = next(r for r in rows if r["kind"] == "train" and r["round"] == 2)  # round 2's first update
    pairs = pq.read_table(run_dir / "rounds" / "2" / "pairs.parquet").to_pydict()
    prompts, chosen = pairs["prompt_ids"], pairs["chosen_ids"]
    if mode == "online_dpo":  # the step's pairs: after those of the round's earlier (all-tied) steps
        before = int(sum(r["rollout/pairs"] for r in rows if r["kind"] == "rollout" and r["round"] == 2
                         and r["step"] < step["step"]))
        k = int(next(r for r in rows if r["kind"] == "rollout" and r["step"] == step["step"])["rollout/pairs"])
        prompts, chosen = prompts[before : before + k], chosen[before : before + k]
    else:  # history_rounds 1: round 2 trains on its pairs and round 1's
        old = pq.read_table(run_dir / "rounds" / "1" / "pairs.parquet").to_pydict()
        prompts, chosen = prompts + old["prompt_ids"], chosen + old["chosen_ids"]
    start = PolicyWorker(resolved(cfg), resolved(cfg).model.path, keep_opponent=False)
    assert step["logps/ref_chosen"] == pytest.approx(start.sequence_logps(prompts, chosen).mean().item(), rel=1e-5)
    assert abs(step["logps/chosen"] - step["logps/ref_chosen"]) > 1e-2  # the policy had moved: a real difference

    # resumed from a checkpoint, the reference is still the start model, not the checkpoint
    worker = PolicyWorker(resolved(cfg), str(run_dir / "checkpoints" / "2"), keep_opponent=True)
    assert torch.equal(worker.sequence_logps(prompts, chosen, opponent=True), start.sequence_logps(prompts, chosen))
