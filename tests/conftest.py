"""Shared fixtures. The bundled tiny task is built once per machine into .cache/test_tiny_task (gitignored)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see spinlm/cli.py

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_task() -> Path:
    from spinlm.tasks.build import build_tiny_task

    path = build_tiny_task(REPO / ".cache" / "test_tiny_task", seed=0)
    os.environ["SPINLM_TINY_DIR"] = str(path)  # the smoke/tiny presets read it
    return path
