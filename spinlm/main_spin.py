"""The director: check the config, load data, start the worker, run the rounds, close cleanly."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from spinlm.checkpoint import latest_checkpoint, load_state
from spinlm.config import resolved, to_yaml
from spinlm.config_check import validate
from spinlm.errors import UserError
from spinlm.data.dataset import tokenize_examples
from spinlm.data.formats import load_examples
from spinlm.rewards import get_reward_fn
from spinlm.spin_trainer import SpinTrainer, TrainerState
from spinlm.tracking import Tracker
from spinlm.workers.fsdp_workers import PolicyWorker, load_tokenizer


class RunError(UserError):
    """A run cannot start or go on; the message says why and what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_items(cfg, tokenizer, files, *, need_response: bool):
    d = cfg.data
    examples, _ = load_examples(files, d.format, skip_bad_rows=d.skip_bad_rows, default_data_source=d.default_data_source)
    items, stats = tokenize_examples(examples, tokenizer, max_prompt_length=d.max_prompt_length,
                                     max_response_length=d.max_response_length, truncation=d.truncation)
    if need_response:
        missing = [it.example.origin for it in items if it.response_ids is None]
        if missing:
            raise RunError(f"algorithm.mode=spin needs a ground-truth response for every prompt; {len(missing)} rows have "
                           f"none (first: {missing[0]}). Use a format with responses, or algorithm.mode=online_dpo")
    return items, stats


def drop_unfinished_metrics(run_dir: Path, done_rounds: int) -> None:
    """A run killed mid-round logged steps that the resumed run will redo: keep only completed rounds' rows."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] <= done_rounds]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def run(cfg) -> list[dict]:
    validate(cfg)  # every rule, before anything heavy
    cfg = resolved(cfg)
    run_dir = Path(cfg.trainer.output_dir)
    latest = latest_checkpoint(run_dir) if cfg.trainer.resume == "auto" and run_dir.exists() else None
    if cfg.trainer.resume == "disable" and (run_dir / "checkpoints").exists():
        raise RunError(f"trainer.output_dir={run_dir} already holds checkpoints and trainer.resume=disable: "
                       "pick a new trainer.output_dir, or set trainer.resume=auto to continue that run")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)

    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path, cfg.model.trust_remote_code)
    train_items, stats = load_items(cfg, tokenizer, cfg.data.train_files, need_response=cfg.algorithm.mode == "spin")
    val_items = []
    if cfg.data.val_files:
        val_items, _ = load_items(cfg, tokenizer, cfg.data.val_files, need_response=False)
        val_items = [it for it in val_items if it.example.ground_truth is not None][: cfg.data.val_max_samples or None]
    reward_fn = get_reward_fn(cfg.reward)

    state = TrainerState()
    model_path = cfg.model.path
    if latest is not None:
        saved = load_state(latest)
        state = TrainerState(saved["next_round"], saved["global_step"], saved["skipped_steps"], list(saved["table"]))
        model_path = str(latest)
        print(f"resuming from {latest} (next round {state.next_round + 1} of {cfg.trainer.rounds})")
    if state.next_round >= cfg.trainer.rounds:
        print(f"{run_dir}: all {cfg.trainer.rounds} rounds are done (raise trainer.rounds to continue)")
        return state.table

    worker = PolicyWorker(cfg, model_path, keep_opponent=cfg.algorithm.mode == "online_dpo")
    if latest is not None and cfg.algorithm.mode == "online_dpo":
        worker.load_training_state(saved, cfg.trainer.rounds * cfg.algorithm.ref_update_every)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now that every input has loaded: a bad input writes nothing
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if latest is not None:
        drop_unfinished_metrics(run_dir, state.next_round)
    tracker = Tracker(run_dir, list(cfg.trainer.logger), cfg.trainer.log_every)
    tracker.log({"data/train_rows": float(len(train_items)), "data/val_rows": float(len(val_items)),
                 **{f"data/{k}": float(v) for k, v in stats.items()}}, round=state.next_round + 1, step=state.global_step,
                kind="data")
    try:
        return SpinTrainer(cfg, worker, train_items, val_items, reward_fn, run_dir, tracker, state).fit()
    finally:
        tracker.close()
