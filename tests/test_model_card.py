"""Each checkpoint's Hugging Face folder carries a model card (README.md): base model, data, method and settings,
round, val metrics."""
from __future__ import annotations

import json

from spinlm.config import load_config, resolved
from spinlm.main_spin import run
from spinlm.model_card import model_card


def test_every_checkpoint_has_a_model_card_with_its_numbers(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(["preset=smoke", f"trainer.output_dir={run_dir}", "trainer.rounds=1", "data.val_max_samples=4",
                       "data.prompts_per_round=8", "trainer.train_batch_size=8", "algorithm.dpop_lambda=5",
                       "algorithm.sft_weight=1.0"])
    run(cfg)
    card = (run_dir / "checkpoints" / "1" / "README.md").read_text()
    rounds = json.loads((run_dir / "rounds.json").read_text())
    start, first = rounds[0]["val_acc"], rounds[1]["val_acc"]
    assert card.startswith(f"---\nbase_model: {tiny_task / 'sft_model'}\nlibrary_name: transformers\n"
                           "tags: [spinlm, spin, dpo]\n---\n")
    assert "# run, round 1\n" in card
    assert f"| train | `{tiny_task / 'train.parquet'}` |" in card
    assert f"| validation | `{tiny_task / 'val.parquet'}` |" in card
    assert "| method | `algorithm.mode=spin`: SPIN (self-play fine-tuning)" in card
    assert "| rounds | 1 of 1 |" in card
    assert "| loss | sigmoid, beta 0.1, DPOP lambda 5, SFT weight 1.0 |" in card
    assert "| batch | 8 pairs per step |" in card
    assert "| per round | 8 prompts, 1 epoch(s) |" in card
    assert f"| val/acc | {start:.4g} | {first:.4g} |" in card
    assert "the first 4 validation prompts" in card


def test_online_dpo_card_names_the_reward_and_steps():
    cfg = resolved(load_config(["model.path=org/base", "data.train_files=t.parquet", "algorithm.mode=online_dpo",
                                "rollout.n=4", "reward.gsm8k_method=flexible", "model.lora.rank=8",
                                "trainer.rounds=3", "algorithm.ref_update_every=5", "data.val_files=null"]))
    card = model_card(cfg, 2, {"val/acc": 0.25, "val/acc/gsm8k": 0.25, "time/x": 3.0})
    assert "tags: [spinlm, online-dpo, dpo]" in card
    assert "| rounds | 2 of 3 |" in card
    assert "| per round | 5 steps; reward: built-in (flexible GSM8K match) |" in card
    assert "| LoRA | rank 8, alpha 16 (merged into these weights) |" in card
    assert "| val/acc | - | 0.25 |\n| val/acc/gsm8k | - | 0.25 |\n" in card and "time/x" not in card
    assert "| validation | - |" in card and "| train | `t.parquet` |" in card
