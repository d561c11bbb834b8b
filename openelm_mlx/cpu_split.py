"""CPU matmuls: big ones split across CPU streams where MLX's CPU matmul runs on one thread, and
several-token float32 ones in the orientation a multithreaded BLAS runs fastest.

MLX's bfloat16/float16 CPU matmul (and float32 on the reference BLAS) uses one core. Splitting a
weight's output rows into parts evaluated on separate CPU streams (each stream has its own thread)
uses the others: measured on this project's 2-core EPYC, a 5120x1280 bfloat16 matvec went from
6.0 to 3.0 ms. Every output element is still one dot product over the same inputs, so results do
not change. Not used on GPUs, nor for float32 with MKL or OpenBLAS (already multithreaded).

With MKL, `x @ W.T` for several rows of x (a verify pass, a prefill) runs well below the speed of
`(W @ x.T).T`, the same dot products with the roles of the operands swapped: measured on this
project's 2-core machine while it was shared (medians; absolute times varied 2x between runs, the
ranking did not), 8 rows through a 6144x1280 float32 weight 20 vs 11 ms, 32 rows 35 vs 14 ms, 512
rows 230 vs 193 ms. One row (a decode step) keeps `x @ W.T`. OpenBLAS was not measured.
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
    """`x @ weight.T` for a weight [N, K]; on a CPU, in the form that runs fastest there (module docstring)."""
    device_type = str(mx.default_device().type)
    single_threaded = _single_threaded(device_type, x.dtype)
    if device_type == str(mx.DeviceType.cpu) and not single_threaded and x.size > x.shape[-1]:
        rows = x.reshape(-1, x.shape[-1])
        return (weight @ rows.T).T.reshape(*x.shape[:-1], weight.shape[0])
    if SPLITS < 2 or weight.size < min_elements or not single_threaded:
        return x @ weight.T
    step = -(-weight.shape[0] // SPLITS)
    parts = [x @ weight[:step].T]  # on the caller's stream
    for i, stream in enumerate(_extra_streams(SPLITS - 1), 1):
        with mx.stream(stream):
            parts.append(x @ weight[i * step:(i + 1) * step].T)
    return mx.concatenate(parts, axis=-1)
