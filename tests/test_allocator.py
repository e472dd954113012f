"""glibc's mmap threshold during a CPU update: freed large tensors go back to the OS instead of staying in RSS."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from spinlm.allocator import USER_SETTING, glibc, large_blocks_returned

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# 64 blocks of 2 MiB, each followed by a small tensor that stays alive (as an activation is followed by smaller
# long-lived tensors), after one 8 MiB block was freed (as after the first backward); then the big ones are freed.
# Prints the MiB still held, then the page faults of 20 more rounds of allocating and freeing one 4 MiB block.
PATTERN = """
import re, resource, sys
from contextlib import nullcontext
from pathlib import Path
import torch
from spinlm.allocator import large_blocks_returned
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
if sys.argv[1] == "after":  # the settings an update leaves behind
    with large_blocks_returned():
        pass
with large_blocks_returned() if sys.argv[1] == "inside" else nullcontext():
    warm = torch.ones(8 << 18)
    del warm
    base = rss()
    keep, big = [], []
    for _ in range(64):
        big.append(torch.ones(2 << 18))
        keep.append(torch.ones(256))
    del big
    kept = rss() - base
    block = torch.ones(1 << 20)
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # the 4 MiB block freed and allocated again: from the heap, its pages are reused
        block = torch.ones(1 << 20)
        del block
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def kept_and_faults(mode: str, huge_pages: bool = False) -> tuple[int, int]:
    """MiB of the 128 MiB freed that the process still holds; page faults of 20 fresh 4 MiB blocks. huge_pages:
    torch's THP_MEM_ALLOC_ENABLE (the spinlm command sets it), else off whatever the environment says."""
    env = {k: v for k, v in os.environ.items() if k != USER_SETTING}
    env["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}).stdout.split()
    return int(out[0]), int(out[1])


def transparent_huge_pages() -> bool:
    """Whether the kernel gives madvised memory huge pages ([always] or [madvise])."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[never]" not in path.read_text()


@glibc_only
def test_an_update_gives_freed_blocks_back_and_generation_reuses_them():
    kept, faults = kept_and_faults("inside")
    assert kept < 16  # the 128 MiB freed went back to the OS
    assert faults > 15 * 1024  # the price: each 4 MiB block is fresh memory (1024 pages of 4 KiB)
    kept, faults = kept_and_faults("default")
    assert kept > 100  # glibc's raised threshold: the 128 MiB stay in the heap, in RSS
    assert faults <= 2 * 1024  # the block's pages reused (at most two fresh blocks' worth)
    _, faults = kept_and_faults("after")  # outside an update: heap blocks reused, as by default
    assert faults <= 2 * 1024


@glibc_only
@pytest.mark.skipif(not transparent_huge_pages(), reason="the kernel's transparent huge pages are off")
def test_huge_pages_still_give_freed_blocks_back():
    # torch's THP allocation (what the spinlm command sets) takes fewer faults where the kernel finds huge pages
    # (about half here: a speed matter, not asserted); the memory an update frees must still go back
    kept, _ = kept_and_faults("inside", huge_pages=True)
    assert kept < 16


def test_user_setting_wins(monkeypatch):
    glibc.cache_clear()
    monkeypatch.setenv(USER_SETTING, "65536")
    try:
        assert glibc() is None
        with large_blocks_returned():  # changes nothing, raises nothing
            pass
    finally:
        glibc.cache_clear()
