"""Shared fixtures. The bundled tiny task is built once per machine into .cache/test_tiny_task (gitignored)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see spinlm/cli.py

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and on a busy machine thread barriers stall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_arith_model(path: Path, *, hidden_size: int, intermediate_size: int) -> Path:
    """A 2-layer Llama with a 64-token BPE trained on "a+b=c" strings, saved with its tokenizer (no hub)."""
    from spinlm.tasks.tiny_model import build_model, train_tokenizer

    tok = train_tokenizer([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], vocab_size=64)
    build_model(tok, hidden_size=hidden_size, num_layers=2, num_heads=2, intermediate_size=intermediate_size,
                seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_task() -> Path:
    from spinlm.tasks.build import build_tiny_task

    path = build_tiny_task(REPO / ".cache" / "test_tiny_task", seed=0)
    os.environ["SPINLM_TINY_DIR"] = str(path)  # the smoke/tiny presets read it
    return path
