"""Atomic round checkpoints: written under a temporary name, fsynced, renamed; `latest` moves last.

    checkpoints/<t>/           Hugging Face model (safetensors) + tokenizer + generation config, and trainer_state.pt
    checkpoints/latest         the name of the last COMPLETE checkpoint
A folder without trainer_state.pt, or not named by `latest`, is never loaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from spinlm.crash_points import crash_point
from spinlm.errors import UserError
from spinlm.run_dir import write_text_atomic

STATE_FILE = "trainer_state.pt"


class CheckpointError(UserError):
    """checkpoints/latest names a checkpoint that is not complete."""


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


def save_checkpoint(run_dir: Path, name: str, save_model, state: dict, keep_last: int | None = None) -> Path:
    """save_model(folder) writes the model files; `state` is the trainer state (tensors and plain Python only)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    if tmp.exists():  # left by a run killed while saving: never complete, safe to discard
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(tmp)
        crash_point("checkpoint_write")
        torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
    except BaseException:  # an error, Ctrl-C or SIGTERM mid-save: no half checkpoint is left behind
        # best effort (under Ray a rank may still be writing into it); the next save removes any rest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", name + "\n")
    if keep_last:
        _prune(root, keep_last, keep=name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / STATE_FILE).exists()),
                  key=lambda p: p.stat().st_mtime)
    for p in done[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p)


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = Path(run_dir) / "checkpoints" / "latest"
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
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{latest} names {path.name}, which is incomplete or missing ({STATE_FILE} not found): "
                              "trainer.resume=auto cannot continue this run; write the name of a complete checkpoint "
                              "folder into it, or pick a new trainer.output_dir")
    return path


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=True, map_location="cpu")
