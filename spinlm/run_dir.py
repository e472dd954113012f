"""The run directory (trainer.output_dir): its layout, who may write there, and how each of its files is written
and read. No other module spells these names; they ask this one for the paths.

    <run>/.lock                        held while a run uses the directory: an advisory fcntl lock, and the holder's pid
    <run>/config.yaml                  the resolved config of the last start (written atomically)
    <run>/run.json                     the run's identity (written atomically): the config and input fingerprints it
                                       was started with ("start") and those of its last start ("current"), which the
                                       next start is compared with
    <run>/config_history.jsonl         one JSON row per start (appended): when, what kind of start, which settings
                                       changed (old -> new) and whether trainer.allow_config_change forced them
    <run>/rounds.json                  the round table (written atomically)
    <run>/metrics.jsonl                one JSON row per logged step (tracking.Tracker appends; pruned on a restart)
    <run>/rounds/<t>/pairs.parquet     round t's judged pairs: text, scores and token ids (written atomically)
    <run>/checkpoints/<t>/             round t's checkpoint: the Hugging Face model folder (written by the workers,
                                       with optimizer/ in online_dpo, and a model card), trainer_state.pt, then
                                       checksums.json (the sha256 of every other file), written last
    <run>/checkpoints/.tmp-<t>/        a checkpoint being written; renamed to <t> once complete
    <run>/checkpoints/latest           the name of the last COMPLETE checkpoint (written atomically, after the folder)
    <run>/report/                      `spinlm report`'s output (spinlm/report.py)
    <run>/tensorboard/ mlruns/ wandb/  the optional trackers' own folders (spinlm/tracking.py)

Rounds are numbered from 1 in every name (round t is the trainer's 0-based round t - 1). A checkpoint folder
without trainer_state.pt, or not named by `latest`, is never loaded; one whose files no longer match its
checksums.json is refused, naming the file and the newest earlier checkpoint that verifies (checkpoints saved
before checksums existed load unverified).

Input fingerprints (run.json): for every file of the model folder(s) and the data and reward files, its size,
mtime_ns and a sha256: of the whole file below 64 MiB, else of its first and last MiB. A small file counts as
changed when its size or hash differ (a copy with a new mtime is the same input); a large one also when its mtime_ns
differs, since its middle is not hashed. Names starting with "." inside a model folder (.git, .cache) are skipped.

One run at a time: ``run_lock`` takes the lock before anything in the directory is read or written and holds it
for the whole run. The kernel drops an fcntl lock when its process dies, however it dies, so a lock file left by
a killed run is stale (its lock is free) and is taken over, with a line saying so.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from spinlm.crash_points import crash_point
from spinlm.errors import UserError
from spinlm.pairs import Pairs, RoundPairs

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
RUN_RECORD_FILE = "run.json"
HISTORY_FILE = "config_history.jsonl"
ROUND_TABLE_FILE = "rounds.json"
METRICS_FILE = "metrics.jsonl"
ROUNDS_DIR = "rounds"
PAIRS_FILE = "pairs.parquet"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
OPTIM_DIR = "optimizer"  # torch.distributed.checkpoint folder inside a checkpoint (sharded; reshards on load)
CHECKSUMS_FILE = "checksums.json"
TMP_CHECKPOINT_PREFIX = ".tmp-"
REPORT_DIR = "report"

log = logging.getLogger(__name__)


class RunDirLocked(UserError):
    """Another process is running in this run directory."""


class CheckpointError(UserError):
    """checkpoints/latest names a checkpoint that is not complete, or whose files do not match their checksums."""


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
    def record(self) -> Path:
        return self.root / RUN_RECORD_FILE

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

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
    """Rows of rounds that never completed (a run killed mid-round, whose start goes on from its last checkpoint or
    redoes its first round) would be logged again: keep only completed rounds' rows. A line cut short by a kill is
    dropped too."""
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


def metrics_rounds(run_dir: Path) -> list[int]:
    """The rounds metrics.jsonl has rows of (0: the evaluation before training), in order; a cut line is skipped."""
    path = RunDir(run_dir).metrics
    rounds: set[int] = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rounds.add(row["round"])
    return sorted(rounds)


# ---- the run's identity: its record, its history, the fingerprints of its inputs ----------------------------------
FULL_HASH_LIMIT = 64 * 2**20  # files below this size are hashed whole
EDGE_BYTES = 2**20            # of a larger file, its first and last MiB are hashed (with its size and mtime_ns)
WHOLE = "whole"
EDGES = "first and last MiB"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _edges_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(EDGE_BYTES))
        fh.seek(-EDGE_BYTES, os.SEEK_END)
        digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest()


def fingerprint_file(path: Path) -> dict:
    """size, mtime_ns and a sha256 (of the whole file below FULL_HASH_LIMIT, else of its first and last MiB)."""
    stat = Path(path).stat()
    whole = stat.st_size < FULL_HASH_LIMIT
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path) if whole else _edges_sha256(path), "hashed": WHOLE if whole else EDGES}


def fingerprint_paths(paths: list[str]) -> dict[str, dict]:
    """Each file's fingerprint by its absolute path: a file itself; a folder (a model), every file under it but
    names starting with "." (.git, .cache: not the model). A path that is not there (a hub id) has none."""
    out: dict[str, dict] = {}
    for path in map(Path, paths):
        path = path.absolute()
        if path.is_file():
            out[str(path)] = fingerprint_file(path)
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts):
                    out[str(f)] = fingerprint_file(f)
    return out


def same_file(old: dict, new: dict) -> bool:
    """Two fingerprints of one path show the same input: same size and hash (for a file hashed whole, a new mtime
    alone is a copy or a touch); for a large file, whose middle is not hashed, the same mtime_ns too."""
    if (old.get("size"), old.get("sha256"), old.get("hashed")) != (new["size"], new["sha256"], new["hashed"]):
        return False
    return new["hashed"] == WHOLE or old.get("mtime_ns") == new["mtime_ns"]


def changed_files(old: dict[str, dict], new: dict[str, dict]) -> list[tuple[str, dict | None, dict | None]]:
    """(path, old fingerprint or None if added, new fingerprint or None if gone) for each path that differs."""
    return [(p, old.get(p), new.get(p)) for p in sorted(old.keys() | new.keys())
            if p not in old or p not in new or not same_file(old[p], new[p])]


def describe_file_change(path: str, old: dict | None, new: dict | None) -> str:
    if old is None:
        return f"{path}: new (not there at the run's last start)"
    if new is None:
        return f"{path}: gone (it was there at the run's last start)"
    what = []
    if old.get("size") != new["size"]:
        what.append(f"size {old.get('size')} -> {new['size']} bytes")
    if old.get("sha256") != new["sha256"]:
        what.append(f"sha256 {str(old.get('sha256'))[:12]}... -> {new['sha256'][:12]}...")
    if not what:  # a large file: only its modification time tells
        stamp = lambda ns: datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
        what.append(f"modified {stamp(old.get('mtime_ns', 0))} -> {stamp(new['mtime_ns'])}")
    return f"{path}: changed since the run's last start ({', '.join(what)})"


@dataclass
class RunRecord:
    """run.json: the run's first start and its last one, each {"time", "config" (resolved, local paths absolute),
    "files" ({config key: {absolute path: fingerprint}})}. The next start is compared with ``current``."""

    start: dict
    current: dict


def read_run_record(run_dir: Path) -> RunRecord | None:
    """The run's record; None for a new directory or one from before spinlm kept it."""
    path = RunDir(run_dir).record
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore it from a copy, or move it away to start "
                        "without the config comparison (it is then written anew)") from exc
    parts = [data.get(k) for k in ("start", "current")] if isinstance(data, dict) else [None]
    if not all(isinstance(p, dict) and isinstance(p.get("config"), dict) and isinstance(p.get("files"), dict)
               for p in parts):
        raise UserError(f"{path}: expected the run's record (start and current, each with its config and files); "
                        "restore it from a copy, or move it away to start without the config comparison")
    return RunRecord(data["start"], data["current"])


