"""Nothing lost: a run killed with SIGKILL at any of several points and resumed with trainer.resume=auto ends
with weights bit-for-bit equal to an uninterrupted run, and its metrics hold every step exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spinlm.config import load_config
from spinlm.main_spin import run

SMOKE = ["preset=smoke", "trainer.eval_before_training=false", "data.val_max_samples=8"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def train_steps(run_dir: Path) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["step"]) for r in rows if r["kind"] == "train"]


def cli(run_dir: Path, extra: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPINLM_KILL_AT": kill_at} if kill_at else dict(os.environ)
    env.pop("SPINLM_KILL_AT", None) if not kill_at else None
    return subprocess.run([sys.executable, "-m", "spinlm.cli", "train", *SMOKE, *extra, f"trainer.output_dir={run_dir}"],
                          env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny_task, tmp_path_factory):
    out = {}
    # format_score: with a 0/1 reward alone, 2 samples of the smoke model can tie on every prompt of a round (no
    # pair, the run stops), depending on the last bits of an update
    online = ["algorithm.mode=online_dpo", "rollout.n=2", "reward.format_score=0.1"]
    for mode, extra in {"spin": [], "online_dpo": online,
                        "online_dpo_lora": [*online, "model.lora.rank=4", "actor.lr=1e-2"]}.items():
        run_dir = tmp_path_factory.mktemp(mode) / "run"
        run(load_config([*SMOKE, *extra, f"trainer.output_dir={run_dir}"]))
        out[mode] = (extra, run_dir)
    return out


def test_same_seed_same_weights(uninterrupted, tmp_path):
    extra, reference = uninterrupted["spin"]
    run(load_config([*SMOKE, *extra, f"trainer.output_dir={tmp_path / 'again'}"]))
    a, b = weights(reference), weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode,kill_at", [
    ("spin", "update:3"),            # round 2 after its first optimizer step (its samples and a metrics row written)
    ("spin", "checkpoint_write:2"),  # round 2's checkpoint: model written, trainer state not yet
    ("online_dpo", "generate:3"),    # round 2, step 1: the optimizer state is carried across rounds
    ("online_dpo_lora", "generate:4"),  # LoRA, round 2 after its first step: merged base + the same fresh adapter
])
def test_kill_and_resume_equals_uninterrupted(uninterrupted, tmp_path, mode, kill_at):
    extra, reference = uninterrupted[mode]
    run_dir = tmp_path / "run"
    killed = cli(run_dir, extra, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"  # round 2 never completed
    resumed = cli(run_dir, extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(next round 2 of 2)" in resumed.stderr  # resumes after the last complete round (a note on stderr)
    a, b = weights(reference), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_steps(run_dir) == train_steps(reference)  # every step once: none skipped, none repeated
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_the_round_table_survives_resume(tiny_task, tmp_path):
    """Each checkpoint carries the table including its own round: resuming a finished 2-round run to 3 rounds
    gives start, 1, 2, 3 once each (before, the saved table lacked the checkpoint's round: start, 1, 3)."""
    base = ["preset=smoke", "data.val_max_samples=8", f"trainer.output_dir={tmp_path / 'run'}"]
    first = run(load_config(base))
    assert [r["round"] for r in first] == ["start", 1, 2]
    resumed = run(load_config([*base, "trainer.rounds=3"]))
    assert [r["round"] for r in resumed] == ["start", 1, 2, 3]
    assert [r["round"] for r in json.loads((tmp_path / "run" / "rounds.json").read_text())] == ["start", 1, 2, 3]
    assert [r["val_acc"] for r in resumed[:3]] == [r["val_acc"] for r in first]


@pytest.mark.parametrize("point", ["generate:1", "checkpoint_write:1"])
def test_sigterm_stops_cleanly_like_ctrl_c(tiny_task, tmp_path, point):
    """SIGTERM (a scheduler's stop) mid-rollout and mid-checkpoint: a message and exit 143 (before: -15 and no
    word), the trackers closed, the lock released and no half-written checkpoint folder left."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "SPINLM_TINY_DIR": str(tiny_task), "SPINLM_KILL_AT": point, "SPINLM_KILL_SIGNAL": "SIGTERM"}
    result = subprocess.run([sys.executable, "-m", "spinlm.cli", "train", *SMOKE, "trainer.rounds=1",
                             f"trainer.output_dir={run_dir}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert "spinlm train: terminated (SIGTERM); the last complete checkpoint is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / ".lock").exists()
    assert not list(run_dir.glob("checkpoints/.tmp-*"))
    assert not (run_dir / "checkpoints" / "latest").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # whole lines only
    assert rows and all(r["round"] == 1 for r in rows)
