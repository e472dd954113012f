"""The run directory: its lock and atomic writes, with real processes (a second `spinlm train` on a held directory
exits 2 at once naming the holder's pid and touches nothing; a lock left by a killed process is taken over), and its
files written and read back: the round's pairs, the round table, checkpoints and the trainer state."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spinlm.pairs import Pairs, RoundPairs
from spinlm.run_dir import (CHECKSUMS_FILE, LOCK_FILE, STATE_FILE, CheckpointError, RunDir, RunDirLocked,
                            TrainerState, changed_files, checksum_problems, complete_checkpoints,
                            describe_file_change, fingerprint_paths, latest_checkpoint, load_trainer_state,
                            read_pairs, read_pairs_table, read_round_table, rounds_with_pairs, run_lock,
                            save_checkpoint, write_pairs, write_round_table, write_text_atomic)


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


def test_the_trainer_state_round_trips_through_its_state_dict():
    table = [{"round": "start", "val_acc": 0.25}, {"round": 1, "val_acc": 0.5, "margins": None, "time_s": 1.5}]
    state = TrainerState(next_round=3, global_step=17, skipped_steps=2, table=table)
    assert state.state_dict() == {"next_round": 3, "global_step": 17, "skipped_steps": 2, "table": table}
    back = TrainerState.from_state_dict(state.state_dict())
    assert back == state and back.table is not table  # the restored table is a list of its own
    assert TrainerState() == TrainerState(0, 0, 0, [])


def _write_model(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"weights")


def test_checkpoints_save_atomically_load_back_and_prune_the_oldest(tmp_path):
    run = RunDir(tmp_path)
    assert latest_checkpoint(tmp_path) is None  # a fresh run directory: nothing to resume
    states = {name: TrainerState(int(name), 10 * int(name), 0, [{"round": r} for r in range(1, int(name) + 1)])
              for name in ("1", "2", "3")}
    for name, state in states.items():
        saved = save_checkpoint(tmp_path, name, _write_model, state, keep_last=2)
        assert saved == run.checkpoint(name) and run.latest.read_text() == f"{name}\n"
        os.utime(saved, (1000 * int(name), 1000 * int(name)))  # pruning goes by age: make the order explicit
    assert complete_checkpoints(tmp_path) == [run.checkpoint("2"), run.checkpoint("3")]  # keep_last=2: 1 pruned
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["2", "3", "latest"]  # no .tmp-* left
    assert latest_checkpoint(tmp_path) == run.checkpoint("3")
    assert load_trainer_state(run.checkpoint("3")) == TrainerState(3, 30, 0, [{"round": 1}, {"round": 2}, {"round": 3}])
    assert (run.checkpoint("3") / "model.safetensors").read_bytes() == b"weights"

    run.checkpoint("4").mkdir()  # a folder without its trainer state: never complete, never loaded
    _write_model(run.checkpoint("4"))
    assert complete_checkpoints(tmp_path) == [run.checkpoint("2"), run.checkpoint("3")]
    run.latest.write_text("4\n")
    with pytest.raises(CheckpointError, match="names 4, which is incomplete or missing \\(trainer_state.pt not found"):
        latest_checkpoint(tmp_path)


def test_a_failed_save_leaves_no_half_checkpoint_and_latest_unmoved(tmp_path):
    save_checkpoint(tmp_path, "1", _write_model, TrainerState(1, 4, 0, []))

    def broken(folder: Path) -> None:
        _write_model(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "2", broken, TrainerState(2, 8, 0, []))
    run = RunDir(tmp_path)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["1", "latest"]
    assert latest_checkpoint(tmp_path) == run.checkpoint("1")


def test_pairs_round_trip_as_token_ids_and_text(tiny_task, tmp_path):
    from spinlm.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_task / "sft_model"))
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("3 + 4 ="), enc("5 + 7 =")]
    chosen, rejected = [enc("#### 7"), enc("#### 12")], [enc("#### 8"), enc("#### 1")]
    judged = RoundPairs(Pairs(prompts, chosen, rejected, sft_mask=[1.0, 0.0]), ["train.parquet:0", "train.parquet:5"],
                        [1.0, None], [0.0, -0.5])
    path = write_pairs(tmp_path, 2, judged, tok)
    assert path == tmp_path / "rounds" / "2" / "pairs.parquet"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.parquet"]  # no temporary left
    assert rounds_with_pairs(tmp_path) == [2]
    assert read_pairs(tmp_path, 2) == Pairs(prompts, chosen, rejected)  # the ids as trained on; masks are not stored
    text = read_pairs_table(tmp_path, 2, ["origin", "chosen", "rejected", "chosen_score", "rejected_score"]).to_pydict()
    assert text == {"origin": ["train.parquet:0", "train.parquet:5"], "chosen": ["#### 7", "#### 12"],
                    "rejected": ["#### 8", "#### 1"], "chosen_score": [1.0, None], "rejected_score": [0.0, -0.5]}


def test_the_round_table_round_trips_and_is_empty_before_the_first_round(tmp_path):
    assert read_round_table(tmp_path) == []
    table = [{"round": "start", "val_acc": 0.25}, {"round": 1, "val_acc": 0.5, "margins": None}]
    write_round_table(tmp_path, table)
    assert read_round_table(tmp_path) == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rounds.json"]


def test_a_checkpoint_records_its_checksums_and_a_missing_file_is_refused_naming_it(tmp_path):
    run = RunDir(tmp_path)
    for name in ("1", "2"):
        save_checkpoint(tmp_path, name, _write_model, TrainerState(int(name), 4 * int(name), 0, []))
    sums = json.loads((run.checkpoint("2") / CHECKSUMS_FILE).read_text())
    assert sums == {"algorithm": "sha256", "files": {
        "model.safetensors": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()},
        STATE_FILE: {"size": (run.checkpoint("2") / STATE_FILE).stat().st_size,
                     "sha256": hashlib.sha256((run.checkpoint("2") / STATE_FILE).read_bytes()).hexdigest()}}}
    assert checksum_problems(run.checkpoint("2")) == []
    assert latest_checkpoint(tmp_path) == run.checkpoint("2")
    (run.checkpoint("2") / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as refused:
        latest_checkpoint(tmp_path)
    assert str(refused.value) == (
        f"checkpoints/2 (named by {run.latest}) does not match its checksums.json, so trainer.resume=auto will not "
        f"load it:\n  {run.checkpoint('2') / 'model.safetensors'}: missing (listed in checksums.json)\n"
        f"The newest earlier checkpoint that verifies is checkpoints/1: to continue from it, write its name into "
        f"{run.latest} (echo 1 > {run.latest}) and run again; the rounds after it are redone. Nothing was deleted.")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["1", "2", "latest"]  # nothing deleted


def test_with_no_earlier_checkpoint_that_verifies_the_message_says_so(tmp_path):
    run = RunDir(tmp_path)
    for name in ("1", "2"):
        save_checkpoint(tmp_path, name, _write_model, TrainerState(int(name), 0, 0, []))
        (run.checkpoint(name) / "model.safetensors").write_bytes(b"weighTs")  # the same size, other bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its bytes differ from the sha256 recorded in "
                                              r"checksums\.json when the checkpoint was saved \(damaged, or changed "
                                              r"since\)\nNo earlier checkpoint of this run verifies: restore the "
                                              r"file\(s\) from a copy, or pick a new trainer\.output_dir\. Nothing "
                                              r"was deleted\.$"):
        latest_checkpoint(tmp_path)


def test_a_checkpoint_saved_before_checksums_loads_unverified_and_counts_as_the_one_to_go_back_to(tmp_path):
    run = RunDir(tmp_path)
    for name in ("1", "2"):
        save_checkpoint(tmp_path, name, _write_model, TrainerState(int(name), 0, 0, []))
    (run.checkpoint("1") / CHECKSUMS_FILE).unlink()  # as an older spinlm saved it
    run.latest.write_text("1\n")
    assert checksum_problems(run.checkpoint("1")) is None
    assert latest_checkpoint(tmp_path) == run.checkpoint("1")
    run.latest.write_text("2\n")
    (run.checkpoint("2") / STATE_FILE).write_bytes(b"not the state")
    with pytest.raises(CheckpointError, match=r"newest earlier checkpoint that verifies is checkpoints/1 \(saved "
                                              r"before checkpoints carried checksums\.json: not verified\)"):
        latest_checkpoint(tmp_path)


def test_fingerprints_see_edits_not_copies_and_skip_hidden_names(tmp_path):
    model = tmp_path / "model"
    (model / ".git").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref")
    (model / "config.json").write_text('{"a": 1}')
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1"}\n')
    before = fingerprint_paths([str(model), str(data), "org/a-hub-id"])
    assert sorted(before) == [str(model / "config.json"), str(data)]  # no .git, nothing for a hub id
    assert before[str(data)] == {"size": 18, "mtime_ns": data.stat().st_mtime_ns, "sha256": hashlib.sha256(
        data.read_bytes()).hexdigest(), "hashed": "whole"}
    os.utime(data, ns=(1, 1))  # touched (or copied without its times): the same input
    assert changed_files(before, fingerprint_paths([str(model), str(data)])) == []
    data.write_text('{"prompt": "1+2"}\n')  # the same size, one character other
    after = fingerprint_paths([str(model), str(data)])
    assert changed_files(before, after) == [(str(data), before[str(data)], after[str(data)])]
    assert describe_file_change(str(data), before[str(data)], after[str(data)]) == (
        f"{data}: changed since the run's last start (sha256 {before[str(data)]['sha256'][:12]}... -> "
        f"{after[str(data)]['sha256'][:12]}...)")
    (model / "extra.bin").write_bytes(b"x")
    assert [(p, a is None) for p, a, _ in changed_files(before, fingerprint_paths([str(model), str(data)]))] == [
        (str(model / "extra.bin"), True), (str(data), False)]  # a new file, an edited one (by path)


def test_a_large_file_is_hashed_at_its_ends_and_its_mtime_counts(tmp_path):
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as fh:  # sparse: 65 MiB on no disk
        fh.truncate(65 * 2**20)
    before = fingerprint_paths([str(big)])[str(big)]
    assert before["hashed"] == "first and last MiB"
    assert before["sha256"] == hashlib.sha256(bytes(2 * 2**20)).hexdigest()
    os.utime(big, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    moved = fingerprint_paths([str(big)])[str(big)]
    assert changed_files({str(big): before}, {str(big): moved}) == [(str(big), before, moved)]
    assert describe_file_change(str(big), before, moved).startswith(f"{big}: changed since the run's last start "
                                                                     "(modified ")
    with open(big, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
    assert fingerprint_paths([str(big)])[str(big)]["sha256"] != before["sha256"]


def test_a_cut_trainer_state_is_named_not_a_traceback(tmp_path):
    """A checkpoint from before checksums.json (not verified first) whose trainer state was cut short."""
    import torch

    from spinlm.run_dir import CheckpointError, load_trainer_state

    folder = tmp_path / "checkpoints" / "2"
    folder.mkdir(parents=True)
    torch.save({"next_round": 2, "global_step": 4, "skipped_steps": 0, "table": []}, folder / "trainer_state.pt")
    data = (folder / "trainer_state.pt").read_bytes()
    (folder / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{folder / 'trainer_state.pt'}: cannot be read \(.*write the name of "
                                              rf"an earlier checkpoint into {tmp_path / 'checkpoints' / 'latest'}"):
        load_trainer_state(folder)
