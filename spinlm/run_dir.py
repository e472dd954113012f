"""The run directory (trainer.output_dir): its layout, who may write there, and how each of its files is written
and read. No other module spells these names; they ask this one for the paths.

    <run>/.lock                        held while a run uses the directory: an advisory fcntl lock, and the holder's pid
    <run>/config.yaml                  the resolved config of the last start (written atomically)
    <run>/rounds.json                  the round table (written atomically)
    <run>/metrics.jsonl                one JSON row per logged step (tracking.Tracker appends; pruned on a restart)
    <run>/rounds/<t>/pairs.parquet     round t's judged pairs: text, scores and token ids (written atomically)
    <run>/checkpoints/<t>/             round t's checkpoint: the Hugging Face model folder (written by the workers,
                                       with optimizer/ in online_dpo, and a model card), trainer_state.pt written last
    <run>/checkpoints/.tmp-<t>/        a checkpoint being written; renamed to <t> once complete
    <run>/checkpoints/latest           the name of the last COMPLETE checkpoint (written atomically, after the folder)
    <run>/report/                      `spinlm report`'s output (spinlm/report.py)
    <run>/tensorboard/ mlruns/ wandb/  the optional trackers' own folders (spinlm/tracking.py)

Rounds are numbered from 1 in every name (round t is the trainer's 0-based round t - 1). A checkpoint folder
without trainer_state.pt, or not named by `latest`, is never loaded.

One run at a time: ``run_lock`` takes the lock before anything in the directory is read or written and holds it
for the whole run. The kernel drops an fcntl lock when its process dies, however it dies, so a lock file left by
a killed run is stale (its lock is free) and is taken over, with a line saying so.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from spinlm.crash_points import crash_point
from spinlm.errors import UserError
from spinlm.pairs import Pairs, RoundPairs

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
ROUND_TABLE_FILE = "rounds.json"
METRICS_FILE = "metrics.jsonl"
ROUNDS_DIR = "rounds"
PAIRS_FILE = "pairs.parquet"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
TMP_CHECKPOINT_PREFIX = ".tmp-"
REPORT_DIR = "report"

log = logging.getLogger(__name__)


class RunDirLocked(UserError):
    """Another process is running in this run directory."""


class CheckpointError(UserError):
    """checkpoints/latest names a checkpoint that is not complete."""


class RunDir:
    """The paths of one run directory's files (nothing is read or written here)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def round_table(self) -> Path:
        return self.root / ROUND_TABLE_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def rounds(self) -> Path:
        return self.root / ROUNDS_DIR

    def pairs(self, round_number: int) -> Path:
        return self.rounds / str(round_number) / PAIRS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR


