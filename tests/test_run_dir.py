"""The run directory's lock and atomic writes, with real processes: a second `spinlm train` on a held directory
exits 2 at once naming the holder's pid and touches nothing; a lock left by a killed process is taken over."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spinlm.run_dir import LOCK_FILE, RunDirLocked, run_lock, write_text_atomic


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_second_train_on_a_held_directory_exits_2_naming_the_pid_and_touches_nothing(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "step": 1, "kind": "train", "loss": 0.5}\n')
    (run_dir / "config.yaml").write_text("left: by the running run\n")
    with run_lock(run_dir):  # this test process is the first run
        before = _snapshot(run_dir)
        start = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "spinlm.cli", "train", "preset=smoke",
                                 f"trainer.output_dir={run_dir}"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "SPINLM_TINY_DIR": str(tiny_task)})
        elapsed = time.perf_counter() - start
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another spinlm run (pid {os.getpid()}; lock file {run_dir / LOCK_FILE})" in second.stderr
        assert "Traceback" not in second.stderr
        assert _snapshot(run_dir) == before  # the holder's files, its lock included, exactly as they were
    assert elapsed < 60  # refused before any model or data loads (measured: about 5 s, mostly imports)
    assert not (run_dir / LOCK_FILE).exists()  # released by the holder on exit


def test_the_lock_is_released_on_an_exception_and_an_empty_new_directory_is_removed(tmp_path):
    run_dir = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        with run_lock(run_dir):
            assert (run_dir / LOCK_FILE).read_text() == f"pid {os.getpid()}\n"
            raise ValueError("a bad input")
    assert not (tmp_path / "new").exists()  # created for the lock, left empty: removed
    with run_lock(run_dir):  # free again
        (run_dir / "kept.txt").write_text("x")
    assert sorted(p.name for p in run_dir.iterdir()) == ["kept.txt"]


def test_a_lock_held_in_the_same_process_is_refused_too(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()}\n"  # the refused attempt changed nothing


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    """A process that dies holding the lock (os._exit: no cleanup, as after kill -9) leaves the file; the kernel has
    dropped its fcntl lock, so the next run takes it over and says whose it was."""
    code = ("import os, sys; from spinlm.run_dir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print(os.getpid(), flush=True); os._exit(9)\n")
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert dead.returncode == 9, dead.stderr
    pid = int(dead.stdout)
    assert (tmp_path / LOCK_FILE).read_text() == f"pid {pid}\n"
    with caplog.at_level(logging.WARNING, logger="spinlm.run_dir"):
        with run_lock(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()}\n"
    assert f"a stale lock (pid {pid}, no longer running here) was left by a run that was killed" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    write_text_atomic(target, "new: 2\n")
    assert target.read_text() == "new: 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    """A write that fails midway (here a character that cannot be encoded, as a full disk fails a write) leaves
    the previous file whole: before, config.yaml and rounds.json were written in place and could be cut short."""
    target = tmp_path / "rounds.json"
    target.write_text("[1, 2]")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "[1, 2, 3" + "\udc80" + "]")
    assert target.read_text() == "[1, 2]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rounds.json"]
