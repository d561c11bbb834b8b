"""KV cache: incremental decoding equals the full forward pass, per-layer kv-head counts, left-padded
batches, trim, state round trips and the sliding window.

Tiny float32 models with per-layer head counts. CACHE_STEP / EVICT_CHUNK are monkeypatched small so
growth and eviction happen within a few tokens; one test crosses the real 256-position step.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import random_state_dict, tiny_config
from openelm_mlx import cache as cache_mod
from openelm_mlx.cache import KVCache, make_cache
from openelm_mlx.config import ModelArgs
from openelm_mlx.loading import assign_weights
from openelm_mlx.model import Model
from reference import reference_logits

TOL = 1e-4
# kv heads differ per layer (1, 2, 4), GQA ratios 4, 2, 2; head_dim 8.
CONFIG = tiny_config(num_layers=3, model_dim=32, head_dim=8, num_query_heads=[4, 4, 8], num_kv_heads=[1, 2, 4],
                     ffn_multipliers=[0.5, 1.5, 3.0], ffn_dim_divisor=16, vocab_size=128)


def build(config: dict, seed: int = 0):
    state = random_state_dict(config, seed=seed)
    model = Model(ModelArgs.from_dict(config))
    assign_weights(model, {k: mx.array(v) for k, v in state.items()}, mx.float32)
    return model, state


@pytest.fixture(scope="module")
def tiny():
    model, state = build(CONFIG)
    return model, state


@pytest.fixture
def small_step(monkeypatch):
    monkeypatch.setattr(cache_mod, "CACHE_STEP", 8)
    return 8


def ids_for(n: int, batch: int = 1, seed: int = 0, vocab: int = CONFIG["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, n))


def run_chunks(model, ids: np.ndarray, cache, sizes) -> np.ndarray:
    """Feed ids[:, ...] through `cache` in chunks of the given sizes; concatenated logits."""
    out, start = [], 0
    for n in sizes:
        out.append(np.array(model(mx.array(ids[:, start:start + n]), cache=cache)))
        start += n
    assert start == ids.shape[1]
    return np.concatenate(out, axis=1)


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------- incremental decoding


def test_token_by_token_equals_full_forward_across_growth(tiny, small_step):
    model, state = tiny
    ids = ids_for(21, batch=2)  # crosses the (patched) growth boundaries at 8 and 16
    full = np.array(model(mx.array(ids)))
    cache = make_cache(len(model.layers))
    steps = []
    for t in range(ids.shape[1]):
        steps.append(np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)))
        for c in cache:
            assert c.offset == c.size == t + 1
            assert c.keys.shape[2] == -(-(t + 1) // small_step) * small_step  # grown in whole steps
    incremental = np.concatenate(steps, axis=1)
    assert maxdiff(incremental, full) <= TOL
    assert maxdiff(incremental, reference_logits(CONFIG, state, ids)) <= TOL


def test_crosses_the_real_256_step():
    assert cache_mod.CACHE_STEP == 256
    config = tiny_config(num_layers=2, model_dim=16, head_dim=8, num_query_heads=[2, 4], num_kv_heads=[1, 2],
                         ffn_multipliers=[1.0, 2.0], ffn_dim_divisor=16, vocab_size=64)
    model, state = build(config, seed=3)
    ids = ids_for(262, vocab=64, seed=3)
    full = np.array(model(mx.array(ids)))
    cache = make_cache(len(model.layers))
    prefill = np.array(model(mx.array(ids[:, :250]), cache=cache))
    assert cache[0].keys.shape[2] == 256
    steps = [prefill]
    for t in range(250, 262):
        steps.append(np.array(model(mx.array(ids[:, t:t + 1]), cache=cache)))
    assert cache[0].keys.shape[2] == 512 and cache[0].size == cache[0].offset == 262
    incremental = np.concatenate(steps, axis=1)
    assert maxdiff(incremental, full) <= TOL
    assert maxdiff(incremental[:, 240:], reference_logits(config, state, ids)[:, 240:]) <= TOL


@pytest.mark.parametrize("sizes", [[5, 1, 7, 3, 8, 1, 1], [8, 8, 8], [24, 1, 1], [1, 15, 10]],
                         ids=["mixed", "on-boundaries", "one-shot", "cross-two"])
def test_chunked_prefill_equals_full_forward(tiny, small_step, sizes):
    model, state = tiny
    ids = ids_for(sum(sizes), batch=2, seed=1)
    cache = make_cache(len(model.layers))
    chunked = run_chunks(model, ids, cache, sizes)
    assert maxdiff(chunked, np.array(model(mx.array(ids)))) <= TOL
    assert maxdiff(chunked, reference_logits(CONFIG, state, ids)) <= TOL
    assert all(c.offset == c.size == sum(sizes) for c in cache)


def test_each_layer_caches_its_own_kv_heads(tiny, small_step):
    model, _ = tiny
    B, T = 2, 11
    cache = make_cache(len(model.layers))
    model(mx.array(ids_for(T, batch=B)), cache=cache)
    hd = CONFIG["head_dim"]
    for i, c in enumerate(cache):
        nkv = CONFIG["num_kv_heads"][i]
        assert c.keys.shape == c.values.shape == (B, nkv, 16, hd)
        keys, values = c.state
        assert keys.shape == values.shape == (B, nkv, T, hd)
    assert len({c.keys.shape[1] for c in cache}) == 3  # the config really differs per layer
    stored = sum(k.nbytes + v.nbytes for k, v in (c.state for c in cache))
    assert stored == B * T * model.args.kv_cache_bytes_per_token(bytes_per_element=4)


# ------------------------------------------------------------------------------- left-padded batches


@pytest.mark.parametrize("prefill_chunk", [None, 4], ids=["one-prefill", "chunked-prefill"])
def test_left_padded_batch_rows_equal_solo_runs(tiny, small_step, prefill_chunk):
    model, state = tiny
    rng = np.random.default_rng(5)
    lengths = [5, 9, 2]
    prompts = [rng.integers(3, 128, size=n) for n in lengths]
    continuations = rng.integers(3, 128, size=(3, 5))  # fed one step at a time after the prefill
    width = max(lengths)
    pads = [width - n for n in lengths]
    # Pad ids are random: their values must not matter.
    batch = np.stack([np.concatenate([rng.integers(0, 128, size=p), row]) for p, row in zip(pads, prompts)])
    cache = make_cache(len(model.layers), left_padding=pads)
    sizes = [width] if prefill_chunk is None else [prefill_chunk] * (width // prefill_chunk) + (
        [width % prefill_chunk] if width % prefill_chunk else [])
    prefill = run_chunks(model, batch, cache, sizes)
    steps = [np.array(model(mx.array(continuations[:, t:t + 1]), cache=cache)) for t in range(continuations.shape[1])]
    decoded = np.concatenate(steps, axis=1)  # [3, 5, V], crosses the patched capacity step of 8
    assert cache[0].keys.shape[2] == 16
    for b, (pad, prompt) in enumerate(zip(pads, prompts)):
        solo_ids = np.concatenate([prompt, continuations[b]])[None]
        solo = np.array(model(mx.array(solo_ids)))[0]
        batched = np.concatenate([prefill[b, pad:], decoded[b]])
        assert np.isfinite(prefill[b]).all()  # pad positions too: no NaN leaks
        assert maxdiff(batched, solo) <= TOL, f"row {b} (pad {pad})"
        assert maxdiff(batched, reference_logits(CONFIG, state, solo_ids)[0]) <= TOL


def test_reference_left_padding_matches_solo(tiny):
    """The reference's own padding path (used by nothing else) agrees with solo runs."""
    _, state = tiny
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 128, size=n) for n in (3, 7)]
    batch = np.stack([np.concatenate([np.zeros(7 - len(r), dtype=int), r]) for r in rows])
    padded = reference_logits(CONFIG, state, batch, left_padding=[4, 0])
    for b, r in enumerate(rows):
        assert maxdiff(padded[b, 7 - len(r):], reference_logits(CONFIG, state, r[None])[0]) <= 1e-10


