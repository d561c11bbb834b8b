"""PrefixStore: several conversations cached at once (the LRU), longest-prefix match, eviction by bytes
and by count, copies that do not disturb the stored entries, and the server's worker using it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from helpers import text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.generation import new_cache
from openelm_mlx.jobs import JOB_DONE
from openelm_mlx.openai_api import COMPLETION, ParsedRequest, ServedModel
from openelm_mlx.openai_requests import parse_request
from openelm_mlx.prompt_cache import PromptCache, ReuseStats
from openelm_mlx.prompt_format import RAW
from openelm_mlx.prompt_store import PrefixStore
from openelm_mlx.engine import Engine, Job

OPTIONS = GenerationOptions(max_tokens=5)


@pytest.fixture(scope="module")
def lm(tmp_path_factory, spm_model):
    """A tiny float32 model with head_dim 32, so its cache can also be quantized."""
    config = tiny_config(tied=False, head_dim=32)
    directory = tmp_path_factory.mktemp("store") / "m"
    return om.load(write_hf_checkpoint(directory, config, text_only_state(config, spm_model), tokenizer=spm_model),
                   dtype="float32")


def run(cache, lm, ids, options=OPTIONS):
    stats = ReuseStats()
    tokens = [r.token for r in cache.generate(lm[1], ids, options, stats)]
    return tokens, stats


def served(engine, ids, options=OPTIONS):
    """One request through the engine, as the server runs it: its tokens and how its prompt was split."""
    job = Job(ParsedRequest(COMPLETION, list(ids), options, stream=True, include_usage=False), continues_text=False)
    engine.submit(job)
    engine.run_until_idle()
    tokens = []
    while (event := job.events.get_nowait()) is not JOB_DONE:
        tokens += [event.token] if event.token >= 0 else []
    return tokens, job.reuse


def fresh(lm, ids, options=OPTIONS):
    return om.generate(lm[0], lm[1], ids, options).tokens


def prefilled(lm, ids, options=OPTIONS):
    """A cache for `options` holding `ids` (prefilled through stream_generate with max_tokens 0)."""
    cache = new_cache(lm[0], options)
    list(om.stream_generate(lm[0], lm[1], ids, replace(options, max_tokens=0), cache=cache))
    return cache


def test_two_interleaved_conversations_both_hit(lm):
    tok = lm[1]
    a1, b1 = tok.encode("Once upon a time there was a model"), tok.encode("def fibonacci(n): return n")
    for store in (PrefixStore(lm[0]), None):
        if store is not None:  # the server's engine, its rows starting from and finishing into the store
            engine = Engine(lm[0], tok, max_batch=1, store=store)
            turn = lambda ids: served(engine, ids)  # noqa: E731
        else:  # chat's single conversation cache
            cache = PromptCache(lm[0])
            turn = lambda ids: run(cache, lm, ids)  # noqa: E731
        a_reply, _ = turn(a1)
        b_reply, _ = turn(b1)
        a2, b2 = a1 + a_reply + tok.encode("Hello world")[1:], b1 + b_reply + tok.encode("Python is")[1:]
        a_tokens, a_stats = turn(a2)
        b_tokens, b_stats = turn(b2)
        assert a_tokens == fresh(lm, a2) and b_tokens == fresh(lm, b2)
        if store is not None:  # each turn prefills only what its conversation added
            assert a_stats.cached_tokens == len(a1) + len(a_reply) - 1
            assert b_stats.cached_tokens == len(b1) + len(b_reply) - 1
            assert a_stats.prefilled_tokens == len(a2) - a_stats.cached_tokens
            assert len(store) == 2
        else:  # one cache: the conversations evict each other (they share BOS and a word-start piece)
            shared = next(i for i, (x, y) in enumerate(zip(a2, b1 + b_reply)) if x != y)
            assert a_stats.cached_tokens == shared <= 2


def test_longest_prefix_match(lm):
    model = lm[0]
    store = PrefixStore(model)
    short, long = [1, 10, 11, 12, 13], [1, 10, 11, 20, 21, 22, 23]
    store.insert(short, prefilled(lm, short))
    store.insert(long, prefilled(lm, long))
    assert store.lookup([1, 10, 11, 12, 13, 14], OPTIONS)[1] == 5
    assert store.lookup([1, 10, 11, 20, 21, 30], OPTIONS)[1] == 5
    assert store.lookup([1, 10, 11, 40], OPTIONS)[1] == 3
    assert store.lookup(long, OPTIONS)[1] == len(long) - 1  # one token is always left to feed
    assert store.lookup([7, 8], OPTIONS)[1] == 0


def test_a_looked_up_copy_leaves_the_entry_intact(lm):
    tok = lm[1]
    prompt = tok.encode("Once upon a time there was a model")
    store = PrefixStore(lm[0])
    store.insert(prompt, prefilled(lm, prompt))
    for follow_up in ([40, 41, 42], [50, 51]):  # the first run extends its copy; the second must not see it
        cache, held = store.lookup(prompt + follow_up, OPTIONS)
        assert held == len(prompt)
        tokens = om.generate(lm[0], tok, follow_up, OPTIONS, cache=cache, context_ids=prompt).tokens
        assert tokens == fresh(lm, prompt + follow_up)
    assert len(store) == 1 and store.lookup(prompt, OPTIONS)[0][0].offset == len(prompt) - 1


def test_eviction_by_count_drops_the_least_recently_used(lm):
    model = lm[0]
    store = PrefixStore(model, max_entries=2)
    a, b, c = [1, 10, 11], [1, 20, 21], [1, 30, 31]
    store.insert(a, prefilled(lm, a))
    store.insert(b, prefilled(lm, b))
    store.lookup(a + [5], OPTIONS)  # a is now the most recently used
    store.insert(c, prefilled(lm, c))
    assert len(store) == 2 and [e.tokens for e in store] == [tuple(c), tuple(a)]
    assert store.lookup(b + [5], OPTIONS)[1] == 1  # only BOS, shared with the others


def test_eviction_by_bytes(lm):
    model = lm[0]
    a, b = [1, 10, 11], [1, 20, 21]
    one = sum(layer.nbytes for layer in prefilled(lm, a))
    store = PrefixStore(model, max_bytes=one + one // 2)
    store.insert(a, prefilled(lm, a))
    store.insert(b, prefilled(lm, b))
    assert [e.tokens for e in store] == [tuple(b)] and store.nbytes == one
    too_small = PrefixStore(model, max_bytes=one - 1)
    too_small.insert(a, prefilled(lm, a))
    assert len(too_small) == 0


def test_an_extended_prefix_replaces_its_entry_and_a_shorter_one_is_not_added(lm):
    model = lm[0]
    store = PrefixStore(model)
    store.insert([1, 10, 11], prefilled(lm, [1, 10, 11]))
    store.insert([1, 10, 11, 12, 13], prefilled(lm, [1, 10, 11, 12, 13]))
    store.insert([1, 10], prefilled(lm, [1, 10]))
    assert [e.tokens for e in store] == [(1, 10, 11, 12, 13)]


def test_entries_match_only_their_own_kv_quantization(lm):
    model = lm[0]
    store = PrefixStore(model)
    ids, other = [1, 10, 11, 12], [1, 10, 11, 12, 13, 14]
    quantized = GenerationOptions(kv_bits=8, kv_group_size=32)
    store.insert(ids, prefilled(lm, ids))
    store.insert(other, prefilled(lm, other, quantized))  # extends ids, but is another kind: both stay
    assert len(store) == 2
    assert store.lookup(other + [5], quantized)[1] == 6
    assert store.lookup(other + [5], GenerationOptions())[1] == 4
    assert store.lookup(ids + [5], GenerationOptions(kv_bits=4, kv_group_size=32))[1] == 0
    assert store.lookup(ids + [5], GenerationOptions(sliding_window=True))[1] == 4  # the window is only a size
    assert store.lookup(ids + [5], GenerationOptions(sliding_window=True))[0][0].max_size == 2048


def test_a_cache_whose_window_dropped_positions_is_not_stored(lm):
    model = lm[0]
    cache = prefilled(lm, [1, 10, 11, 12])
    for layer in cache:
        layer.size -= 1  # as after the sliding window dropped one position
    store = PrefixStore(model)
    store.insert([1, 10, 11, 12], cache)
    assert len(store) == 0


def test_the_engine_serves_interleaved_conversations_from_the_store(lm):
    model, tok = lm
    worker = Engine(model, tok, store=PrefixStore(model, max_entries=4))
    served = ServedModel("tiny", tok, RAW, model.args.max_context_length)

    def complete(prompt):
        job = Job(parse_request(COMPLETION, json.dumps({"prompt": prompt, "max_tokens": 4}).encode(), served))
        worker.submit(job)
        worker.run_until_idle()
        return worker.records[-1]

    first = ["Once upon a time there was a model", "def fibonacci(n): return n"]
    for text in first:
        complete(text)
    for text in first:  # the same prompts again, interleaved: both come from the cache
        record = complete(text)
        assert record.cached_tokens == len(tok.encode(text)) - 1
