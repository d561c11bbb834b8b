"""Work split across CPU streams equals the unsplit work exactly, and the model uses it."""

from __future__ import annotations

import mlx.core as mx
import pytest

from openelm_mlx import ModelArgs, cpu_split
from openelm_mlx.cache import make_cache
from openelm_mlx.model import Model

from helpers import tiny_config


@pytest.fixture
def two_splits(monkeypatch):
    monkeypatch.setattr(cpu_split, "SPLITS", 2)  # as on a 2-core machine, wherever the test runs
    monkeypatch.setattr(cpu_split, "MIN_SPLIT_ELEMENTS", 0)  # the tiny weights split too


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("rows, tokens", [(96, 1), (97, 5)])  # odd row counts: uneven parts
def test_split_equals_unsplit(two_splits, dtype, rows, tokens):
    w = mx.random.normal((rows, 64), key=mx.random.key(0)).astype(dtype)
    x = mx.random.normal((1, tokens, 64), key=mx.random.key(1)).astype(dtype)
    split = cpu_split.matmul_t(x, w)
    assert split.shape == (1, tokens, rows) and split.dtype == dtype
    assert mx.array_equal(split, x @ w.T).item()
    gated = cpu_split.gated_matmul_t(x, w[:96], lambda a, b: a * 2 - b)  # halves of 48 rows: parts of 24
    a, b = mx.split(x @ w[:96].T, 2, axis=-1)
    assert mx.array_equal(gated, a * 2 - b).item()


def test_bounds_cover_every_index_once():
    for n in (1, 2, 5, 96, 97):
        for parts in (1, 2, 3):
            slices = cpu_split.bounds(n, parts)
            assert [i for s in slices for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


def test_model_logits_unchanged_by_splitting(two_splits, monkeypatch):
    model = Model(ModelArgs.from_dict(tiny_config()))
    model.set_dtype(mx.bfloat16)
    ids = mx.array([[1, 5, 9, 200, 3]])
    monkeypatch.setattr(cpu_split, "MIN_SPLIT_ELEMENTS", 1 << 40)
    whole = model(ids)
    monkeypatch.setattr(cpu_split, "MIN_SPLIT_ELEMENTS", 0)
    calls = []
    real = cpu_split.matmul_t

    def spy(x, weight):
        calls.append(weight.shape)
        return real(x, weight)

    monkeypatch.setattr("openelm_mlx.model.matmul_t", spy)
    split = model(ids)
    assert len(calls) == 3 * len(model.layers) + 1  # qkv, out, proj_2 per layer, and the tied logits
    assert mx.array_equal(split, whole).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("context, new", [(0, 2), (0, 5), (0, 150), (9, 4), (70, 8), (70, 64), (9, 140)])
def test_model_on_two_streams_equals_one_stream(monkeypatch, dtype, context, new):
    """Matmuls split by output rows, the FFN's gate, up and SiLU by features, and causal attention
    from 128 queries on by query ranges (each query still sees the keys of its unsplit chunk) change
    no bit of the logits, in prefills (150 tokens: several attention chunks) and in passes on a
    filled cache."""
    model = Model(ModelArgs.from_dict(tiny_config()))
    model.set_dtype(dtype)
    ids = mx.random.randint(0, 320, (1, context + new), key=mx.random.key(3))
    monkeypatch.setattr(cpu_split, "MIN_SPLIT_ELEMENTS", 0)
    monkeypatch.setattr(cpu_split, "_single_threaded", lambda device_type, dtype: True)  # as with MKL on 1 thread

    def logits(splits: int) -> mx.array:
        monkeypatch.setattr(cpu_split, "SPLITS", splits)
        cache = make_cache(len(model.layers))
        if context:
            mx.eval(model(ids[:, :context], cache))
        return model(ids[:, context:], cache)

    one, two = logits(1), logits(2)
    assert mx.array_equal(one, two).item()


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
