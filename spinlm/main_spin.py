"""A training run from its config: check it, lock the run directory, resume or start, load the data, the reward
and the workers, hand them to the trainer's round loop, and close everything cleanly; then write the report.

Before anything loads, a start is checked against the run directory (see ``plan_start``): a resume whose settings
or input files differ from the run's last start in anything that changes the run is refused, listing each change
(``algorithm.beta: 0.1 -> 0.2``), unless trainer.allow_config_change=true; the keys that may change are the
allow-list MAY_CHANGE_KEYS / MAY_CHANGE_SECTIONS. A new run into a directory that holds an earlier run's metrics,
pairs or checkpoints but nothing to continue from is refused too, once its inputs have been read and before any
model loads. Every start that goes on is recorded (run.json, config_history.jsonl) only once every input has loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from spinlm.config import default_config, flatten, online_dpo_total_steps, resolved, to_yaml
from spinlm.config_check import validate
from spinlm.errors import UserError
from spinlm.data.items import load_items, load_val_items
from spinlm.report import write_report
from spinlm.run_dir import (CHECKPOINTS_DIR, METRICS_FILE, OPTIM_DIR, RUN_RECORD_FILE, Leftovers, RunDir, RunRecord,
                            TrainerState, append_history, changed_files, describe_file_change,
                            drop_unfinished_metrics, find_leftovers, fingerprint_paths, latest_checkpoint,
                            load_trainer_state, now_utc, read_run_record, run_lock, write_run_record,
                            write_text_atomic)
from spinlm.seeding import seed_everything
from spinlm.rewards import get_reward_fn, score_responses
from spinlm.spin_trainer import SpinTrainer
from spinlm.tracking import Tracker
from spinlm.rewards.reward_model import build_reward
from spinlm.modeling import DTYPES, load_tokenizer, master_dtype, pick_device, tokenizer_source
from spinlm.workers.worker_group import make_worker_group


log = logging.getLogger(__name__)


class RunError(UserError):
    """A run cannot start or go on; the message says why and what to do."""


class ConfigChangedError(RunError):
    """A start that would continue a run with settings or input files that change it."""


class StaleRunDirError(RunError):
    """A new run pointed at a directory holding an earlier run's files and no checkpoint to continue from."""


# ---- what a start may change -----------------------------------------------------------------------------------------
# The keys a start may set differently from the run's last start (each change is recorded in config_history.jsonl).
# Every other key changes the run: an allow-list, so that a key added later counts as run-changing until it is
# listed here.
MAY_CHANGE_KEYS = (
    # how far it goes and where its output goes (more rounds continue the run; online_dpo stretches its schedule)
    "trainer.rounds", "trainer.output_dir", "trainer.logger", "trainer.log_every", "trainer.keep_last_checkpoints",
    # this start's own switches; the values a preset sets are compared one by one
    "trainer.resume", "preset",
    # where and how it runs: the same computation laid out differently (the draws depend on neither the world size
    # nor rollout.batch_size: tests/test_distributed.py), or only memory and speed
    "trainer.device", "trainer.launcher", "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.cpu_workers",
    "trainer.threads", "rollout.batch_size", "rollout.gpu_memory_utilization", "rollout.vllm_sleep",
    "rollout.vllm_enforce_eager", "actor.micro_batch_size", "actor.max_tokens_per_micro_batch",
    "actor.logprob_chunk_size", "actor.opponent_offload", "model.gradient_checkpointing", "model.attn_implementation",
    "reward.model_batch_size",
    # measuring and stopping: what is evaluated, when to give up; never what is trained on (the val files and
    # val_max_samples are not here: the round table's accuracies would stop being comparable)
    "trainer.eval_before_training", "trainer.val_pass_k", "trainer.max_bad_steps", "trainer.collapse_threshold",
    "trainer.stop_on_collapse", "reward.timeout_s",
)
MAY_CHANGE_SECTIONS = ("ray", "eval", "sft")  # how to reach the cluster; settings of other commands
NOT_COMPARED = ("trainer.allow_config_change",)  # the override itself
# The keys that name input files or folders: their fingerprints are recorded, and compared as absolute paths
INPUT_KEYS = ("model.path", "model.tokenizer_path", "data.train_files", "data.val_files", "reward.custom_path",
              "reward.model_path")


def may_change(key: str) -> bool:
    return key in MAY_CHANGE_KEYS or key.split(".", 1)[0] in MAY_CHANGE_SECTIONS


