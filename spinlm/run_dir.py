"""The run directory (trainer.output_dir): who may write there, and how its small state files are written.

    <run>/.lock          exists while a run holds the directory: an advisory fcntl lock, and the holder's pid
    <run>/config.yaml    the resolved config of the last start          (written atomically)
    <run>/rounds.json    the round table                                 (written atomically)
    <run>/metrics.jsonl  one JSON row per logged step
    <run>/checkpoints/   see spinlm/checkpoint.py
    <run>/rounds/<t>/    each round's judged pairs (pairs.parquet)

One run at a time: ``run_lock`` takes the lock before anything in the directory is read or written and holds it
for the whole run. The kernel drops an fcntl lock when its process dies, however it dies, so a lock file left by
a killed run is stale (its lock is free) and is taken over, with a line saying so.
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spinlm.errors import UserError

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


class RunDirLocked(UserError):
    """Another process is running in this run directory."""


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
    lock = run_dir / LOCK_FILE
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