def write_run_record(run_dir: Path, record: RunRecord) -> None:
    write_text_atomic(RunDir(run_dir).record,
                      json.dumps({"format": 1, "start": record.start, "current": record.current}, indent=1))


def append_history(run_dir: Path, row: dict) -> None:
    """Append one start's row to config_history.jsonl (with its time), fsynced: a kill can cut only this line."""
    with open(RunDir(run_dir).history, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": now_utc(), **row}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_history(run_dir: Path) -> list[dict]:
    """config_history.jsonl's rows, oldest first ([] before the first start); a line cut by a kill is skipped."""
    path = RunDir(run_dir).history
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class Leftovers:
    """What earlier starts left in a run directory that has no checkpoint to continue from: a new start would drop
    these metrics and overwrite these rounds, and the report would mix the rest in."""

    metrics_rounds: list[int]  # the rounds metrics.jsonl has rows of
    pair_rounds: list[int]     # rounds/<t>/pairs.parquet
    round_table: bool          # rounds.json (written after a round's checkpoint)
    checkpoints: list[str]     # complete checkpoints that checkpoints/latest does not name

    def __bool__(self) -> bool:
        return bool(self.metrics_rounds or self.pair_rounds or self.round_table or self.checkpoints)

    def of_first_round_only(self) -> bool:
        """What a run stopped during its first round leaves: its metrics and pairs of round 1 (and the evaluation
        before it), no round table, no checkpoint."""
        return (not self.checkpoints and not self.round_table and set(self.pair_rounds) <= {1}
                and set(self.metrics_rounds) <= {0, 1})

    def describe(self, run_dir: Path) -> list[str]:
        run = RunDir(run_dir)
        out = []
        if self.metrics_rounds:
            rounds = [t for t in self.metrics_rounds if t != 0]  # round 0: the evaluation before training
            parts = (["the evaluation before training"] if 0 in self.metrics_rounds else []) + (
                [f"round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}"] if rounds else [])
            out.append(f"{run.metrics.name} (rows of {' and '.join(parts)})")
        out += [str(run.pairs(t).relative_to(run.root)) for t in self.pair_rounds]
        if self.round_table:
            out.append(run.round_table.name)
        out += [f"{CHECKPOINTS_DIR}/{name}" for name in self.checkpoints]
        return out


def find_leftovers(run_dir: Path) -> Leftovers:
    run = RunDir(run_dir)
    done = [p.name for p in complete_checkpoints(run_dir)] if run.checkpoints.is_dir() else []
    return Leftovers(metrics_rounds(run_dir), rounds_with_pairs(run_dir), run.round_table.is_file(), done)


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
    """A checkpoint is complete once its trainer state is written (after the model files; only checksums.json
    follows it)."""
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
    problems = checksum_problems(path)
    if problems:
        raise CheckpointError(_damaged_checkpoint_message(run_dir, path, problems))
    return path


def write_checksums(folder: Path) -> None:
    """checksums.json: the size and sha256 of every file in the checkpoint folder (by its path inside it)."""
    folder = Path(folder)
    files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).as_posix() != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def checksum_problems(folder: Path) -> list[str] | None:
    """Each file of the checkpoint that is missing or whose bytes differ from its checksums.json, [] when all
    match; None when it has no checksums.json (saved before checkpoints carried one: it loads unverified)."""
    path = Path(folder) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{path}: cannot be read ({type(exc).__name__}: {exc})"]
    if not (isinstance(files, dict) and all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                            and isinstance(v.get("sha256"), str) for v in files.values())):
        return [f"{path}: expected {{\"files\": {{path: {{\"size\": ..., \"sha256\": ...}}}}}}"]
    problems = []
    for name, want in files.items():
        f = Path(folder) / name
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {path.name})")
        elif f.stat().st_size != want["size"] or file_sha256(f) != want["sha256"]:
            problems.append(f"{f}: its bytes differ from the sha256 recorded in {path.name} when the checkpoint was "
                            "saved (damaged, or changed since)")
    return problems


