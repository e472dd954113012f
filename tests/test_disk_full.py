"""A full disk while a checkpoint is written: a clear message and exit 2, no half checkpoint, and the same command
resumes once there is room. The disk is real: a 2 MB tmpfs (needs the right to mount; skipped without it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _train(out, *extra):
    return subprocess.run([sys.executable, "-m", "spinlm.cli", "train", "preset=smoke", f"trainer.output_dir={out}",
                           "trainer.rounds=1", "trainer.eval_before_training=false", *extra],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {tried.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_mid_checkpoint_is_a_message_and_the_run_resumes_with_room(tiny_task, small_disk, tmp_path):
    out = small_disk / "run"
    full = _train(out)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert "spinlm train: error: the disk is full (" in full.stderr and "No space left on device" in full.stderr
    assert "run the same command again to resume" in full.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # the half checkpoint was removed
    # with room (the run directory moved to a roomy disk), the same command completes the round
    roomy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(out), str(roomy)], check=True)
    done = _train(roomy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (roomy / "checkpoints" / "1" / "trainer_state.pt").is_file()
    # at the end the CLI prints the round table and the report's path (the library prints nothing)
    lines = done.stdout.splitlines()
    assert lines[-3].split() == ["round", "val_acc", "margins", "accuracies", "logps_chosen", "sample_reward", "time_s"]
    assert lines[-2].split()[0] == "1" and lines[-1] == f"report: {roomy / 'report' / 'report.html'}"