def _show(value: Any) -> str:
    """A value as it is typed in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_show, value)) + "]"
    return str(value) if value != "" else "''"


def _absolute_if_local(value: Any) -> Any:
    """A path that exists here, made absolute; anything else (a hub id, null) as it is."""
    if isinstance(value, list):
        return [_absolute_if_local(v) for v in value]
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).absolute())
    return value


def run_identity(cfg) -> dict:
    """What a start is recorded as: its resolved config (input paths absolute) and the fingerprints of its inputs."""
    config = OmegaConf.to_container(cfg, resolve=True)
    files = {}
    for key in INPUT_KEYS:
        section, leaf = key.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[leaf] = value = _absolute_if_local(node[leaf])
        files[key] = fingerprint_paths(value if isinstance(value, list) else [value] if isinstance(value, str) else [])
    return {"time": now_utc(), "config": config, "files": files}


@dataclass
class Change:
    """One setting, or one input file, that differs from the run's last start."""

    key: str
    old: Any
    new: Any
    file: str | None = None  # an input file of `key` (old / new are then its fingerprints, None when absent)

    def text(self) -> str:
        if self.file is not None:
            return f"{self.key}: {describe_file_change(self.file, self.old, self.new)}"
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def row(self) -> dict:
        return {"key": self.key, "old": self.old, "new": self.new, **({"file": self.file} if self.file else {})}


def config_changes(last: dict, now: dict) -> list[Change]:
    """Each setting and input file that differs between the run's last start (run.json's current) and this one.
    A key the last start did not have (added to spinlm since) counts as its packaged default."""
    old, new = flatten(last["config"]), flatten(now["config"])
    defaults = flatten(OmegaConf.to_container(default_config(), resolve=False))
    changes = [Change(key, old.get(key, defaults.get(key)), value) for key, value in new.items()
               if key not in NOT_COMPARED and old.get(key, defaults.get(key)) != value]
    renamed = {c.key for c in changes}
    for key in INPUT_KEYS:
        # a different path is said once, by its key; a key whose files were not recorded has nothing to compare
        if key not in renamed and key in last["files"]:
            changes += [Change(key, a, b, file=path)
                        for path, a, b in changed_files(last["files"].get(key, {}), now["files"].get(key, {}))]
    return changes


@dataclass
class StartPlan:
    """What this start is, decided before anything loads; recorded (record_start) once every input has loaded."""

    kind: str                   # new | restart (redoes the unfinished first round) | resume (from a checkpoint)
    identity: dict              # this start's config and input fingerprints
    record: RunRecord | None    # run.json as found (None: a new directory, or one from before run.json existed)
    changes: list[Change]
    forced: bool                # run-changing changes let through by trainer.allow_config_change=true
    checkpoint: Path | None
    leftovers: Leftovers | None  # kind new: an earlier run's files (refused before any model loads)


def plan_start(cfg, run_dir: Path, latest: Path | None) -> StartPlan:
    """Compare this start with the run's last start; refuse (ConfigChangedError) a change that changes the run."""
    identity = run_identity(cfg)
    record = read_run_record(run_dir)
    leftovers = None
    if latest is not None:
        kind = "resume"
    else:
        leftovers = find_leftovers(run_dir)
        # a run stopped during its first round (before its first checkpoint), started again: it redoes that round
        kind = "restart" if leftovers and record is not None and leftovers.of_first_round_only() else "new"
    changes = config_changes(record.current, identity) if record is not None and kind != "new" else []
    changing = [c for c in changes if not may_change(c.key)]
    what = f"resuming from {CHECKPOINTS_DIR}/{latest.name}" if latest is not None else "redoing its unfinished round 1"
    listed = "\n".join(f"  {c.text()}" for c in changing)
    run = RunDir(run_dir)
    if changing and not cfg.trainer.allow_config_change:
        raise ConfigChangedError(
            f"trainer.output_dir={run_dir}: {what} with settings that change the run (compared with its last start, "
            f"recorded in {run.record}):\n{listed}\nNothing was loaded or written. To continue this run, start it "
            f"with its own settings (its last start's resolved config is {run.config}); for a new run with these "
            f"settings, pick a new trainer.output_dir; to continue this run with these changes anyway, pass "
            f"trainer.allow_config_change=true (they are then recorded in {run.history}).")
    if changing:
        log.warning("trainer.allow_config_change=true: %s in %s with settings that change the run:\n%s\n"
                    "(recorded in %s with forced=true)", what, run_dir, listed, run.history)
    if kind == "resume" and record is None:
        log.info("%s has no %s (a run directory from before spinlm recorded a run's settings): resuming from %s "
                 "without comparing them; this start's settings and input fingerprints are recorded now",
                 run_dir, RUN_RECORD_FILE, latest)
    return StartPlan(kind, identity, record, changes, bool(changing), latest, leftovers if kind == "new" else None)


