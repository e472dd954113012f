"""End-to-end rounds on the tiny task, in-process on CPU: the run directory, both modes, resume, the opponent."""
from __future__ import annotations

import json
import math
import subprocess
import sys
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


def test_spin_round_writes_the_run_directory(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    table = run(smoke(tmp_path, "trainer.rounds=1"))
    assert [r["round"] for r in table] == [1]
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"
    rows = metrics(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2  # 32 prompts, batch 16
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "round", "step"):
        assert key in train[0]
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert {"val/acc", "val/acc/tiny_arith", "time/generate", "time/ref_logps", "time/update", "time/eval",
            "time/save"} <= set(val)
    # step 1: the policy IS the opponent, so exactly ln 2 and zero rewards (TRL's numbers), whatever the packing
    assert train[0]["loss"] == math.log(2)
    assert train[0]["rewards/chosen"] == train[0]["rewards/rejected"] == train[0]["rewards/accuracies"] == 0.0
    assert train[1]["rewards/margins"] != 0.0  # afterwards the opponent's numbers are the precomputed ones
    pairs = pq.read_table(run_dir / "rounds" / "1" / "pairs.parquet").to_pylist()
    assert len(pairs) > 0
    for p in pairs:  # mode spin: chosen is the ground truth and never the sample
        assert p["chosen_ids"] != p["rejected_ids"]
        assert p["chosen"].rstrip().split("#### ")[-1].strip().isdigit()

    # the checkpoint loads with plain transformers, with no spinlm import
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'checkpoints' / '1')!r}); "
            f"t = AutoTokenizer.from_pretrained({str(run_dir / 'checkpoints' / '1')!r}); "
            "assert t.chat_template and 'spinlm' not in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 100_000


