"""CPU work split across CPU streams where MLX would run it on one thread, and several-token float32
matmuls in the orientation a multithreaded BLAS runs fastest.

MLX's bfloat16/float16 CPU matmul (and float32 on a single-threaded BLAS) uses one core, and so do
its elementwise ops and compiled kernels. Each CPU stream has its own thread: splitting a weight's
output rows into parts evaluated on separate streams uses the other cores. Measured on this
project's 2-core EPYC, a 5120x1280 bfloat16 matvec went from 6.0 to 3.0 ms. Every output element is
still one dot product over the same inputs, so results do not change. Not used on GPUs.

With MKL, `use_optimized_blas` runs its matmuls on one thread (unless MKL_NUM_THREADS or
OMP_NUM_THREADS says otherwise), so float32 is split here too, along with the causal attention
(model.py) and the FFN's activation (`gated_matmul_t`). On the same machine that made a 270M decode
step 1.14-1.31x and an 8-token verify pass 1.3-1.5x faster than MKL's own two threads, which are
slow on few-row matmuls next to MLX's threads; prefill was unchanged (docs/performance.md).

With a multithreaded BLAS (MKL with MKL_NUM_THREADS > 1, OpenBLAS), `x @ W.T` for several rows of x
runs well below the speed of `(W @ x.T).T`, the same dot products with the roles of the operands
swapped: measured on this project's 2-core machine while it was shared (medians; absolute times
varied 2x between runs, the ranking did not), 8 rows through a 6144x1280 float32 weight 20 vs 11 ms,
32 rows 35 vs 14 ms, 512 rows 230 vs 193 ms. One row (a decode step) keeps `x @ W.T`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, List, Sequence

import mlx.core as mx

from .blas import blas_threads, optimized_blas

# Parts per matmul: one per core, at most 2 (the only count measured so far).
SPLITS = min(os.cpu_count() or 1, 2)
# Smaller weights are not split: the extra ops would cost more than the second core saves.
MIN_SPLIT_ELEMENTS = 1 << 20


@lru_cache(maxsize=None)
def _extra_streams(count: int) -> List[mx.Stream]:
    return [mx.new_stream(mx.cpu) for _ in range(count)]


@lru_cache(maxsize=None)
def _single_threaded(device_type: str, dtype: mx.Dtype) -> bool:
    """Whether MLX's matmul for `dtype` runs on one thread here (so splitting it over streams pays)."""
    if device_type != str(mx.DeviceType.cpu):
        return False
    return dtype != mx.float32 or not optimized_blas() or blas_threads() == 1


def spread(dtype: mx.Dtype) -> bool:
    """Whether work in `dtype` on the default device is spread over `SPLITS` CPU streams (`on_streams`)."""
    return SPLITS > 1 and _single_threaded(str(mx.default_device().type), dtype)


def on_streams(fn: Callable[..., mx.array], *parts: Sequence) -> List[mx.array]:
    """`[fn(a[i], b[i], ...) for i]`, part 0 on the caller's stream and each other part on its own CPU
    stream, so that up to `SPLITS` parts run at once (each CPU stream has its own thread)."""
    args = list(zip(*parts))
    out = [fn(*args[0])]
    for stream, arg in zip(_extra_streams(SPLITS - 1), args[1:]):
        with mx.stream(stream):
            out.append(fn(*arg))
    return out


def bounds(n: int, parts: int = SPLITS) -> List[slice]:
    """`n` split into at most `parts` contiguous, non-empty slices, as even as they can be."""
    cuts = [i * n // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def matmul_t(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T` for a weight [N, K]; on a CPU, in the form that runs fastest there (module docstring)."""
    device_type = str(mx.default_device().type)
    single_threaded = _single_threaded(device_type, x.dtype)
    if device_type == str(mx.DeviceType.cpu) and not single_threaded and x.size > x.shape[-1]:
        rows = x.reshape(-1, x.shape[-1])
        return (weight @ rows.T).T.reshape(*x.shape[:-1], weight.shape[0])
    if SPLITS < 2 or weight.size < MIN_SPLIT_ELEMENTS or not single_threaded:
        return x @ weight.T
    parts = on_streams(lambda w: x @ w.T, [weight[part] for part in bounds(weight.shape[0])])
    return mx.concatenate(parts, axis=-1)


def gated_matmul_t(x: mx.array, weight: mx.array, gate: Callable[[mx.array, mx.array], mx.array]) -> mx.array:
    """`gate(a, b)` for `a, b = split(x @ weight.T, 2, axis=-1)` (a gated FFN's first projection and
    activation). Where matmuls are split, each stream computes a share of the features from its own
    `a` and `b` rows and applies `gate` to them, and the shares are concatenated once: a compiled
    kernel whose inputs come from another stream stalled both streams in MLX 0.32 (measured)."""
    half = weight.shape[0] // 2
    if SPLITS > 1 and weight.size >= MIN_SPLIT_ELEMENTS and spread(x.dtype):
        def share(part: slice) -> mx.array:
            return gate(x @ weight[part].T, x @ weight[half + part.start:half + part.stop].T)
        return mx.concatenate(on_streams(share, bounds(half)), axis=-1)
    a, b = mx.split(matmul_t(x, weight), 2, axis=-1)
    return gate(a, b)