# ------------------------------------------------------------------------------- trim and state


def test_trim_then_refeed(tiny, small_step):
    model, state = tiny
    ids = ids_for(14, batch=2, seed=4)
    cache = make_cache(len(model.layers))
    first = run_chunks(model, ids, cache, [10, 1, 1, 1, 1])
    assert [c.trim(4) for c in cache] == [4] * len(cache)
    assert all(c.offset == c.size == 10 for c in cache)
    again = run_chunks(model, ids[:, 10:], cache, [1, 3])
    assert maxdiff(again, first[:, 10:]) <= 1e-6
    # Trim and feed different tokens: equals the full forward of the edited sequence.
    for c in cache:
        c.trim(5)
    new = ids_for(6, batch=2, seed=9)
    edited = np.concatenate([ids[:, :9], new], axis=1)
    out = run_chunks(model, new, cache, [2, 1, 3])
    assert maxdiff(out, np.array(model(mx.array(edited)))[:, 9:]) <= TOL
    assert maxdiff(out, reference_logits(CONFIG, state, edited)[:, 9:]) <= TOL
    # Trimming more than is stored drops what there is.
    assert cache[0].trim(100) == 15 and cache[0].size == cache[0].offset == 0


def test_state_round_trip_gives_identical_continuation(tiny, small_step, tmp_path):
    model, _ = tiny
    ids = ids_for(11, batch=2, seed=6)
    cont = ids_for(6, batch=2, seed=7)
    cache = make_cache(len(model.layers))
    model(mx.array(ids), cache=cache)
    # Save as a prompt cache would: arrays to safetensors, meta_state to JSON; then restore.
    arrays = {}
    for i, c in enumerate(cache):
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.state
    mx.save_safetensors(str(tmp_path / "cache.safetensors"), arrays)
    (tmp_path / "meta.json").write_text(json.dumps([c.meta_state for c in cache]))
    loaded = mx.load(str(tmp_path / "cache.safetensors"))
    metas = json.loads((tmp_path / "meta.json").read_text())
    restored = [KVCache.from_state((loaded[f"{i}.keys"], loaded[f"{i}.values"]), m) for i, m in enumerate(metas)]
    for c, r in zip(cache, restored):
        assert (r.offset, r.size) == (c.offset, c.size) == (11, 11)
        assert r.state[0].shape == c.state[0].shape
    a = run_chunks(model, cont, cache, [1, 2, 1, 1, 1])
    b = run_chunks(model, cont, restored, [1, 2, 1, 1, 1])
    np.testing.assert_array_equal(a, b)
    full = np.array(model(mx.array(np.concatenate([ids, cont], axis=1))))[:, 11:]
    assert maxdiff(b, full) <= TOL


