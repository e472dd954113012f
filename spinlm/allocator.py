"""glibc malloc settings for training on CPU: during an update (forward + backward + optimizer step), freed
activation buffers go back to the operating system instead of staying in the heap.

Why: glibc serves a block of at least its mmap threshold (128 KiB at start) with its own mmap, returned to the OS on
free. But each time such a block is freed, glibc raises the threshold to that block's size (up to 32 MiB on 64-bit
Linux). After the first backward, activations and their gradients (a few MiB to a few tens of MiB each) therefore come
from the heap, and once freed they stay there, cut into pieces between smaller blocks that are still alive, and keep
counting in the process's RSS. LoRA suffers most: its small saved adapter activations and the three extra
temporaries of every adapted linear layer leave the heap more fragmented than full fine-tuning does. On
SmolLM2-135M one SPIN round peaked at 7.1-9.4 GB (run to run) with LoRA and 8.2-8.5 GB with full fine-tuning under
glibc's defaults, and at 5.7 and 7.3 GB with this (BENCHMARKS.md, "LoRA vs full fine-tuning on SmolLM2-135M").

The cost of an mmap per large block is page faults (each new block is fresh, zeroed memory), so the fixed 1 MiB
threshold holds only while an update runs, where the peak is. Outside it (generation, no-grad log-prob passes, whose
peaks are small) glibc gets the large-block settings its own dynamic rule ends at: a 32 MiB mmap threshold and a
64 MiB trim threshold, and reuses heap blocks without faults.

A MALLOC_MMAP_THRESHOLD_ set in the environment is the user's choice: then nothing here changes glibc's settings.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from contextlib import contextmanager

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
UPDATE_MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB and more: every activation of a real model, few small tensors
# where glibc's dynamic rule ends on 64-bit: mmap threshold at most 32 MiB, trim threshold twice the mmap threshold
DEFAULT_MAX_MMAP_THRESHOLD = 32 << 20
DEFAULT_MAX_TRIM_THRESHOLD = 64 << 20
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment variable for the mmap threshold


@functools.cache
def glibc():
    """The C library, when it is glibc and the user left its mmap threshold alone; else None."""
    if os.environ.get(USER_SETTING):
        logger.debug("%s=%s is set: glibc's malloc settings left as the user chose", USER_SETTING,
                     os.environ[USER_SETTING])
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.debug("not glibc (%s %s): malloc settings left alone", platform.system(), platform.libc_ver())
        return None
    return ctypes.CDLL(None)  # the C library the interpreter is linked with


def set_malloc(option: int, value: int) -> bool:
    """mallopt(option, value) in glibc; False (nothing changed) where glibc is not in charge (see glibc())."""
    libc = glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)))
    if not ok:
        logger.warning("mallopt(%d, %d) failed: glibc's malloc settings stay as they were; peak RSS on CPU may be "
                       "higher than the live tensors need", option, value)
    return ok


@contextmanager
def large_blocks_returned():
    """Within: blocks of 1 MiB and more are mmapped and go back to the OS when freed. After: glibc's large-block
    settings at the end of its dynamic rule (the block reuse the rest of the run is used to)."""
    set_malloc(M_MMAP_THRESHOLD, UPDATE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        set_malloc(M_MMAP_THRESHOLD, DEFAULT_MAX_MMAP_THRESHOLD)
        set_malloc(M_TRIM_THRESHOLD, DEFAULT_MAX_TRIM_THRESHOLD)