def _damaged_checkpoint_message(run_dir: Path, path: Path, problems: list[str]) -> str:
    latest = RunDir(run_dir).latest
    earlier = [p for p in reversed(complete_checkpoints(run_dir))
               if path.name.isdigit() and int(p.name) < int(path.name)]
    good, unverified = None, False
    for candidate in earlier:  # newest first
        found = checksum_problems(candidate)
        if not found:
            good, unverified = candidate, found is None
            break
    lines = "\n".join(f"  {p}" for p in problems)
    head = (f"{CHECKPOINTS_DIR}/{path.name} (named by {latest}) does not match its {CHECKSUMS_FILE}, so "
            f"trainer.resume=auto will not load it:\n{lines}\n")
    if good is None:
        return head + ("No earlier checkpoint of this run verifies: restore the file(s) from a copy, or pick a new "
                       "trainer.output_dir. Nothing was deleted.")
    note = f" (saved before checkpoints carried {CHECKSUMS_FILE}: not verified)" if unverified else ""
    return head + (f"The newest earlier checkpoint that verifies is {CHECKPOINTS_DIR}/{good.name}{note}: to continue "
                   f"from it, write its name into {latest} (echo {good.name} > {latest}) and run again; the rounds "
                   "after it are redone. Nothing was deleted.")


def load_trainer_state(checkpoint: Path) -> TrainerState:
    import torch  # here, not at the top: reading a run's files (the report) needs no torch

    path = Path(checkpoint) / STATE_FILE
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # cut short or damaged (a checkpoint from before
        # checksums.json existed is not verified first)
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())}); the "
                              f"checkpoint is damaged: write the name of an earlier checkpoint into "
                              f"{path.parent.parent / LATEST_FILE}, or pick a new trainer.output_dir") from exc
    return TrainerState.from_state_dict(saved)


def save_checkpoint(run_dir: Path, name: str, save_model: Callable[[Path], None], state: TrainerState,
                    keep_last: int | None = None) -> Path:
    """Write checkpoints/<name> atomically: save_model(folder) writes the model files into a temporary folder,
    the trainer state and then checksums.json go in last, everything is fsynced, the folder renamed, and only then
    does `latest` move.
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
        write_checksums(tmp)  # of every file, the trainer state included: the resume verifies them
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