def run_dir_of_checkpoint(checkpoint: Path) -> RunDir | None:
    """The run directory a checkpoint folder sits in (<run>/checkpoints/<t>), or None for a folder elsewhere."""
    checkpoint = Path(checkpoint)
    return RunDir(checkpoint.parent.parent) if checkpoint.parent.name == CHECKPOINTS_DIR else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, fsync, rename over ``path``, fsync the folder: a reader (or a run killed
    mid-write, or a full disk) sees the old file or the new one, never a cut one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written temporary file is never left behind
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the round's pairs ---------------------------------------------------------------------------------------------
def write_pairs(run_dir: Path, round_number: int, judged: RoundPairs, tokenizer) -> Path:
    """rounds/<round_number>/pairs.parquet: the decoded texts for people, the token ids for the history rounds."""
    path = RunDir(run_dir).pairs(round_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = judged.pairs
    table = pa.table({
        "origin": judged.origins,
        "prompt": tokenizer.batch_decode(p.prompts, skip_special_tokens=False),
        "chosen": tokenizer.batch_decode(p.chosen, skip_special_tokens=True),
        "rejected": tokenizer.batch_decode(p.rejected, skip_special_tokens=True),
        "chosen_score": pa.array(judged.chosen_scores, type=pa.float64()),
        "rejected_score": pa.array(judged.rejected_scores, type=pa.float64()),
        "prompt_ids": p.prompts, "chosen_ids": p.chosen, "rejected_ids": p.rejected,
    })
    tmp = path.with_name(f".{path.name}.tmp")  # a reader never sees a cut file
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_pairs_table(run_dir: Path, round_number: int, columns: list[str]) -> pa.Table:
    """The given columns of rounds/<round_number>/pairs.parquet."""
    return pq.read_table(RunDir(run_dir).pairs(round_number), columns=columns)


def read_pairs(run_dir: Path, round_number: int) -> Pairs:
    """A round's pairs as token ids, as they were trained on (weights and SFT mask are not stored: all real)."""
    table = read_pairs_table(run_dir, round_number, ["prompt_ids", "chosen_ids", "rejected_ids"]).to_pydict()
    return Pairs(table["prompt_ids"], table["chosen_ids"], table["rejected_ids"])


def rounds_with_pairs(run_dir: Path) -> list[int]:
    """The round numbers whose pairs file exists, in order."""
    run = RunDir(run_dir)
    rounds = sorted(int(p.name) for p in run.rounds.iterdir() if p.name.isdigit()) if run.rounds.is_dir() else []
    return [t for t in rounds if run.pairs(t).is_file()]


# ---- the round table -----------------------------------------------------------------------------------------------
def write_round_table(run_dir: Path, table: list[dict]) -> None:
    """The round table also lives in a small JSON in the run directory, for people and tools."""
    write_text_atomic(RunDir(run_dir).round_table, json.dumps(table, indent=1))


def read_round_table(run_dir: Path) -> list[dict]:
    """The round table; [] while no round has completed (no file yet)."""
    path = RunDir(run_dir).round_table
    if not path.is_file():
        return []
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(table, list) or not all(isinstance(r, dict) and "round" in r for r in table):
        raise UserError(f"{path}: expected a list of objects with a round field (the round table)")
    return table


# ---- metrics -------------------------------------------------------------------------------------------------------
def drop_unfinished_metrics(run_dir: Path, done_rounds: int) -> None:
    """Rows of rounds that never completed (a run killed mid-round, or a fresh start over an old run directory)
    would be logged again: keep only completed rounds' rows. A line cut short by a kill is dropped too."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if done_rounds > 0 and row["round"] <= done_rounds:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# ---- the trainer state and checkpoints -----------------------------------------------------------------------------
@dataclass
class TrainerState:
    """Counters that a checkpoint carries (with the model and, in online_dpo, the optimizer)."""

    next_round: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    table: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        """What trainer_state.pt holds: plain Python only, so torch.load(weights_only=True) reads it back."""
        return {"next_round": self.next_round, "global_step": self.global_step,
                "skipped_steps": self.skipped_steps, "table": list(self.table)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainerState":
        return cls(next_round=state["next_round"], global_step=state["global_step"],
                   skipped_steps=state["skipped_steps"], table=list(state["table"]))


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint is complete once its trainer state is written (the last file of a save)."""
    return (Path(folder) / STATE_FILE).exists()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete round checkpoints (checkpoints/<t>), by round."""
    root = RunDir(run_dir).checkpoints
    done = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and is_complete_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint checkpoints/latest names; None when there is none yet; CheckpointError when it names a
    folder that is not a complete checkpoint of this run."""
    latest = RunDir(run_dir).latest
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    path = latest.parent / name
    # a folder of this run's checkpoints, by its plain name: never a path that leads elsewhere (../, /, a link)
    if not name or name in (".", "..") or "/" in name or os.sep in name \
            or path.resolve().parent != latest.parent.resolve():
        raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint folder inside {latest.parent}: "
                              "trainer.resume=auto only continues from this run's own checkpoints; write the name of "
                              "one of them into it (e.g. 2), or pick a new trainer.output_dir")
    if not is_complete_checkpoint(path):
        raise CheckpointError(f"{latest} names {path.name}, which is incomplete or missing ({STATE_FILE} not found): "
                              "trainer.resume=auto cannot continue this run; write the name of a complete checkpoint "
                              "folder into it, or pick a new trainer.output_dir")
    return path


def load_trainer_state(checkpoint: Path) -> TrainerState:
    import torch  # here, not at the top: reading a run's files (the report) needs no torch

    return TrainerState.from_state_dict(torch.load(Path(checkpoint) / STATE_FILE, weights_only=True,
                                                   map_location="cpu"))


def save_checkpoint(run_dir: Path, name: str, save_model: Callable[[Path], None], state: TrainerState,
                    keep_last: int | None = None) -> Path:
    """Write checkpoints/<name> atomically: save_model(folder) writes the model files into a temporary folder,
    the trainer state goes in last, everything is fsynced, the folder renamed, and only then does `latest` move.
    keep_last: keep only that many complete checkpoints (this one always)."""
    import torch

    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{name}"
    if tmp.exists():  # left by a run killed while saving: never complete, safe to discard
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(tmp)
        crash_point("checkpoint_write")
        torch.save(state.state_dict(), tmp / STATE_FILE)
        _fsync_tree(tmp)
    except BaseException:  # an error, Ctrl-C or SIGTERM mid-save: no half checkpoint is left behind
        # best effort (under Ray a rank may still be writing into it); the next save removes any rest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(RunDir(run_dir).latest, name + "\n")
    if keep_last:
        _prune(root, keep_last, keep=name)
    return final


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted((p for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and is_complete_checkpoint(p)),
                  key=lambda p: p.stat().st_mtime)
    for p in done[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p)


# ---- the lock ------------------------------------------------------------------------------------------------------
def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode("utf-8", "replace").strip()


def _missing_parents(path: Path) -> list[Path]:
    """path and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; a second holder fails at once with RunDirLocked naming the pid.

    A directory that did not exist is created for the lock and removed again on exit if the run left it empty
    (a run that failed on a bad input leaves nothing behind)."""
    run_dir = Path(run_dir).absolute()
    created = _missing_parents(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDir(run_dir).lock
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "pid not written yet"
            os.close(fd)
            _remove_empty(created)
            raise RunDirLocked(f"trainer.output_dir={run_dir} is in use by another spinlm run ({holder}; lock file "
                               f"{lock}): wait for it to end or stop it, or pick another trainer.output_dir") from None
        # the holder before us may have removed the file between our open and our lock: lock the file that is there
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(fd)
        if stale:
            log.warning("%s: a stale lock (%s, no longer running here) was left by a run that was killed; taking it over",
                        lock, stale)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        os.fsync(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: a newcomer then opens a fresh file (see the loop above)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for path in created:  # deepest first
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