def refuse_leftovers(run_dir: Path, leftovers: Leftovers) -> None:
    """A new run over an earlier run's files would drop its metrics and mix its rounds into the new report."""
    if not leftovers:
        return
    found = ", ".join(leftovers.describe(run_dir))
    latest = RunDir(run_dir).latest
    hint = (f" ({', '.join(f'{CHECKPOINTS_DIR}/{n}' for n in leftovers.checkpoints)} complete, but {latest} names "
            f"none: to continue from one, write its name into {latest})" if leftovers.checkpoints else "")
    raise StaleRunDirError(
        f"trainer.output_dir={run_dir} holds the files of an earlier run and no checkpoint to continue from: "
        f"{found}{hint}. A new run here would drop those metrics and mix those rounds into its report. Pick a new "
        f"trainer.output_dir, or move those files out of {run_dir} and run again. Nothing was written.")


def record_start(run_dir: Path, plan: StartPlan) -> None:
    """run.json (start kept, current = this start) and this start's row in config_history.jsonl."""
    first = plan.identity if plan.record is None or plan.kind == "new" else plan.record.start
    write_run_record(run_dir, RunRecord(start=first, current=plan.identity))
    row = {"start": plan.kind, "checkpoint": f"{CHECKPOINTS_DIR}/{plan.checkpoint.name}" if plan.checkpoint else None,
           "changed": [c.row() for c in plan.changes], "forced": plan.forced}
    if plan.record is None and plan.kind == "resume":
        row["note"] = f"no {RUN_RECORD_FILE} before this start: its settings were not compared"
    append_history(run_dir, row)


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
    """Check the config, train; return the round table (the report is written too, see run_and_report)."""
    validate(cfg)  # every rule, before anything heavy
    return run_and_report(cfg).rounds


def run_and_report(cfg) -> RunResult:
    """Train on a config that passed config_check.validate (spinlm.train checks it before torch loads)."""
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
    checkpoints = RunDir(run_dir).checkpoints
    # hidden entries are a save that never completed (.tmp-*): nothing to resume from
    if cfg.trainer.resume == "disable" and checkpoints.is_dir() and any(
            not p.name.startswith(".") for p in checkpoints.iterdir()):
        raise RunError(f"trainer.output_dir={run_dir} already holds checkpoints and trainer.resume=disable: "
                       "pick a new trainer.output_dir, or set trainer.resume=auto to continue that run")
    if latest is not None and cfg.algorithm.mode == "online_dpo" and not (latest / OPTIM_DIR).is_dir():
        # online_dpo runs one optimizer and schedule over the whole run: without its state, resuming would
        # silently restart both
        raise RunError(f"{latest / OPTIM_DIR}: missing, and algorithm.mode=online_dpo resumes the optimizer and its "
                       "learning-rate schedule from it. Restore that folder, point checkpoints/latest at an earlier "
                       "checkpoint that has one, or pick a new trainer.output_dir")
    start = plan_start(cfg, run_dir, latest)  # a start that changes the run is refused before anything loads
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg)

    tokenizer = load_tokenizer(tokenizer_source(cfg.model, latest), cfg.model.trust_remote_code)
    train_items, stats = load_items(cfg.data, tokenizer, cfg.data.train_files, need_response=cfg.algorithm.mode == "spin")
    val_items = load_val_items(cfg.data, tokenizer) if cfg.data.val_files else []
    reward_fn = get_reward_fn(cfg.reward)
    if cfg.reward.weights.rule != 0 or not cfg.reward.model_path:  # a zero weight: the rule reward never runs
        preflight_reward(reward_fn, val_items + train_items)
    if start.leftovers is not None:  # after the inputs (a bad one is named first), before any model loads
        refuse_leftovers(run_dir, start.leftovers)
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
        record_start(run_dir, start)
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
