"""runtime: the host-memory policy that keeps freed buffers for the next training step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mnist_resnet.runtime import retain_freed_memory

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="mallopt thresholds are a glibc feature",
)

# Allocates, touches and frees a 40 MB buffer (above glibc's largest adaptive mmap threshold,
# 32 MB, so by default it is mmapped and unmapped every time) and prints the minor page faults
# of the last 10 rounds.
ROUNDS = """
import ctypes, resource, sys
from mnist_resnet.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@glibc_only
def test_freed_buffers_are_reused_instead_of_faulted_back_in() -> None:
    default, retained = _faults("default"), _faults("retain")
    # 10 rounds of 40 MB in 4 KB pages: ~100,000 faults when every round maps fresh memory.
    assert default > 50_000
    assert retained < 1_000


@glibc_only
def test_a_users_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert retain_freed_memory() is False
