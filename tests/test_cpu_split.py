"""Matmuls split across CPU streams equal the unsplit ones exactly, and the model uses them."""

from __future__ import annotations

import mlx.core as mx
import pytest

from openelm_mlx import ModelArgs, cpu_split
from openelm_mlx.model import Model

from helpers import tiny_config


@pytest.fixture
def two_splits(monkeypatch):
    monkeypatch.setattr(cpu_split, "SPLITS", 2)  # as on a 2-core machine, wherever the test runs


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("rows, tokens", [(96, 1), (97, 5)])  # odd row counts: uneven parts
def test_split_equals_unsplit(two_splits, dtype, rows, tokens):
    w = mx.random.normal((rows, 64), key=mx.random.key(0)).astype(dtype)
    x = mx.random.normal((1, tokens, 64), key=mx.random.key(1)).astype(dtype)
    split = cpu_split.matmul_t(x, w, min_elements=0)
    assert split.shape == (1, tokens, rows) and split.dtype == dtype
    assert mx.array_equal(split, x @ w.T).item()


def test_model_logits_unchanged_by_splitting(two_splits, monkeypatch):
    model = Model(ModelArgs.from_dict(tiny_config()))
    model.set_dtype(mx.bfloat16)
    ids = mx.array([[1, 5, 9, 200, 3]])
    monkeypatch.setattr(cpu_split, "MIN_SPLIT_ELEMENTS", 1 << 40)
    whole = model(ids)
    calls = []
    real = cpu_split.matmul_t

    def spy(x, weight, *, min_elements=0):
        calls.append(weight.shape)
        return real(x, weight, min_elements=0)

    monkeypatch.setattr("openelm_mlx.model.matmul_t", spy)
    split = model(ids)
    assert len(calls) == 4 * len(model.layers) + 1  # qkv, out, proj_1, proj_2 per layer, and the tied logits
    assert mx.array_equal(split, whole).item()


@pytest.mark.parametrize("tokens", [1, 2, 5, 17])
def test_multithreaded_blas_orientation_keeps_the_result(monkeypatch, tokens):
    """With a multithreaded BLAS, several rows go through `(W @ x.T).T`: the same dot products, so
    the same values up to float32 summation order; shape and dtype unchanged; one row exactly as before."""
    monkeypatch.setattr(cpu_split, "_single_threaded", lambda device_type, dtype: False)
    w = mx.random.normal((97, 64), key=mx.random.key(0))
    x = mx.random.normal((2, tokens, 64), key=mx.random.key(1))
    out = cpu_split.matmul_t(x, w)
    assert out.shape == (2, tokens, 97) and out.dtype == mx.float32
    assert mx.allclose(out, x @ w.T, rtol=1e-5, atol=1e-5).item()
    if tokens == 1:
        assert mx.array_equal(out, x @ w.T).item()
