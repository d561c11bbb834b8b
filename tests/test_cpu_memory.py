"""openelm_mlx.cpu_memory: glibc keeps freed memory in the process after `keep_freed_memory`."""

from __future__ import annotations

import pytest

from test_bench import run_with_blas_env
from openelm_mlx.cpu_memory import glibc

# A 16 MB block is mmapped by glibc's default threshold (128 KB, rising only as such blocks are freed);
# after keep_freed_memory it comes from the heap. glibc marks an mmapped chunk with the 0x2 bit (IS_MMAPPED)
# of the size word just before the block.
ALLOCATION = """
import ctypes
from openelm_mlx.cpu_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
set_now = keep_freed_memory()
block = libc.malloc(16 << 20)
print(set_now, bool(ctypes.c_size_t.from_address(block - 8).value & 2))
libc.free(block)
"""


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
def test_large_blocks_come_from_the_heap_after_keep_freed_memory():
    assert run_with_blas_env(ALLOCATION).split() == ["True", "False"]


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
def test_a_threshold_the_user_set_is_left_alone():
    assert run_with_blas_env(ALLOCATION, MALLOC_TRIM_THRESHOLD_="131072").split() == ["False", "True"]
