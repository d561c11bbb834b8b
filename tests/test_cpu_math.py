"""openelm_mlx.cpu_math: the CPU float32 SiLU-times-gate and softmax against float64 NumPy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from openelm_mlx import cpu_math


def _softmax64(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_exp_matches_float64_over_the_float32_range_and_saturates():
    x = np.concatenate([np.linspace(-87.0, 88.0, 20001), [0.0, -1e-30, 1e-30]]).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    got = np.array(cpu_math._exp(mx.array(x)))
    mlx_error = np.abs(np.array(mx.exp(mx.array(x))) / exact - 1).max()  # ~4e-6 near |x| = 88: x * log2(e) rounds
    assert np.abs(got / exact - 1).max() <= max(mlx_error, 1e-7) * 1.01
    small = np.abs(x) <= 8
    assert np.abs(got[small] / exact[small] - 1).max() < 1e-6
    assert got[-3] == 1.0  # e^0 exactly
    below = np.array(cpu_math._exp(mx.array([-mx.inf, -1000.0, -89.0])))
    assert (below == 0).all()


def test_silu_times_matches_float64_including_large_gates():
    rng = np.random.default_rng(0)
    gate = np.concatenate([rng.normal(0, 4, (5, 300)), np.full((1, 300), -200.0), np.full((1, 300), 200.0)])
    gate, up = gate.astype(np.float32), rng.normal(0, 1, gate.shape).astype(np.float32)
    got = np.array(cpu_math.silu_times(mx.array(gate), mx.array(up)))
    g = gate.astype(np.float64)
    expected = g / (1 + np.exp(-g)) * up
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_softmax_matches_float64_and_masked_scores_get_exactly_zero():
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 5, (2, 3, 7, 40)).astype(np.float32)
    visible = np.arange(40)[None] <= np.arange(33, 40)[:, None]  # causal, last query sees every key
    masked = np.where(visible, scores, -np.inf).astype(np.float32)
    got = np.array(cpu_math.softmax(mx.array(masked)))
    assert np.abs(got - _softmax64(masked.astype(np.float64))).max() <= 1e-6
    assert (got[..., ~visible] == 0).all()
    assert np.abs(got.sum(axis=-1) - 1).max() <= 1e-6


def test_other_dtypes_keep_mlx_ops():
    x = mx.random.normal((4, 64), key=mx.random.key(2)).astype(mx.bfloat16)
    assert mx.array_equal(cpu_math.silu_times(x, x), nn.silu(x) * x)
    assert mx.array_equal(cpu_math.softmax(x), mx.softmax(x, axis=-1, precise=True))


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_kernels_take_any_shape_in_one_process(rows):
    # mx.compile retraces per shape; results must not depend on which shape came first.
    gate = mx.random.normal((rows, 96), key=mx.random.key(rows))
    expected = np.array(nn.silu(gate) * gate)
    assert np.abs(np.array(cpu_math.silu_times(gate, gate)) - expected).max() <= 1e-5
