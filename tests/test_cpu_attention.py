"""The causal attention kernel (openelm_mlx/cpu_attention.c) of long CPU prefills: its output against a
float64 NumPy softmax attention (grouped queries, keys after a cached past, strided views, ragged block
and key counts, large scores), independent of its thread count, and a whole prefill through it against
the independent PyTorch reference (tests/reference.py)."""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from helpers import random_state_dict, tiny_config, write_hf_checkpoint
from openelm_mlx import cpu_attention
from openelm_mlx.cache import make_cache
from openelm_mlx.loading import load_model
from reference import reference_logits
from test_small_gemm import needs_kernel

pytestmark = needs_kernel


def reference(q, k, v, scale):
    """Softmax attention in float64: q [nq, T, hd], k, v [nkv, S, hd], query t at key position S - T + t."""
    nq, T, _ = q.shape
    nkv, S, _ = k.shape
    group = nq // nkv
    out = np.empty((nq, T, v.shape[-1]))
    visible = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]
    for head in range(nq):
        scores = scale * q[head].astype(np.float64) @ k[head // group].astype(np.float64).T
        scores = np.where(visible, scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[head] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[head // group].astype(np.float64)
    return out


def heads(rng, B, heads_count, T, hd, *, capacity=None, spread=1.0):
    """[B, heads, T, hd] as MLX lays attention inputs out: a transposed view of [B, T, heads, hd], or (with
    `capacity`) the first T positions of a larger cache buffer."""
    if capacity is None:
        x = mx.array((spread * rng.standard_normal((B, T, heads_count, hd))).astype(np.float32))
        return x.transpose(0, 2, 1, 3)
    buffer = mx.array((spread * rng.standard_normal((B, heads_count, capacity, hd))).astype(np.float32))
    return buffer[..., :T, :]


@pytest.mark.parametrize("B,nq,nkv,T,past,hd,spread", [
    (1, 4, 4, 64, 0, 16, 1.0),      # one block exactly, no groups
    (1, 6, 2, 130, 0, 64, 1.0),     # ragged last block, 3 queries per kv head
    (2, 4, 1, 77, 45, 32, 1.0),     # a batch, keys after a cached past (S = 122, not a multiple of 16)
    (1, 2, 1, 3, 300, 64, 1.0),     # few queries over many keys
    (1, 2, 2, 100, 20, 64, 6.0),    # scores in the hundreds: the max must be subtracted, exp underflows to 0
])
def test_kernel_matches_float64_attention(B, nq, nkv, T, past, hd, spread):
    rng = np.random.default_rng(T + past)
    q = heads(rng, B, nq, T, hd, spread=spread)
    k = heads(rng, B, nkv, past + T, hd, capacity=past + T + 37, spread=spread)
    v = heads(rng, B, nkv, past + T, hd, capacity=past + T + 37)
    scale = hd ** -0.5
    got = np.array(cpu_attention.causal_attention(q, k, v, scale))
    for b in range(B):
        want = reference(np.array(q[b]), np.array(k[b]), np.array(v[b]), scale)
        # float32 scores round to ~1e-7 of their size, and they grow with spread squared
        np.testing.assert_allclose(got[b], want, rtol=2e-5, atol=2e-6 * spread ** 2)


def test_the_kernel_norms_and_rotates_the_queries_like_mlx():
    """With q_norm and a RoPE base the kernel takes raw queries: the same attention as on MLX's
    RMSNorm'd, mx.fast.rope'd queries, at positions well past 0 (a cached past)."""
    rng = np.random.default_rng(5)
    nq, nkv, T, past, hd = 4, 2, 70, 400, 64
    raw = heads(rng, 1, nq, T, hd, spread=3.0)
    k = heads(rng, 1, nkv, past + T, hd)
    v = heads(rng, 1, nkv, past + T, hd)
    norm = nn.RMSNorm(hd, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, hd).astype(np.float32))
    prepared = mx.fast.rope(norm(raw), hd, traditional=False, base=10000.0, scale=1.0, offset=past)
    got = np.array(cpu_attention.causal_attention(raw, k, v, 0.125, q_norm=norm, rope_base=10000.0, position=past))
    want = reference(np.array(prepared[0]), np.array(k[0]), np.array(v[0]), 0.125)
    # MLX's float32 angles at positions near 470 are off by up to ~1e-4 rad; the kernel's come from float64
    np.testing.assert_allclose(got[0], want, rtol=1e-3, atol=2e-4)
    unrotated = np.array(cpu_attention.causal_attention(raw, k, v, 0.125, q_norm=norm))
    assert np.abs(unrotated - got).max() > 0.01  # the rotation is not a no-op


def test_the_result_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    nq, nkv, T, hd = 4, 2, 200, 64
    q, k, v = (rng.standard_normal((n, T, hd)).astype(np.float32) for n in (nq, nkv, nkv))
    outs = []
    for threads in (1, 2, 3):
        out = np.full((T, nq * hd), np.nan, np.float32)
        args = []
        for a in (q, k, v):
            args += [a.ctypes.data, a.strides[0] // 4, a.strides[1] // 4]
        assert cpu_attention._kernel()(nq, nkv, T, T, hd, 0.125, *args, out.ctypes.data, threads, None, 0, None, None) == 0
        outs.append(out)
    assert np.isfinite(outs[0]).all()
    assert all(np.array_equal(outs[0], other) for other in outs[1:])


def test_the_kernel_refuses_what_it_cannot_take():
    """A query-head count that is not a multiple of the kv heads, or a head size that is not a multiple of
    16, is refused (-1) without touching the output; `applies` keeps such inputs, other dtypes and short
    prefills in MLX."""
    out = np.zeros(16 * 3 * 24, np.float32)
    data = np.zeros(4096, np.float32).ctypes.data
    kernel = cpu_attention._kernel()
    none = (None, 0, None, None)  # no norm, no rotation
    assert kernel(3, 2, 16, 16, 16, 1.0, data, 256, 16, data, 256, 16, data, 256, 16, out.ctypes.data, 1, *none) == -1
    assert kernel(2, 2, 16, 16, 24, 1.0, data, 384, 24, data, 384, 24, data, 384, 24, out.ctypes.data, 1, *none) == -1
    assert kernel(2, 2, 16, 16, 16, 1.0, data, 256, 16, data, 256, 16, data, 256, 16, out.ctypes.data, 1,
                  None, 0, data, None) == -1  # a cos table without its sin table
    assert not out.any()
    long = cpu_attention.MIN_QUERIES
    q, k = mx.zeros((1, 4, long, 64)), mx.zeros((1, 2, long, 64))
    assert cpu_attention.applies(q, k)
    assert not cpu_attention.applies(q[:, :, :long - 1], k)
    assert not cpu_attention.applies(q.astype(mx.bfloat16), k.astype(mx.bfloat16))
    assert not cpu_attention.applies(mx.zeros((1, 4, long, 24)), mx.zeros((1, 2, long, 24)))
    assert not cpu_attention.applies(mx.zeros((1, 3, long, 64)), k)


def test_a_chunked_prefill_through_the_kernel_matches_the_reference(tmp_path, monkeypatch):
    """The model's prefill in two chunks (the second over a cached past) with the kernel taking every
    layer's attention, against the float64 PyTorch reference."""
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, num_query_heads=[4, 8], num_kv_heads=[2, 2])
    state = random_state_dict(config, seed=3)
    model = load_model(write_hf_checkpoint(tmp_path, config, state), dtype="float32")
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], (1, 90))
    monkeypatch.setattr(cpu_attention, "MIN_QUERIES", 16)
    calls = []
    kernel = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda *a, **options: calls.append(a[0].shape) or kernel(*a, **options))
    cache = make_cache(len(model.layers))
    logits = mx.concatenate([model(mx.array(ids[:, :60]), cache), model(mx.array(ids[:, 60:]), cache)], axis=1)
    assert calls == [(1, 4, 60, 16), (1, 8, 60, 16), (1, 4, 30, 16), (1, 8, 30, 16)]
    want = reference_logits(config, state, ids)
    np.testing.assert_allclose(np.array(logits), want, rtol=1e-4, atol=1e-4)
