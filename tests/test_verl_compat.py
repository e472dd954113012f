"""verl's recipe/spin command line runs as spinlm's: its published run_spin.sh arguments (paths and GPU counts
changed) through `spinlm config check` and a short real train, each verl key mapped, noted or refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spinlm.cli import main
from spinlm.config import load_config
from spinlm.errors import ConfigError


def run_spin_sh(model: Path, data: Path) -> list[str]:
    """verl's recipe/spin/run_spin.sh (volcengine/verl before the recipes moved out), argument for argument: only
    the paths and the GPU count (4 -> 0: CPU) are changed."""
    return [
        f"data.train_files={data}/train.parquet",
        f"data.val_files={data}/val.parquet",
        "data.train_batch_size=1024",
        "data.max_prompt_length=1024",
        "data.max_response_length=1024",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.actor.ppo_mini_batch_size=64",
        "actor_rollout_ref.actor.ppo_micro_batch_size=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size=64",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size=64",
        "algorithm.kl_ctrl.kl_coef=0.001",
        "trainer.logger=console",
        "trainer.val_before_train=True",
        "trainer.n_gpus_per_node=0",
        "trainer.nnodes=1",
        "trainer.save_freq=-1",
        "trainer.test_freq=1",
        "+trainer.log_freq=1",
        "trainer.ref_update_freq=1",
        "trainer.total_epochs=1000",
    ]


@pytest.fixture(scope="module")
def long_model(tiny_task, tmp_path_factory) -> Path:
    """The tiny task's model with room for verl's 1024 + 1024 tokens (a Llama's positions are rotary: only the
    config's limit changes)."""
    path = tmp_path_factory.mktemp("verl") / "model"
    shutil.copytree(tiny_task / "sft_model", path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_run_spin_sh_passes_config_check(tiny_task, long_model, tmp_path):
    args = run_spin_sh(long_model, tiny_task)
    result = subprocess.run([sys.executable, "-m", "spinlm.cli", "config", "check", f"trainer.output_dir={tmp_path}",
                             *args], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config check: OK"
    notes = result.stderr
    assert notes.count("verl keys translated:") == 1  # printed once
    assert "data.train_batch_size=1024 -> trainer.train_batch_size=1024" in notes
    assert "actor_rollout_ref.actor.ppo_micro_batch_size=8 -> actor.micro_batch_size=8" in notes
    assert "algorithm.kl_ctrl.kl_coef=0.001: no counterpart, changes nothing here" in notes
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=1: no counterpart" in notes

    cfg = load_config(args)
    assert cfg.model.path == str(long_model)
    assert (cfg.trainer.train_batch_size, cfg.actor.lr, cfg.actor.micro_batch_size) == (1024, 1e-6, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 1024)
    assert (cfg.rollout.gpu_memory_utilization, cfg.algorithm.ref_update_every, cfg.trainer.rounds) == (0.4, 1, 1000)
    assert list(cfg.trainer.logger) == ["console", "jsonl"]
    assert (cfg.trainer.eval_before_training, cfg.trainer.log_every) == (True, 1)
    assert "actor_rollout_ref" not in cfg and "kl_ctrl" not in cfg.algorithm  # no verl key is left behind
    assert "total_epochs" not in cfg.trainer and "train_batch_size" not in cfg.data


def test_global_micro_batch_is_divided_by_the_world_size():
    cfg = load_config(["trainer.n_gpus_per_node=4", "trainer.nnodes=2",
                       "actor_rollout_ref.actor.ppo_micro_batch_size=16"])
    assert cfg.actor.micro_batch_size == 2  # 16 over 4 x 2 ranks, as verl does
    cfg = load_config(["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3", "trainer.n_gpus_per_node=4"])
    assert cfg.actor.micro_batch_size == 3


def test_values_converted_where_conventions_differ():
    cfg = load_config(["actor_rollout_ref.rollout.top_k=-1", "data.val_max_samples=-1",
                       "trainer.logger=wandb", "trainer.experiment_name=gsm8k_spin",
                       "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
                       "actor_rollout_ref.actor.dpo_beta=0.3", "algorithm.dpo_loss_type=ipo"])
    assert (cfg.rollout.top_k, cfg.data.val_max_samples, list(cfg.trainer.logger)) == (0, None, ["wandb", "jsonl"])
    assert list(load_config(["trainer.logger=[console]"]).trainer.logger) == ["console"]  # spinlm's list: as given
    assert (cfg.trainer.output_dir, cfg.rollout.engine, cfg.rollout.n) == ("outputs/gsm8k_spin", "vllm", 4)
    assert (cfg.algorithm.beta, cfg.algorithm.loss_type) == (0.3, "ipo")


def test_a_later_spinlm_key_wins_over_the_verl_key_before_it():
    assert load_config(["trainer.total_epochs=1000", "trainer.rounds=2"]).trainer.rounds == 2


def test_what_spinlm_does_not_do_is_refused_all_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(["actor_rollout_ref.rollout.name=sglang", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
                     "trainer.default_hdfs_dir=hdfs://x/ckpt", "trainer.ref_update_freq=-1",
                     "actor_rollout_ref.actor.strategy=megatron", "algorithm.use_kl_in_reward=true",
                     "actor_rollout_ref.actor.optim.lr_warmup_steps=15", "actor_rollout_ref.actor.no_such_key=1",
                     "trainer.default_hdfs_dir=null"])
    problems = {p.split("=")[0]: p for p in err.value.problems}
    assert sorted(problems) == sorted([
        "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "trainer.ref_update_freq", "actor_rollout_ref.actor.strategy", "algorithm.use_kl_in_reward",
        "actor_rollout_ref.actor.optim.lr_warmup_steps", "actor_rollout_ref.actor.no_such_key"])  # hdfs: null at last
    assert "not supported: spinlm's rollout engines are hf and vllm, not 'sglang'" in problems[
        "actor_rollout_ref.rollout.name"]
    assert "actor.warmup_ratio" in problems["actor_rollout_ref.actor.optim.lr_warmup_steps"]
    assert "no spinlm counterpart" in problems["actor_rollout_ref.actor.no_such_key"]
    with pytest.raises(ConfigError, match="trainer.default_hdfs_dir='hdfs://x/ckpt': not supported: spinlm writes"):
        load_config(["trainer.default_hdfs_dir=hdfs://x/ckpt"])


def test_run_spin_sh_trains_on_the_tiny_task(tiny_task, tmp_path, capsys):
    """The same argument list, sized for the tiny task (batch, lengths, epochs) and as verl's online DPO."""
    sizes = {"data.train_batch_size": "8", "data.max_prompt_length": "96", "data.max_response_length": "48",
             "trainer.total_epochs": "1"}
    args = [a if a.split("=")[0] not in sizes else f"{a.split('=')[0]}={sizes[a.split('=')[0]]}"
            for a in run_spin_sh(tiny_task / "sft_model", tiny_task)]
    run_dir = tmp_path / "run"
    code = main(["train", "preset=smoke", f"trainer.output_dir={run_dir}", "data.val_max_samples=4",
                 "algorithm.mode=online_dpo", "actor_rollout_ref.rollout.n=2", *args])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert err.count("verl keys translated:") == 1
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == ["start", 1]  # val_before_train, then total_epochs=1 round
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 1  # ref_update_freq=1: one step per round
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"


def test_critic_keys_change_nothing():
    assert "critic" not in load_config(["critic.optim.lr=1e-5", "critic.ppo_micro_batch_size_per_gpu=4"])


def test_a_key_spinlm_shares_with_verl_is_a_plain_override(caplog):
    """data.val_max_samples=8 means the same in both: no translation line, no recipe note; -1 is verl's 'all'."""
    with caplog.at_level("INFO", logger="spinlm"):
        cfg = load_config(["data.val_max_samples=8"])
    assert cfg.data.val_max_samples == 8 and "verl" not in caplog.text
    with caplog.at_level("INFO", logger="spinlm"):
        cfg = load_config(["data.val_max_samples=-1"])
    assert cfg.data.val_max_samples is None and "data.val_max_samples=-1 -> data.val_max_samples=None" in caplog.text
