"""Causal float32 attention of a long prefill on a CPU, by the compiled kernel `openelm_mlx/cpu_attention.c`.

Written out as MLX ops (model.py), the attention of a 512-token prefill took 18-30 ms per 270M layer on
the project's 2-core EPYC; the kernel takes ~5.6 ms for the same math (docs/performance.md). It runs
outside MLX's graph: the queries, keys and values are evaluated, read in place (NumPy views of MLX's
buffers), and the output comes back as a new array. That sync point in the middle of every layer is
why short prefills keep MLX's ops (`MIN_QUERIES`), as do decode steps and verify passes.

The kernel is built with small_gemm.c (setup.py) and needs no BLAS; where it is not built (not Linux
x86-64, no compiler, no AVX2), model.py keeps its MLX ops.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_split
from .blas import kernel_library

# Fewer queries than this stay in MLX: a whole 270M prefill (alternating, medians) ran as fast with the
# kernel as without it at 64 and 128 tokens (the sync point cost what the kernel saved), 7% faster at 256.
MIN_QUERIES = 256

_LONG = ctypes.c_long
_ARGUMENTS = ([ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_void_p, _LONG, _LONG] * 3 + [ctypes.c_void_p, ctypes.c_int]
              + [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p])


@lru_cache(maxsize=None)
def _kernel() -> Optional[ctypes._CFuncPtr]:
    path = kernel_library()
    if path is None:
        return None
    function = getattr(ctypes.CDLL(path), "openelm_causal_attention", None)
    if function is not None:
        function.argtypes, function.restype = _ARGUMENTS, ctypes.c_int
    return function


def applies(q: mx.array, k: mx.array) -> bool:
    """Whether model.py hands queries `q` [B, nq, T, hd] over keys `k` [B, nkv, S, hd] to `causal_attention`:
    float32 on a CPU, enough queries, head_dim a multiple of 16, and the kernel built for this CPU."""
    return (q.dtype == k.dtype == mx.float32 and q.shape[2] >= MIN_QUERIES and q.shape[1] % k.shape[1] == 0
            and q.shape[3] % 16 == 0 and mx.default_device().type == mx.DeviceType.cpu and _kernel() is not None)


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, *, q_norm: Optional[nn.RMSNorm] = None,
                     rope_base: float = 0.0, position: int = 0) -> mx.array:
    """Attention of q [B, nq, T, hd] over k, v [B, nkv, S, hd]: query t sits at key position S - T + t and
    sees the keys up to it; query head j reads kv head j // (nq // nkv). Returns [B, nq, T, hd] (a view
    of heads side by side, [B, T, nq * hd], as the output projection takes them).

    The kernel can also prepare the queries (each thread its own blocks, instead of MLX on one thread):
    `q_norm` applies that per-head RMSNorm first, and `rope_base` > 0 then rotates query t as
    `mx.fast.rope(traditional=False)` does at position `position + t` (angles in float64)."""
    B, nq, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    norm_weight = None if q_norm is None else q_norm.weight.astype(mx.float32)
    mx.eval(q, k, v, *([] if norm_weight is None else [norm_weight]))
    views = [np.asarray(a) for a in (q, k, v)]  # MLX's buffers, strides and all: no copy
    if any(view.strides[-1] != view.itemsize for view in views):
        views = [np.ascontiguousarray(view) for view in views]
    norm_view = None if norm_weight is None else np.asarray(norm_weight)  # kept alive through the calls
    norm = None if norm_view is None else norm_view.ctypes.data
    tables = _rope_tables(position, T, hd, rope_base) if rope_base > 0 else None
    rotations = [None, None] if tables is None else [table.ctypes.data for table in tables]
    out = np.empty((B, T, nq * hd), np.float32)
    for b in range(B):
        args = []
        for view in views:
            row = view[b]
            args += [row.ctypes.data, row.strides[0] // row.itemsize, row.strides[1] // row.itemsize]
        if _kernel()(nq, nkv, T, S, hd, scale, *args, out[b].ctypes.data, cpu_split.SPLITS, norm,
                     0.0 if q_norm is None else q_norm.eps, *rotations) != 0:
            raise MemoryError("openelm_mlx cpu_attention: no memory for the attention scores")
    return mx.array(out).reshape(B, T, nq, hd).transpose(0, 2, 1, 3)


@lru_cache(maxsize=8)
def _rope_tables(position: int, T: int, head_dim: int, base: float) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, head_dim / 2] of (position + t) * base^(-2i / head_dim), for every layer of a forward."""
    angles = np.arange(position, position + T, dtype=np.float64)[:, None] * \
        base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
