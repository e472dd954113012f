"""Deterministic crash points for the kill -9 tests.

SPINLM_KILL_AT=<point>:<n> makes the process SIGKILL itself the n-th time it reaches <point> (generate, eval,
update, checkpoint_write), so a test can kill a run exactly mid-generation, mid-update or mid-checkpoint and check that the
resumed run loses nothing; with SPINLM_KILL_RANK=<r> only Ray rank r dies; SPINLM_KILL_SIGNAL=SIGTERM sends
SIGTERM instead of SIGKILL (the clean-stop tests). Unset (always, outside those tests) it costs one environment lookup.
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("SPINLM_KILL_AT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name or os.environ.get("SPINLM_KILL_RANK", os.environ.get("SPINLM_RANK")) != os.environ.get("SPINLM_RANK"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get("SPINLM_KILL_SIGNAL", "SIGKILL")))
