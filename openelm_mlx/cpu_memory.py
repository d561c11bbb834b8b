"""Keep freed memory in the process on Linux (glibc), so MLX's CPU ops do not fault in fresh pages.

MLX's CPU backend caches freed buffers up to 32 MB in all (`mx.set_cache_limit`) and hands the rest
back to malloc. glibc serves a large request with a fresh `mmap` (its threshold rises from 128 KB only
as such blocks are freed) and returns freed memory at the top of its heaps to the kernel: every such
buffer is then zero-filled again, page by page, on first touch. On this project's 2-core EPYC that
made SiLU-times-gate over 512 rows of 3072 take 31 ms instead of 6, and the softmax of a 512-token
attention layer 114 ms instead of 29; a 512-token prefill of the 270M took 2310-2884 ms (medians of
4 processes) with the thresholds below against 2763-3395 ms without (docs/performance.md). Raising
MLX's own cache limit to 1 GB did not help the prefill: freed buffers of other sizes filled it.

`keep_freed_memory` raises both glibc thresholds (`mallopt`): requests of up to 32 MB (the most glibc
allows) come from its heaps, and up to 256 MB of free memory at a heap's top stays mapped. The cost
is resident memory that stays at its peak, by at most that much per heap. It does nothing where the
user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (glibc reads them at start), and nothing
off glibc. This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def glibc() -> Optional[ctypes.CDLL]:
    """This process's C library if it is glibc (Linux), else None (musl's mallopt does nothing)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # glibc's own symbol


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring); True when they were set."""
    libc = glibc()
    if libc is None or any(os.environ.get(var) for var in USER_VARS):
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)  # mallopt returns 1 on success
