"""Nothing mixed: what a start checks in its run directory, on real smoke runs of the tiny task.

A resume whose settings or input files differ from the run's last start in anything that changes the run exits 2
listing each change and touches nothing; trainer.allow_config_change=true lets it go on, recorded as forced; keys
that may change (trainer.rounds) are recorded only. A damaged checkpoint is refused naming the file and the earlier
checkpoint to go back to, and that advice works. A new run over an earlier run's files with no checkpoint is refused;
a run stopped in its first round starts again as before.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spinlm.config import load_config
from spinlm.main_spin import ConfigChangedError, RunError, StaleRunDirError, run
from spinlm.run_dir import CheckpointError, read_history

SMOKE = ["preset=smoke", "trainer.eval_before_training=false", "data.val_max_samples=8"]


def smoke(run_dir: Path, *extra: str):
    return load_config([*SMOKE, f"trainer.output_dir={run_dir}", *extra])


def cli(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "spinlm.cli", "train", *SMOKE, f"trainer.output_dir={run_dir}", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file's bytes and mtime_ns, every folder (None), by relative path."""
    return {str(p.relative_to(root)): ((p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_a_resume_that_changes_beta_exits_2_listing_it_and_touches_nothing(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    run(smoke(run_dir, "trainer.rounds=1"))
    before = snapshot(run_dir)
    refused = cli(run_dir, "trainer.rounds=2", "algorithm.beta=0.2", "algorithm.loss_type=ipo")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert (f"spinlm train: error: trainer.output_dir={run_dir}: resuming from checkpoints/1 with settings that "
            f"change the run (compared with its last start, recorded in {run_dir / 'run.json'}):\n"
            "  algorithm.beta: 0.1 -> 0.2\n"
            "  algorithm.loss_type: sigmoid -> ipo\n"
            "Nothing was loaded or written.") in refused.stderr
    assert "trainer.rounds" not in refused.stderr  # a key that may change is not listed
    assert "pass trainer.allow_config_change=true" in refused.stderr
    assert snapshot(run_dir) == before


def test_allow_config_change_resumes_and_records_the_forced_change(tiny_task, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run(smoke(run_dir, "trainer.rounds=1"))
    with caplog.at_level(logging.WARNING, logger="spinlm"):
        table = run(smoke(run_dir, "trainer.rounds=2", "algorithm.beta=0.2", "trainer.allow_config_change=true"))
    assert [r["round"] for r in table] == [1, 2]
    assert ("trainer.allow_config_change=true: resuming from checkpoints/1 in "
            f"{run_dir} with settings that change the run:\n  algorithm.beta: 0.1 -> 0.2\n"
            f"(recorded in {run_dir / 'config_history.jsonl'} with forced=true)") in caplog.text
    history = read_history(run_dir)
    assert [(h["start"], h["checkpoint"], h["forced"]) for h in history] == [
        ("new", None, False), ("resume", "checkpoints/1", True)]
    assert history[1]["changed"] == [{"key": "algorithm.beta", "old": 0.1, "new": 0.2},  # in the config's order
                                     {"key": "trainer.rounds", "old": 1, "new": 2}]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["start"]["config"]["algorithm"]["beta"] == 0.1  # the run was started with 0.1
    assert record["current"]["config"]["algorithm"]["beta"] == 0.2  # the next start is compared with 0.2
    run(smoke(run_dir, "trainer.rounds=3", "algorithm.beta=0.2"))  # accepted once: no override needed again
    assert read_history(run_dir)[-1]["changed"] == [{"key": "trainer.rounds", "old": 2, "new": 3}]


def test_more_rounds_resume_silently_with_a_history_row(tiny_task, tmp_path, caplog):
    """./run_spin.sh, then ./run_spin.sh trainer.rounds=5: the same two commands on the smoke preset."""
    run_dir = tmp_path / "run"
    first = cli(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    with caplog.at_level(logging.INFO, logger="spinlm"):
        table = run(smoke(run_dir, "trainer.rounds=3", "trainer.logger=[jsonl]"))
    assert [r["round"] for r in table] == [1, 2, 3]
    said = [r.getMessage() for r in caplog.records if r.name == "spinlm.main_spin"]
    assert len(said) == 1 and said[0].startswith(f"resuming from {run_dir / 'checkpoints' / '2'} (next round 3 of 3)")
    history = read_history(run_dir)
    assert [(h["start"], h["forced"]) for h in history] == [("new", False), ("resume", False)]
    assert history[1]["checkpoint"] == "checkpoints/2"
    assert history[1]["changed"] == [{"key": "trainer.rounds", "old": 2, "new": 3},
                                     {"key": "trainer.logger", "old": ["console", "jsonl"], "new": ["jsonl"]}]


def test_a_data_file_edited_between_starts_is_refused_naming_it(tiny_task, tmp_path):
    data = tmp_path / "train.parquet"
    shutil.copy(tiny_task / "train.parquet", data)
    run_dir = tmp_path / "run"
    run(smoke(run_dir, "trainer.rounds=1", f"data.train_files={data}"))
    table = pq.read_table(data)
    pq.write_table(table.slice(1), data)  # the same path, one row fewer
    before = snapshot(run_dir)
    with pytest.raises(ConfigChangedError) as refused:
        run(smoke(run_dir, "trainer.rounds=2", f"data.train_files={data}"))
    lines = str(refused.value).splitlines()
    assert len(lines) == 3, refused.value
    assert lines[1].startswith(f"  data.train_files: {data}: changed since the run's last start (size ")
    assert " bytes, sha256 " in lines[1]
    assert snapshot(run_dir) == before


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_earlier_one_to_go_back_to(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    run(smoke(run_dir))  # checkpoints 1 and 2
    weights = run_dir / "checkpoints" / "2" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF  # one flipped bit in the last tensor: still loads, wrong numbers
    weights.write_bytes(bytes(damaged))
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as refused:
        run(smoke(run_dir, "trainer.rounds=3"))
    latest = run_dir / "checkpoints" / "latest"
    assert str(refused.value) == (
        f"checkpoints/2 (named by {latest}) does not match its checksums.json, so trainer.resume=auto will not "
        f"load it:\n  {weights}: its bytes differ from the sha256 recorded in checksums.json when the checkpoint "
        "was saved (damaged, or changed since)\n"
        f"The newest earlier checkpoint that verifies is checkpoints/1: to continue from it, write its name into "
        f"{latest} (echo 1 > {latest}) and run again; the rounds after it are redone. Nothing was deleted.")
    assert snapshot(run_dir) == before
    latest.write_text("1\n")  # the advice, followed
    table = run(smoke(run_dir, "trainer.rounds=3"))
    assert [r["round"] for r in table] == [1, 2, 3]


def test_a_new_run_over_an_earlier_runs_files_without_a_checkpoint_is_refused(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    run(smoke(run_dir))
    shutil.rmtree(run_dir / "checkpoints")  # the checkpoints deleted; its metrics and pairs are still there
    before = snapshot(run_dir)
    with pytest.raises(StaleRunDirError) as refused:
        run(smoke(run_dir, "trainer.rounds=1"))
    assert str(refused.value) == (
        f"trainer.output_dir={run_dir} holds the files of an earlier run and no checkpoint to continue from: "
        "metrics.jsonl (rows of rounds 1, 2), rounds/1/pairs.parquet, rounds/2/pairs.parquet, rounds.json. A new "
        "run here would drop those metrics and mix those rounds into its report. Pick a new trainer.output_dir, or "
        f"move those files out of {run_dir} and run again. Nothing was written.")
    assert snapshot(run_dir) == before


def test_a_run_stopped_in_its_first_round_starts_again_and_only_with_its_own_settings(tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    killed = cli(run_dir, "trainer.rounds=1", env={"SPINLM_KILL_AT": "update:2"})  # round 1, after its first step
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run_dir / "rounds" / "1" / "pairs.parquet").is_file() and not (run_dir / "checkpoints" / "latest").exists()
    with pytest.raises(ConfigChangedError, match=r"redoing its unfinished round 1 with settings that change the run "
                                                 r"[^\n]*\n  trainer\.seed: 42 -> 7\n"):
        run(smoke(run_dir, "trainer.rounds=1", "trainer.seed=7"))
    # a first save that never completed leaves only a hidden folder: nothing for resume=disable to refuse
    (run_dir / "checkpoints" / ".tmp-1-cut").mkdir(parents=True)
    table = run(smoke(run_dir, "trainer.rounds=1", "trainer.resume=disable"))
    assert [r["round"] for r in table] == [1]
    with pytest.raises(RunError, match=r"already holds checkpoints and trainer\.resume=disable"):
        run(smoke(run_dir, "trainer.rounds=1", "trainer.resume=disable"))  # now it holds checkpoints/1
    assert [h["start"] for h in read_history(run_dir)] == ["new", "restart"]
    rounds = {json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert rounds == {1}


def test_a_run_directory_from_before_the_record_resumes_with_a_note_and_is_recorded(tiny_task, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run(smoke(run_dir, "trainer.rounds=1"))
    for old in ("run.json", "config_history.jsonl", "checkpoints/1/checksums.json"):  # as an older spinlm left it
        (run_dir / old).unlink()
    with caplog.at_level(logging.INFO, logger="spinlm"):
        table = run(smoke(run_dir, "trainer.rounds=2", "algorithm.beta=0.2"))  # nothing to compare with
    assert [r["round"] for r in table] == [1, 2]
    assert (f"{run_dir} has no run.json (a run directory from before spinlm recorded a run's settings): resuming "
            f"from {run_dir / 'checkpoints' / '1'} without comparing them; this start's settings and input "
            "fingerprints are recorded now") in caplog.text
    history = read_history(run_dir)
    assert [(h["start"], h["note"]) for h in history] == [
        ("resume", "no run.json before this start: its settings were not compared")]
    with pytest.raises(ConfigChangedError, match=r"\n  algorithm\.beta: 0\.2 -> 0\.1\n"):
        run(smoke(run_dir, "trainer.rounds=3"))  # from now on it is compared