def test_online_dpo_pairs_best_against_worst_of_the_same_prompt(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    # format_score: at temperature 1.5 the smoke model is rarely right, and a 0/1 reward alone can tie every prompt
    run(smoke(tmp_path, "algorithm.mode=online_dpo", "rollout.n=4", "trainer.rounds=1", "trainer.train_batch_size=16",
              "rollout.temperature=1.5", "reward.format_score=0.1"))
    train_prompts = {}
    for row in pq.read_table(tiny_task / "train.parquet").to_pylist():
        train_prompts[row["prompt"][0]["content"]] = row["reward_model"]["ground_truth"]
    pairs = pq.read_table(run_dir / "rounds" / "1" / "pairs.parquet").to_pylist()
    first = next(r for r in metrics(run_dir) if r["kind"] == "train")  # the round's first update: policy = opponent
    assert first["loss"] == math.log(2) and first["rewards/margins"] == first["rewards/accuracies"] == 0.0
    rollouts = [r for r in metrics(run_dir) if r["kind"] == "rollout"]
    assert sum(r["rollout/pairs"] for r in rollouts) == len(pairs)
    assert all(r["rollout/pairs"] + r["rollout/ties_dropped"] == 16 for r in rollouts)
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"]  # ties are dropped, never paired
        row = int(p["origin"].rsplit(":", 1)[1])
        question = pq.read_table(tiny_task / "train.parquet").slice(row, 1).to_pylist()[0]["prompt"][0]["content"]
        assert question in p["prompt"]  # the pair's prompt is the prompt its samples answered


def test_given_pairs_train_round_one_as_offline_dpo(tiny_task, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i}+{i}={2 * i}.\n#### {2 * i}",
             "rejected": f"{i}+{i}={2 * i + 1}.\n#### {2 * i + 1}", "data_source": "tiny_arith"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    run(smoke(tmp_path, f"data.train_files={data}", "trainer.rounds=1", "data.prompts_per_round=null"))
    given = [r for r in metrics(run_dir) if r["kind"] == "rollout"][0]
    assert given["rollout/given_pairs"] == 16
    pairs = pq.read_table(run_dir / "rounds" / "1" / "pairs.parquet").to_pylist()
    assert sorted(p["rejected"] for p in pairs) == sorted(r["rejected"] for r in rows)


def test_opponent_refresh_is_an_in_place_copy(tiny_task, tmp_path):
    cfg = resolved(smoke(tmp_path, "algorithm.mode=online_dpo", "rollout.n=2"))
    worker = PolicyWorker(cfg, cfg.model.path, keep_opponent=True)
    items, _ = load_items(cfg.data, worker.tokenizer, cfg.data.train_files, need_response=True)
    items = items[:8]
    prompts, chosen = [it.prompt_ids for it in items], [it.response_ids for it in items]
    rejected = [it.response_ids[:-3] + [worker.tokenizer.eos_token_id] for it in items]
    opponent_storage = [p.data_ptr() for p in worker.opponent.parameters()]
    assert worker.opponent is not worker.policy

    assert torch.equal(worker.sequence_logps(prompts, chosen), worker.sequence_logps(prompts, chosen, opponent=True))
    worker.start_schedule(10)
    ref_c = worker.sequence_logps(prompts, chosen, opponent=True)
    ref_r = worker.sequence_logps(prompts, rejected, opponent=True)
    for _ in range(2):  # warmup makes the first step's lr small; two steps move the policy
        worker.update(Pairs(prompts, chosen, rejected), LossSettings(beta=0.1), len(prompts), ref=(ref_c, ref_r))
    after_policy = worker.sequence_logps(prompts, chosen)
    assert not torch.allclose(after_policy, worker.sequence_logps(prompts, chosen, opponent=True))
    worker.refresh_opponent()
    assert torch.equal(after_policy, worker.sequence_logps(prompts, chosen, opponent=True))
    assert [p.data_ptr() for p in worker.opponent.parameters()] == opponent_storage  # same tensors, new values
    assert all(not p.requires_grad for p in worker.opponent.parameters())


def test_spin_keeps_one_model_resident(tiny_task, tmp_path):
    cfg = resolved(smoke(tmp_path))
    assert PolicyWorker(cfg, cfg.model.path, keep_opponent=False).opponent is None


def test_beta_per_round_is_used_per_round_and_old_checkpoints_are_pruned(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    run(smoke(tmp_path, "algorithm.beta=[0.5,2.0]", "trainer.keep_last_checkpoints=1"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "latest"]
    rows = [r for r in metrics(run_dir) if r["kind"] == "train"]
    for r in rows:  # rewards are beta * log-ratio, margins likewise: recover beta from them
        ratio = r["logps/chosen"] - r["logps/ref_chosen"]
        if abs(ratio) > 1e-3:
            assert r["rewards/chosen"] == pytest.approx((0.5 if r["round"] == 1 else 2.0) * ratio, rel=1e-4)


def test_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tiny_task, tmp_path):
    from spinlm.spin_trainer import NonFiniteError

    run_dir = tmp_path / "run"
    # round 2's beta makes exp(-beta * h) overflow as soon as the policy moves: loss and gradients are inf / nan
    with pytest.raises(NonFiniteError, match=r"round 2, step \d+: 1 steps in a row had a non-finite loss"):
        run(smoke(tmp_path, "algorithm.loss_type=exponential", "algorithm.beta=[0.5,1e38]", "trainer.max_bad_steps=0"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"
    bad = [r for r in metrics(run_dir) if r["kind"] == "train" and r["round"] == 2][-1]
    assert bad["train/skipped_steps"] == 1


def test_a_nan_grad_clip_skips_the_step_instead_of_writing_nan_weights(tiny_task, tmp_path):
    """The norm clip_grad_norm_ returns is the one before clipping: with max_norm=NaN it is finite, while the
    clipped gradients are all NaN. The guard looks at the gradients after clipping."""
    cfg = resolved(smoke(tmp_path))
    worker = PolicyWorker(cfg, cfg.model.path, keep_opponent=False)
    items, _ = load_items(cfg.data, worker.tokenizer, cfg.data.train_files, need_response=True)
    items = items[:4]
    prompts, chosen = [it.prompt_ids for it in items], [it.response_ids for it in items]
    rejected = [it.response_ids[:-2] + [worker.tokenizer.eos_token_id] for it in items]
    worker.start_schedule(4)
    ref_c, ref_r = worker.sequence_logps(prompts, chosen), worker.sequence_logps(prompts, rejected)
    before = {k: v.clone() for k, v in worker.policy.state_dict().items()}
    metrics = worker.actor.preference_step(Pairs(prompts, chosen, rejected), ref_c, ref_r, LossSettings(beta=0.1),
                                           worker.optimizer, grad_clip=float("nan"))
    assert metrics["train/step_skipped"] == 1.0 and metrics["train/params_non_finite"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in worker.policy.state_dict().items())


@pytest.mark.parametrize("override, match", [
    # the config check refuses both; train_rounds runs without it, as a value that slipped past would
    ("actor.grad_clip", r"round 1, step 1: 1 steps in a row had a non-finite loss or gradient norm"),
    ("actor.lr", r"round 1, step \d+: the parameters are not finite after the optimizer step .* Stopped without saving"),
], ids=["grad_clip_nan", "lr_inf"])
def test_a_non_finite_setting_never_saves_a_checkpoint(tiny_task, tmp_path, override, match):
    from spinlm.main_spin import train_rounds
    from spinlm.spin_trainer import NonFiniteError

    cfg = resolved(smoke(tmp_path, "trainer.rounds=1", "trainer.max_bad_steps=0", "actor.warmup_ratio=0",
                         f"{override}=.nan" if override == "actor.grad_clip" else f"{override}=.inf"))
    with pytest.raises(NonFiniteError, match=match):
        train_rounds(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("drop", [True, False])
def test_a_sample_equal_to_the_ground_truth_is_never_a_rejected_response(tiny_task, tmp_path, drop):
    from spinlm.rewards import get_reward_fn
    from spinlm.rollout.hf_rollout import Rollout
    from spinlm.run_dir import TrainerState
    from spinlm.spin_trainer import SpinTrainer
    from spinlm.modeling import load_tokenizer

    cfg = resolved(smoke(tmp_path, f"algorithm.drop_identical_pairs={str(drop).lower()}"))
    tok = load_tokenizer(cfg.model.path)
    items = load_items(cfg.data, tok, cfg.data.train_files, need_response=True)[0][:3]
    eos = tok.eos_token_id
    samples = [items[0].response_ids, tok("#### 0", add_special_tokens=False)["input_ids"] + [eos], [eos]]
    trainer = SpinTrainer(cfg, None, tok, items, [], get_reward_fn(cfg.reward), tmp_path, None, TrainerState())
    judged, m = trainer.judge_against_ground_truth(items, Rollout([[s] for s in samples], [[True]] * 3))
    kept = [1, 2] if drop else [0, 1, 2]
    assert judged.pairs.rejected == [samples[i] for i in kept]
    assert judged.pairs.chosen == [items[i].response_ids for i in kept]
    assert m["rollout/identical_dropped"] == (1 if drop else 0)
    assert m["rollout/reward_mean"] == pytest.approx(1 / 3)  # the copy of the ground truth is right, the others not


def test_collapse_warning_stops_a_collapsing_run_and_not_a_guarded_one(tiny_task, tmp_path):
    from spinlm.spin_trainer import CollapseError

    collapsing = ["algorithm.beta=0.1", "actor.lr=1e-3", "algorithm.dpop_lambda=0", "algorithm.sft_weight=0"]
    with pytest.raises(CollapseError, match=r"round \d: the chosen responses' log-prob fell \d+\.\d+ nats below") as err:
        run(smoke(tmp_path / "plain", *collapsing, "trainer.stop_on_collapse=true"))
    plain = tmp_path / "plain" / "run"
    collapsed = int(str(err.value).split(":")[0].split()[-1])
    latest = plain / "checkpoints" / "latest"  # the collapsed round was not saved; an earlier one is kept
    assert (latest.read_text().strip() if latest.exists() else None) == (str(collapsed - 1) if collapsed > 1 else None)
    health = [r for r in metrics(plain) if r["kind"] == "health"]
    assert health[-1]["train/collapse_warning"] == 1.0 and health[-1]["train/chosen_drift"] < -1.0

    # the demo's guard (DPOP + SFT term at its lr): a guard acts from the second step on, so at lr 1e-3 the first
    # step alone already drops the chosen log-prob by ~4 nats, whatever the guard
    guarded = ["algorithm.beta=1.0", "actor.lr=2e-4", "algorithm.dpop_lambda=5", "algorithm.sft_weight=1"]
    run(smoke(tmp_path / "guarded", *guarded, "trainer.stop_on_collapse=true"))
    assert all(r["train/collapse_warning"] == 0.0 for r in metrics(tmp_path / "guarded" / "run") if r["kind"] == "health")


def test_sft_only_loss_and_sampled_val_metrics(tiny_task, tmp_path):
    # loss_type=sft is the continued-SFT baseline of benchmarks/quality.py: the loss IS the chosen NLL
    run(smoke(tmp_path, "trainer.rounds=1", "algorithm.loss_type=sft", "algorithm.sft_weight=1.0",
              "algorithm.drop_identical_pairs=false", "trainer.val_pass_k=3", "data.val_max_samples=16"))
    rows = metrics(tmp_path / "run")
    for r in (r for r in rows if r["kind"] == "train"):
        assert r["loss"] == pytest.approx(r["train/sft_nll"], rel=1e-6)
    val = [r for r in rows if r["kind"] == "val"][-1]
    # pass@3 with 3 samples is "any of 3 right", never below their mean score, which is a fraction of 16 x 3
    assert 0.0 <= val["val/mean@3"] <= val["val/pass@3"] <= 1.0
    assert (val["val/mean@3"] * 48) == pytest.approx(round(val["val/mean@3"] * 48), abs=1e-9)


def test_samples_cut_at_the_length_limit_are_warned_about_once_per_round(tiny_task, tmp_path, caplog):
    """The tiny task's answers take more than 3 tokens: every sample is cut, and the user is told so."""
    with caplog.at_level("WARNING", logger="spinlm"):
        run(smoke(tmp_path, "trainer.rounds=1", "data.max_response_length=3", "data.prompts_per_round=16",
                         "data.truncation=right"))
    cut = [r.getMessage() for r in caplog.records if "without an EOS" in r.getMessage()]
    assert cut == ["round 1 generate: 100% of the 16 samples reached data.max_response_length=3 without an EOS, so "
                   "they are judged (and trained on) cut off. Raise data.max_response_length, or check that the chat "
                   "template ends answers with the tokenizer's EOS"]
    rollout = [r for r in metrics(tmp_path / "run") if r["kind"] == "rollout"]
    assert rollout[0]["rollout/eos_rate"] == 0.0


def test_a_damaged_optimizer_shard_is_named_not_a_traceback(tiny_task, tmp_path):
    """online_dpo resumes its optimizer from DCP shards; one cut short in a checkpoint that has no checksums.json
    (saved before spinlm wrote them, so nothing verifies it first) is named, with what to do."""
    from spinlm.errors import UserError

    common = ["algorithm.mode=online_dpo", "rollout.n=2", "data.prompts_per_round=null", "trainer.train_batch_size=8",
              "algorithm.ref_update_every=1"]
    run(smoke(tmp_path, "trainer.rounds=1", *common))
    checkpoint = tmp_path / "run" / "checkpoints" / "1"
    (checkpoint / "checksums.json").unlink()
    (shard,) = (checkpoint / "optimizer").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(UserError, match=rf"{checkpoint / 'optimizer'}: the optimizer state cannot be read \(EOFError\); "
                                        r"the checkpoint is damaged\. Write the name of an earlier checkpoint into "):
        run(smoke(tmp_path, "trainer.rounds=2", *common))
