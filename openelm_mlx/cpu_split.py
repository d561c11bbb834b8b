"""Big matmuls split across CPU streams, where MLX's CPU matmul runs on one thread.

MLX's bfloat16/float16 CPU matmul (and float32 on the reference BLAS) uses one core. Splitting a
weight's output rows into parts evaluated on separate CPU streams (each stream has its own thread)
uses the others: measured on this project's 2-core EPYC, a 5120x1280 bfloat16 matvec went from
6.0 to 3.0 ms. Every output element is still one dot product over the same inputs, so results do
not change. Not used on GPUs, nor for float32 with MKL or OpenBLAS (already multithreaded).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import List

import mlx.core as mx

from .blas import optimized_blas

# Parts per matmul: one per core, at most 2 (the only count measured so far).
SPLITS = min(os.cpu_count() or 1, 2)
# Smaller weights are not split: the extra ops would cost more than the second core saves.
MIN_SPLIT_ELEMENTS = 1 << 20


@lru_cache(maxsize=None)
def _extra_streams(count: int) -> List[mx.Stream]:
    return [mx.new_stream(mx.cpu) for _ in range(count)]


@lru_cache(maxsize=None)
def _single_threaded(device_type: str, dtype: mx.Dtype) -> bool:
    if device_type != str(mx.DeviceType.cpu):
        return False
    return dtype != mx.float32 or not optimized_blas()


def matmul_t(x: mx.array, weight: mx.array, *, min_elements: int = MIN_SPLIT_ELEMENTS) -> mx.array:
    """`x @ weight.T` for a weight [N, K]; split by output rows across CPU streams where that pays."""
    if (SPLITS < 2 or weight.size < min_elements
            or not _single_threaded(str(mx.default_device().type), x.dtype)):
        return x @ weight.T
    step = -(-weight.shape[0] // SPLITS)
    parts = [x @ weight[:step].T]  # on the caller's stream
    for i, stream in enumerate(_extra_streams(SPLITS - 1), 1):
        with mx.stream(stream):
            parts.append(x @ weight[i * step:(i + 1) * step].T)
    return mx.concatenate(parts, axis=-1)
