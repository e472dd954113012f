"""glibc malloc settings for training on CPU: a fixed mmap threshold, so that freed activation buffers go back to the
operating system instead of staying in the heap.

Why: glibc serves a block of at least its mmap threshold (128 KiB at start) with its own mmap, returned to the OS on
free. But each time such a block is freed, glibc raises the threshold to that block's size (up to 32 MiB on 64-bit
Linux). After the first backward, activations and their gradients (a few MiB to a few tens of MiB each) therefore come
from the heap, and once freed they stay there, cut into pieces between smaller blocks that are still alive, and keep
counting in the process's RSS. LoRA suffers most: its many small adapter tensors and the three extra temporaries of
every adapted linear layer leave the heap more fragmented than full fine-tuning does. On SmolLM2-135M, one SPIN round
peaked at 9.4 GB with LoRA and 8.3 GB with full fine-tuning under glibc's default; a fixed 1 MiB threshold (see
BENCHMARKS.md, "LoRA vs full fine-tuning on SmolLM2-135M") brings both close to what their live tensors need.

A MALLOC_MMAP_THRESHOLD_ set in the environment is the user's choice and is left as it is.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more: every activation of a real model, few of the small tensors
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment variable for the same setting


def fix_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at threshold_bytes for this process (which also turns off its dynamic raising).
    Returns whether it was set: not where the C library is not glibc, nor when the user set MALLOC_MMAP_THRESHOLD_."""
    if os.environ.get(USER_SETTING):
        logger.debug("%s=%s is set: glibc's mmap threshold left as the user chose", USER_SETTING,
                     os.environ[USER_SETTING])
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.debug("not glibc (%s %s): malloc settings left alone", platform.system(), platform.libc_ver())
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter is linked with
    ok = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold_bytes)))
    if not ok:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) failed: glibc's dynamic mmap threshold stays; peak RSS on CPU "
                       "may be higher than the live tensors need", threshold_bytes)
    return ok
