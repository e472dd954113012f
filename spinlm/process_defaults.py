"""The environment variables the `spinlm` command sets for its process, unless the user set them: torch reads them
when it is imported or at its first allocation, so `apply_process_defaults()` runs before torch is imported (the
command does it first thing; the benchmarks do it so that every side runs as the command runs)."""
from __future__ import annotations

import os

DEFAULTS = {
    # OpenMP threads that spin while waiting make torch 5-10x slower whenever the cores are shared with anything
    # else (measured: a smoke run 54 s -> 8 s at load 4 on 2 cores).
    "OMP_WAIT_POLICY": "PASSIVE",
    # torch's CPU allocator: tensors of 2 MiB and more 2 MiB-aligned and madvised for transparent huge pages, so the
    # fresh blocks of an update (spinlm/allocator.py returns freed ones to the OS) take fewer page faults where the
    # kernel finds huge pages (about half here; the 25M update 659 -> 729 tokens/s, same peak RSS).
    "THP_MEM_ALLOC_ENABLE": "1",
}


def apply_process_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
