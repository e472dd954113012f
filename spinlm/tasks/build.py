"""Build the bundled tiny task into a folder: data, tokenizer, a random model and its SFT warm start.

Layout of ``out_dir``::

    train.parquet  val.parquet  sft.parquet      verl RL rows plus a chat ``messages`` column
    tokenizer/                                   byte-level BPE with single-digit tokens and a chat template
    init_model/                                  the random initialisation (model + tokenizer)
    sft_model/                                   init_model after SFT on sft.parquet: where SPIN starts
    build_info.json                              written last: its presence marks a complete build

The build happens in a temporary folder beside ``out_dir`` that is renamed into place at the end, so an
interrupted build is never mistaken for a complete one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from spinlm.tasks.arith import generate_problems, to_rows

INFO_FILE = "build_info.json"

log = logging.getLogger(__name__)


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def _build_into(tmp: Path, *, seed: int, n_train: int, n_val: int, n_sft: int, sft_steps: int,
                sft_batch_size: int, sft_lr: float, min_steps: int, max_steps: int, max_number: int,
                vocab_size: int, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    # Imported here so that a cached build returns without importing torch and transformers.
    from spinlm.config import load_config
    from spinlm.sft import run_sft_from_config
    from spinlm.tasks.tiny_model import build_model, train_tokenizer

    # One call gives distinct questions, so splitting its list gives disjoint train and val sets.
    problems = generate_problems(n_train + n_val, seed, min_steps=min_steps, max_steps=max_steps,
                                 max_number=max_number)
    train_rows = to_rows(problems[:n_train], "train")
    val_rows = to_rows(problems[n_train:], "val")
    _write_parquet(train_rows, tmp / "train.parquet")
    _write_parquet(val_rows, tmp / "val.parquet")
    _write_parquet(train_rows[:n_sft], tmp / "sft.parquet")
    log.info("tiny task: wrote %d train, %d val, %d sft rows", n_train, n_val, n_sft)

    # The SFT rows are a subset of train, so the train text is the whole corpus.
    tokenizer = train_tokenizer([f"{p['question']}\n{p['solution']}" for p in problems[:n_train]],
                                vocab_size=vocab_size)
    tokenizer.save_pretrained(tmp / "tokenizer")
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(tmp / "init_model")
    tokenizer.save_pretrained(tmp / "init_model")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny task: tokenizer of %d tokens, Llama of %.2fM parameters", len(tokenizer), n_params / 1e6)

    # The same code path as `spinlm sft`, on CPU so that the cached artefacts do not depend on the machine.
    cfg = load_config({
        "model": {"path": str(tmp / "init_model"), "tokenizer_path": None, "dtype": "float32"},
        "data": {"train_files": str(tmp / "sft.parquet"), "val_files": str(tmp / "val.parquet"),
                 "format": "auto", "val_max_samples": None, "truncation": "error"},
        "sft": {"steps": sft_steps, "batch_size": sft_batch_size, "lr": sft_lr, "max_examples": None,
                "eval_before": False, "output_dir": str(tmp / "sft_model")},
        "trainer": {"seed": seed, "device": "cpu"},
    })
    summary = run_sft_from_config(cfg)
    return {
        "tokenizer_size": len(tokenizer), "n_params": n_params,
        "sft": {"steps": sft_steps, "batch_size": sft_batch_size, "lr": sft_lr,
                "final_loss": summary["final_loss"], "seconds": summary["seconds"],
                "val_acc_after": summary["val/acc_after"]},
    }


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden folder beside ``out`` (same file system, so renames are atomic; normal permissions)."""
    path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


BUNDLED_TASK_PRESETS = ("tiny", "smoke")  # the presets that read the bundled task from $SPINLM_TINY_DIR


def ensure_bundled_task(cfg) -> None:
    """preset=tiny / smoke train on the bundled task in $SPINLM_TINY_DIR (default .cache/tiny_task): build it on
    first use (about 30 s on 2 cores), as ./run_spin.sh does, so that a pip-installed spinlm runs them too."""
    if cfg.get("preset") not in BUNDLED_TASK_PRESETS:
        return
    out = Path(os.environ.get("SPINLM_TINY_DIR", ".cache/tiny_task")).resolve()
    if (out / INFO_FILE).is_file():
        return
    from omegaconf import OmegaConf

    paths = [OmegaConf.select(cfg, "model.path", default=None)]
    for key in ("data.train_files", "data.val_files"):
        paths += _as_list(OmegaConf.select(cfg, key, default=None))
    if any(isinstance(p, str) and Path(p).resolve().is_relative_to(out) for p in paths):  # not when overridden away
        build_tiny_task(out)


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def build_tiny_task(out_dir: str | Path, *, seed: int = 0, force: bool = False, n_train: int = 2000,
                    n_val: int = 200, n_sft: int = 500, sft_steps: int = 300, sft_batch_size: int = 16,
                    sft_lr: float = 1e-3, min_steps: int = 1, max_steps: int = 3, max_number: int = 20,
                    vocab_size: int = 512, model_kwargs: dict[str, Any] | None = None) -> Path:
    """Build (or reuse) the tiny task in ``out_dir``; returns its path. Deterministic given the arguments."""
    out = Path(out_dir).expanduser().resolve()
    settings = dict(seed=seed, n_train=n_train, n_val=n_val, n_sft=n_sft, sft_steps=sft_steps,
                    sft_batch_size=sft_batch_size, sft_lr=sft_lr, min_steps=min_steps, max_steps=max_steps,
                    max_number=max_number, vocab_size=vocab_size, model_kwargs=dict(model_kwargs or {}))
    if (out / INFO_FILE).is_file() and not force:
        return _reuse(out, settings)
    if out.exists() and not (out / INFO_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a tiny-task build (no {INFO_FILE}); "
                              "refusing to overwrite it, choose another --output")
    if not 1 <= n_sft <= n_train or n_val < 1:
        raise ValueError(f"n_train={n_train}, n_val={n_val}, n_sft={n_sft}: expected 1 <= n_sft <= n_train "
                         "and n_val >= 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):  # a second process (two test workers, two demos) waits, then reuses the build
        if (out / INFO_FILE).is_file() and not force:
            return _reuse(out, settings)
        return _build(out, settings)


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the hidden file ``.<out>.lock`` beside ``out`` for the body, then remove it."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removes the file on its way out: lock the one that is there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink()
        os.close(fd)


def _reuse(out: Path, settings: dict[str, Any]) -> Path:
    recorded = json.loads((out / INFO_FILE).read_text())
    differ = sorted(k for k, v in settings.items() if recorded.get(k) != v)
    note = f"; it was built with other {', '.join(differ)}" if differ else ""
    log.info("tiny task: complete build found at %s%s (use --force to rebuild)", out, note)
    return out


def _build(out: Path, settings: dict[str, Any]) -> Path:
    log.info("tiny task: building into %s (seed %d)", out, settings["seed"])
    start = time.perf_counter()
    tmp = _sibling(out, "building")
    try:
        info = _build_into(tmp, **settings)
        info = {**settings, **info, "seconds": round(time.perf_counter() - start, 2)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        old = None
        if out.exists():  # a previous complete build (force) or an empty folder: swap, then delete
            old = _sibling(out, "old")
            out.rename(old / "build")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # cleanup only; the error itself propagates
        raise
    if old is not None:
        shutil.rmtree(old)
    log.info("tiny task: done in %.1fs; SFT warm start val/acc %.3f (%d prompts) -> %s", info["seconds"],
             info["sft"]["val_acc_after"], settings["n_val"], out)
    return out
