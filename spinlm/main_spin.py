"""A training run from its config: check it, lock the run directory, resume or start, load the data, the reward
and the workers, hand them to the trainer's round loop, and close everything cleanly; then write the report."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from spinlm.config import online_dpo_total_steps, resolved, to_yaml
from spinlm.config_check import validate
from spinlm.errors import UserError
from spinlm.data.items import load_items, load_val_items
from spinlm.report import write_report
from spinlm.run_dir import (METRICS_FILE, RunDir, TrainerState, drop_unfinished_metrics, latest_checkpoint,
                            load_trainer_state, run_lock, write_text_atomic)
from spinlm.seeding import seed_everything
from spinlm.rewards import get_reward_fn, score_responses
from spinlm.spin_trainer import SpinTrainer
from spinlm.tracking import Tracker
from spinlm.rewards.reward_model import build_reward
from spinlm.modeling import DTYPES, load_tokenizer, master_dtype, pick_device, tokenizer_source
from spinlm.workers.fsdp_workers import OPTIM_DIR
from spinlm.workers.worker_group import make_worker_group


log = logging.getLogger(__name__)


class RunError(UserError):
    """A run cannot start or go on; the message says why and what to do."""




def preflight_reward(reward_fn, items) -> None:
    """Call the reward once on a row with a ground truth (its own reference answer) before anything is written,
    so a reward function that cannot run fails now, naming the row, not rounds later."""
    for it in items:
        if it.example.ground_truth is not None:
            score_responses(reward_fn, [it], [it.example.response if it.example.response is not None else ""])
            return


@dataclass
class RunResult:
    """What a run hands back (`spinlm.train` in a notebook): the round table, where the run lives, its report."""

    rounds: list[dict]  # the round table, as in rounds.json
    run_dir: Path
    report: Path | None  # report.html; None when it was not written (a line on stderr says why)


def run(cfg) -> list[dict]:
    """Train; return the round table (the report is written too, see run_and_report)."""
    return run_and_report(cfg).rounds


def run_and_report(cfg) -> RunResult:
    validate(cfg)  # every rule, before anything heavy
    cfg = resolved(cfg)
    run_dir = Path(cfg.trainer.output_dir)
    table = train_rounds(cfg, run_dir)
    return RunResult(table, run_dir, report_or_warning(run_dir, cfg))


def report_or_warning(run_dir: Path, cfg) -> Path | None:
    """The report is a view of results already on disk: when it cannot be written the run's results stand, and
    a clear warning says why and how to retry."""
    if "jsonl" not in cfg.trainer.logger:
        log.info("no report: trainer.logger=%s has no jsonl, and the report reads %s", list(cfg.trainer.logger),
                 METRICS_FILE)
        return None
    try:
        path = write_report(run_dir)
    except Exception as exc:  # any failure: reported below, never hidden; the run itself succeeded
        log.warning("the run in %s is complete and saved, but its report could not be written: %s: %s. Retry with "
                    "`spinlm report %s`", run_dir, type(exc).__name__, exc, run_dir)
        return None
    return path


def train_rounds(cfg, run_dir: Path) -> list[dict]:
    """The rounds, holding the run directory's lock from before its first read to the end."""
    with run_lock(run_dir):
        return _train_rounds(cfg, run_dir)


def _train_rounds(cfg, run_dir: Path) -> list[dict]:
    latest = latest_checkpoint(run_dir) if cfg.trainer.resume == "auto" and run_dir.exists() else None
    if cfg.trainer.resume == "disable" and RunDir(run_dir).checkpoints.exists():
        raise RunError(f"trainer.output_dir={run_dir} already holds checkpoints and trainer.resume=disable: "
                       "pick a new trainer.output_dir, or set trainer.resume=auto to continue that run")
    if latest is not None and cfg.algorithm.mode == "online_dpo" and not (latest / OPTIM_DIR).is_dir():
        # online_dpo runs one optimizer and schedule over the whole run: without its state, resuming would
        # silently restart both
        raise RunError(f"{latest / OPTIM_DIR}: missing, and algorithm.mode=online_dpo resumes the optimizer and its "
                       "learning-rate schedule from it. Restore that folder, point checkpoints/latest at an earlier "
                       "checkpoint that has one, or pick a new trainer.output_dir")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg)

    tokenizer = load_tokenizer(tokenizer_source(cfg.model, latest), cfg.model.trust_remote_code)
    train_items, stats = load_items(cfg.data, tokenizer, cfg.data.train_files, need_response=cfg.algorithm.mode == "spin")
    val_items = load_val_items(cfg.data, tokenizer) if cfg.data.val_files else []
    reward_fn = get_reward_fn(cfg.reward)
    if cfg.reward.weights.rule != 0 or not cfg.reward.model_path:  # a zero weight: the rule reward never runs
        preflight_reward(reward_fn, val_items + train_items)
    # the reward model (if any) lives with the driver, which judges samples; it loads before anything is written
    reward = build_reward(cfg.reward, get_reward_fn(cfg.reward, judging=True), device=pick_device(cfg.trainer.device), dtype=DTYPES[master_dtype(cfg.model.dtype)])

    state = TrainerState()
    model_path = cfg.model.path
    if latest is not None:
        state = load_trainer_state(latest)
        model_path = str(latest)
        log.info("resuming from %s (next round %d of %d)", latest, state.next_round + 1, cfg.trainer.rounds)
    if state.next_round >= cfg.trainer.rounds:
        log.info("%s: all %d rounds are done (raise trainer.rounds to continue)", run_dir, cfg.trainer.rounds)
        return state.table

    keep_opponent = cfg.algorithm.mode == "online_dpo" or cfg.algorithm.reference == "initial"
    workers = make_worker_group(cfg, model_path, keep_opponent=keep_opponent, run_dir=run_dir)
    try:
        if latest is not None:
            workers.load_optimizer(latest, online_dpo_total_steps(cfg))
        # only now that every input has loaded: a bad input writes nothing
        write_text_atomic(RunDir(run_dir).config, to_yaml(cfg))
        drop_unfinished_metrics(run_dir, state.next_round)
        tracker = Tracker(run_dir, list(cfg.trainer.logger), cfg.trainer.log_every,
                          config=OmegaConf.to_container(cfg))
        try:
            tracker.log({"data/train_rows": float(len(train_items)), "data/val_rows": float(len(val_items)),
                         **{f"data/{k}": float(v) for k, v in stats.items()}}, round=state.next_round + 1,
                        step=state.global_step, kind="data")
            trainer = SpinTrainer(cfg, workers, tokenizer, train_items, val_items, reward_fn, run_dir, tracker, state,
                                  reward=reward)
            table = trainer.fit()
        except BaseException:
            tracker.close(failed=True)
            raise
        tracker.close()
        return table
    finally:
        workers.shutdown()
