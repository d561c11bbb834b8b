"""PromptCache: the longest shared prefix is reused, whatever the previous request was, and a cache whose
positions no longer match its ids (a sliding window dropped some) starts over."""

from __future__ import annotations

import pytest

from serving import tiny_chat_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.errors import InvalidOptionError
from openelm_mlx.generation import cache_window
from openelm_mlx.prompt_cache import PromptCache, ReuseStats


@pytest.fixture(scope="module")
def lms(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("prompt_cache")
    return (om.load(tiny_chat_checkpoint(root / "full", spm_model), dtype="float32"),
            om.load(tiny_chat_checkpoint(root / "short", spm_model, context=32), dtype="float32"))


def run(cache, lm, ids, **options):
    stats = ReuseStats()
    tokens = [r.token for r in cache.generate(lm[1], ids, GenerationOptions(**options), stats)]
    return tokens, stats


@pytest.mark.parametrize("second", ["same", "shorter", "longer", "different"])
def test_reuse_equals_from_scratch(lms, second):
    lm = lms[0]
    first = lm[1].encode("Once upon a time there was a model")
    ids = {"same": first, "shorter": first[:4], "longer": first + [40, 41, 42],
           "different": lm[1].encode("Hello world")}[second]
    cache = PromptCache(lm[0])
    generated, _ = run(cache, lm, first, max_tokens=6)
    assert cache.tokens == first + generated[:-1]
    tokens, stats = run(cache, lm, ids, max_tokens=6)
    common = next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), min(len(first), len(ids)))
    assert stats.cached_tokens == min(common, len(ids) - 1)  # at least one token is always fed
    assert stats.prefilled_tokens == len(ids) - stats.cached_tokens
    assert tokens == om.generate(lm[0], lm[1], ids, GenerationOptions(max_tokens=6)).tokens


def test_a_sliding_window_that_dropped_positions_starts_over(lms):
    lm = lms[1]
    cache = PromptCache(lm[0])
    ids = lm[1].encode("Hello world")
    generated, _ = run(cache, lm, ids, max_tokens=40, sliding_window=True, prefill_step=8)  # runs past the 32-token context
    assert len(generated) == 40 and cache.tokens == [] and cache.cache[0].offset == 0
    tokens, stats = run(cache, lm, ids, max_tokens=6)
    assert stats.cached_tokens == 0
    assert tokens == om.generate(lm[0], lm[1], ids, GenerationOptions(max_tokens=6)).tokens


def test_a_repeated_prompt_gets_the_same_penalised_tokens(lms):
    """The repetition penalty looks at the cached ids too: a cache hit changes nothing."""
    lm = lms[0]
    ids = lm[1].encode("Once upon a time there was a model")
    options = dict(max_tokens=12, repetition_penalty=1.5)
    cache = PromptCache(lm[0])
    first, _ = run(cache, lm, ids, **options)
    second, stats = run(cache, lm, ids, **options)
    assert stats.cached_tokens == len(ids) - 1
    assert first == second == om.generate(lm[0], lm[1], ids, GenerationOptions(**options)).tokens


def test_an_early_close_leaves_the_ids_and_the_cache_in_step(lms):
    lm = lms[0]
    ids = lm[1].encode("Hello world")
    cache = PromptCache(lm[0])
    stream = cache.generate(lm[1], ids, GenerationOptions(max_tokens=20))
    received = [next(stream).token for _ in range(3)]
    stream.close()
    assert cache.tokens == ids + received[:2]
    assert [c.offset for c in cache.cache] == [len(cache.tokens)] * len(cache.cache)


def test_the_window_is_sized_by_the_options(lms):
    """The same sizing as stream_generate's own caches, prefill_step check included."""
    model, tok = lms[1]
    cache = PromptCache(model)
    with pytest.raises(InvalidOptionError, match="prefill_step"):
        next(cache.generate(tok, tok.encode("Hello"), GenerationOptions(sliding_window=True)))  # 512 > 32 - 4
    options = GenerationOptions(max_tokens=2, sliding_window=True, prefill_step=8)
    list(cache.generate(tok, tok.encode("Hello"), options))
    assert [c.max_size for c in cache.cache] == [cache_window(model, options)] * len(cache.cache) == [32] * 3
    list(cache.generate(tok, tok.encode("Hello"), GenerationOptions(max_tokens=2)))
    assert [c.max_size for c in cache.cache] == [None] * 3
