"""glibc malloc tuning for processes that move multi-MiB messages.

By default glibc serves allocations above 128 KiB-32 MiB (its threshold adapts)
with fresh mmap()s and returns them with munmap(): every 4 MiB message then
costs ~1000 page faults to allocate and zero. Raising the mmap threshold keeps
such buffers in the heap, and a high trim threshold keeps the heap from being
returned to the kernel after every message. Measured on 2 cores (bench/README):
shardstream 682 -> 857 MB/s, client 1.18 -> 0.90 CPU s/GB; low thresholds
(1 MiB) made it worse (381 MB/s).

Workers apply this at start-up, and a client `Loader` on start unless
`tune_malloc=False`; anyone can call `tune_malloc()`. The environment variables
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, if set, win (glibc reads them at
process start; this then does nothing). The price: up to the trim threshold of
freed heap stays with the process instead of going back to the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where not glibc or
    where the environment already chose them."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    return trim


def trim_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc `malloc_trim(0)`, every arena);
    False where malloc is not glibc's."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