def test_empty_cache_state_round_trip(tiny):
    model, _ = tiny
    empty = KVCache()
    restored = KVCache.from_state(empty.state, empty.meta_state)
    assert restored.keys is None and restored.offset == restored.size == 0
    ids = ids_for(5, seed=8)
    cache = [KVCache.from_state(empty.state, empty.meta_state) for _ in model.layers]
    assert maxdiff(np.array(model(mx.array(ids), cache=cache)), np.array(model(mx.array(ids)))) <= TOL


def test_left_padded_state_round_trip(tiny, small_step):
    """A restored left-padded cache must keep masking its pad positions and numbering rows from 0."""
    model, _ = tiny
    rng = np.random.default_rng(11)
    pads = [3, 0]
    batch = rng.integers(0, 128, size=(2, 6))
    cont = rng.integers(0, 128, size=(2, 3))
    cache = make_cache(len(model.layers), left_padding=pads)
    model(mx.array(batch), cache=cache)
    restored = [KVCache.from_state(c.state, c.meta_state) for c in cache]
    a = run_chunks(model, cont, cache, [1, 1, 1])
    b = run_chunks(model, cont, restored, [1, 1, 1])
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- sliding window

M, KEEP, CHUNK = 12, 2, 4


@pytest.fixture
def small_evict(monkeypatch, small_step):
    monkeypatch.setattr(cache_mod, "EVICT_CHUNK", CHUNK)


def test_window_without_eviction_equals_plain_cache(tiny, small_evict):
    model, _ = tiny
    ids = ids_for(M, batch=2, seed=12)
    windowed = make_cache(len(model.layers), max_size=M, keep=KEEP)
    plain = make_cache(len(model.layers))
    sizes = [7, 1, 3, 1]
    np.testing.assert_array_equal(run_chunks(model, ids, windowed, sizes), run_chunks(model, ids, plain, sizes))
    assert all(c.size == c.offset == M and c.keys.shape[2] <= M for c in windowed)


@pytest.mark.parametrize("sizes", [[7] + [1] * 25, [5, 3, 1, 5, 1, 1, 6, 2, 1, 7, 1, 1, 1]],
                         ids=["decode", "mixed-chunks"])
def test_sliding_window_evicts_and_matches_masked_reference(tiny, small_evict, sizes):
    """Past max_size the cache keeps its first KEEP positions and the most recent ones. Then the logits
    equal the reference with exactly those positions visible (RoPE positions stay absolute)."""
    model, state = tiny
    T = sum(sizes)
    ids = ids_for(T, seed=13)
    cache = make_cache(len(model.layers), max_size=M, keep=KEEP)
    allowed = np.zeros((T, T), dtype=bool)
    out, start, evictions = [], 0, 0
    for n in sizes:
        before = cache[0].size
        out.append(np.array(model(mx.array(ids[:, start:start + n]), cache=cache)))
        start += n
        c = cache[0]
        assert all((o.offset, o.size) == (c.offset, c.size) for o in cache)
        assert c.offset == start, "offsets keep counting absolute positions"
        assert c.size <= M and all(o.keys.shape[2] <= M for o in cache)
        if c.size < before + n:  # evicted: a whole chunk at once (at most half of what could go)
            evictions += 1
            assert before + n - c.size >= min(CHUNK, max(1, (before - KEEP) // 2))
        # Stored now: the kept prefix and the last (size - KEEP) positions; each new query saw
        # the stored positions up to itself.
        stored = list(range(KEEP)) + list(range(start - (c.size - KEEP), start))
        for p in range(start - n, start):
            allowed[p, [j for j in stored if j <= p]] = True
    assert evictions >= 2
    logits = np.concatenate(out, axis=1)
    assert np.isfinite(logits).all()
    ref = reference_logits(CONFIG, state, ids, allowed=allowed)
    assert maxdiff(logits, ref) <= TOL
    # Sanity on the test: with eviction the result differs from full causal attention.
    assert maxdiff(logits, reference_logits(CONFIG, state, ids)) > 1e-3


def test_sliding_window_refuses_what_cannot_fit(tiny, small_evict):
    model, _ = tiny
    with pytest.raises(ValueError):
        make_cache(1, max_size=KEEP, keep=KEEP)
    cache = make_cache(len(model.layers), max_size=M, keep=KEEP)
    with pytest.raises(ValueError):
        model(mx.array(ids_for(M + 1)), cache=cache)
