"""glibc's mmap threshold, fixed by spinlm on CPU: freed large tensors go back to the OS instead of staying in RSS."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from spinlm.allocator import USER_SETTING, fix_mmap_threshold

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# 64 blocks of 2 MiB, each followed by a small tensor that stays alive (as an activation is followed by smaller
# long-lived tensors), after one 8 MiB block was freed (as after the first backward); then the big ones are freed.
PATTERN = """
import re, sys
from pathlib import Path
import torch
from spinlm.allocator import fix_mmap_threshold
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else False
warm = torch.ones(8 << 18)
del warm
base = rss()
keep, big = [], []
for _ in range(64):
    big.append(torch.ones(2 << 18))
    keep.append(torch.ones(256))
del big
print(fixed, rss() - base)
"""


def kept_after_free(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != USER_SETTING}
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_fixed_threshold_gives_freed_blocks_back():
    fixed, kept_mb = kept_after_free("fix")
    assert fixed
    assert kept_mb < 16  # the 128 MiB freed went back to the OS
    default_fixed, default_kept_mb = kept_after_free("default")
    assert not default_fixed
    assert default_kept_mb > 100  # glibc's raised threshold: the 128 MiB stay in the heap, in RSS


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv(USER_SETTING, "65536")
    assert fix_mmap_threshold() is False
