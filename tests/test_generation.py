"""Generation: greedy and sampled decoding, logits processing, stop strings, EOS, length and context
limits, streaming statistics, batches, cache reuse, and golden outputs of a trained model.

The tiny model is a real checkpoint (Apple's layout, written by helpers) with an untied lm_head
whose rows for byte-fallback, control and unk pieces are zero: their logits are exactly 0 while
the ~60 text pieces have logits of std ~4, so the argmax is a text piece and the output is
readable ASCII (a random head would mostly emit byte tokens, i.e. U+FFFD soup). Nothing about
the generation code is patched.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import replace

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from helpers import DOCS_TARGET, LLAMA2_TOKENIZER, text_checkpoints
import openelm_mlx as om
from openelm_mlx import ContextLengthError, GenerationOptions
from openelm_mlx import sampling
from openelm_mlx.generation import SEED_LIMIT, StopMatcher
from openelm_mlx.sampling import make_repetition_penalty, make_sampler

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox",
           "OpenELM uses layer-wise scaling: every layer has its own number of heads."]
SMALL_CONTEXT = 32
EOS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, spm_model):
    """Two checkpoints with the same weights: the default context (2048) and a 32-token one."""
    return text_checkpoints(tmp_path_factory.mktemp("gen"), spm_model, SMALL_CONTEXT)


@pytest.fixture(scope="module")
def lm(checkpoints, spm_model):
    return om.load(checkpoints[0], dtype="float32", tokenizer=spm_model)


@pytest.fixture(scope="module")
def small_lm(checkpoints, spm_model):
    return om.load(checkpoints[1], dtype="float32", tokenizer=spm_model)


def reference_greedy(model, ids, n, penalty=None, context_size=20):
    """Argmax over full forwards without a cache (optionally with CTRL's penalty, in numpy)."""
    ids = list(ids)
    start = len(ids)
    for _ in range(n):
        logits = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        if penalty is not None:
            for t in set(ids[-context_size:]):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        ids.append(int(np.argmax(logits)))
    return ids[start:]


def greedy(model, tok, prompt, max_tokens=16, **kw):
    return om.generate(model, tok, prompt, GenerationOptions(max_tokens=max_tokens, **kw))


def stream_list(model, tok, prompt, **kw):
    return list(om.stream_generate(model, tok, prompt, GenerationOptions(**kw)))


# ---------------------------------------------------------------------------- greedy


def test_greedy_is_deterministic(lm):
    model, tok = lm
    for prompt in PROMPTS:
        a, b = greedy(model, tok, prompt), greedy(model, tok, prompt)
        assert a.tokens == b.tokens and a.text == b.text
        assert a.finish_reason == "length" and len(a.tokens) == 16


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_argmax_of_full_forwards(lm, prompt):
    model, tok = lm
    result = greedy(model, tok, prompt, max_tokens=12)
    assert result.tokens == reference_greedy(model, tok.encode(prompt), 12)


def test_chunked_prefill_gives_the_same_tokens(lm):
    model, tok = lm
    prompt = PROMPTS[-1]
    assert len(tok.encode(prompt)) > 10
    whole = greedy(model, tok, prompt, max_tokens=10)
    for step in (1, 3, 7):
        assert greedy(model, tok, prompt, max_tokens=10, prefill_step=step).tokens == whole.tokens


def test_text_is_the_decoded_tokens(lm):
    model, tok = lm
    for prompt in PROMPTS:
        result = greedy(model, tok, prompt, max_tokens=20)
        assert result.text == tok.decode(result.tokens)
        assert result.text and "\ufffd" not in result.text


def test_prompt_as_token_ids(lm):
    model, tok = lm
    ids = tok.encode(PROMPTS[0])
    assert greedy(model, tok, ids).tokens == greedy(model, tok, PROMPTS[0]).tokens
    assert greedy(model, tok, mx.array(ids).tolist()).tokens == greedy(model, tok, ids).tokens


def test_empty_prompt_is_refused(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="empty"):
        greedy(model, tok, [])


# ---------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(lm):
    model, tok = lm
    opts = dict(max_tokens=24, temperature=1.5)
    a = greedy(model, tok, PROMPTS[0], seed=7, **opts)
    b = greedy(model, tok, PROMPTS[0], seed=7, **opts)
    assert a.tokens == b.tokens
    others = {tuple(greedy(model, tok, PROMPTS[0], seed=s, **opts).tokens) for s in range(1, 6)}
    assert len(others | {tuple(a.tokens)}) > 1, "different seeds should (very likely) sample differently"
    assert a.tokens != greedy(model, tok, PROMPTS[0], max_tokens=24).tokens


def test_seeded_filters_are_reproducible(lm):
    model, tok = lm
    opts = dict(max_tokens=16, temperature=1.2, top_k=5, top_p=0.9, min_p=0.05, seed=3)
    assert greedy(model, tok, PROMPTS[1], **opts).tokens == greedy(model, tok, PROMPTS[1], **opts).tokens


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)],
                         ids=["top_k=1", "tiny top_p", "min_p near 1"])
def test_degenerate_filters_equal_greedy(lm, filters):
    model, tok = lm
    for prompt in PROMPTS[:3]:
        want = greedy(model, tok, prompt).tokens
        for seed in (0, 1):
            assert greedy(model, tok, prompt, temperature=1.0, seed=seed, **filters).tokens == want


def test_top_k_samples_only_the_k_likeliest():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((6, 40)).astype(np.float32))
    k = 5
    top = np.argsort(-np.array(logits), axis=-1)[:, :k]
    sampler = make_sampler(temperature=1.0, top_k=k)
    seen = [set() for _ in range(6)]
    key = mx.random.key(0)
    for _ in range(200):
        key, sub = mx.random.split(key)
        for row, token in enumerate(sampler(logits, sub).tolist()):
            assert token in top[row], (row, token)
            seen[row].add(token)
    assert all(len(s) > 1 for s in seen), "top-k sampling never left the argmax"


def test_top_p_samples_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (the second crosses 0.75).
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)
    logits = mx.array(np.log(probs))
    sampler = make_sampler(temperature=1.0, top_p=0.75)
    seen = set()
    key = mx.random.key(1)
    for _ in range(300):
        key, sub = mx.random.split(key)
        seen.add(sampler(logits, sub).item())
    assert seen == {1, 3}


def test_min_p_drops_unlikely_tokens():
    probs = np.array([[0.6, 0.3, 0.07, 0.03]], np.float32)
    sampler = make_sampler(temperature=1.0, min_p=0.1)  # keeps p >= 0.06
    seen = set()
    key = mx.random.key(2)
    for _ in range(300):
        key, sub = mx.random.split(key)
        seen.add(sampler(mx.array(np.log(probs)), sub).item())
    assert seen == {0, 1, 2}


def test_temperature_zero_is_argmax():
    logits = mx.array(np.random.default_rng(1).standard_normal((3, 17)).astype(np.float32))
    assert make_sampler(0.0)(logits).tolist() == np.argmax(np.array(logits), axis=-1).tolist()


# ---------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_math():
    logits = mx.array([[2.0, -2.0, 1.0, -1.0, 4.0, 0.5]])
    history = mx.array([[0, 1, 1, 4, 5]])
    out = np.array(make_repetition_penalty(2.0, context_size=4)(history, logits))
    # last 4 tokens: 1, 1, 4, 5 -> 1 multiplied (negative) once, 4 and 5 divided; 0 is out of the window.
    np.testing.assert_allclose(out, [[2.0, -4.0, 1.0, -1.0, 2.0, 0.25]])
    empty = make_repetition_penalty(2.0, context_size=4)(mx.zeros((1, 0), mx.int32), logits)
    np.testing.assert_array_equal(np.array(empty), np.array(logits))


def test_repetition_penalty_changes_greedy_output(lm):
    model, tok = lm
    changed = 0
    for prompt in PROMPTS:
        plain = greedy(model, tok, prompt, max_tokens=20)
        penalised = greedy(model, tok, prompt, max_tokens=20, repetition_penalty=1.5)
        changed += plain.tokens != penalised.tokens
    assert changed >= 2


@pytest.mark.parametrize("penalty,context", [(1.5, 20), (1.3, 4)])
def test_repetition_penalty_equals_reference(lm, penalty, context):
    model, tok = lm
    prompt = PROMPTS[0]
    result = greedy(model, tok, prompt, max_tokens=12, repetition_penalty=penalty, repetition_context_size=context)
    assert result.tokens == reference_greedy(model, tok.encode(prompt), 12, penalty, context)


def test_repetition_penalty_window_stays_fixed_size(lm, monkeypatch):
    """Longer prompt and generation than the window: the penalty still equals the reference over the
    last N ids of the whole sequence, and it is never handed more than N ids (no ever-growing history)."""
    model, tok = lm
    widths = []

    def recording_penalty(penalty, context_size):
        apply = make_repetition_penalty(penalty, context_size)

        def record(history, logits):
            widths.append(history.shape[1])
            return apply(history, logits)

        return record

    monkeypatch.setattr(sampling, "make_repetition_penalty", recording_penalty)
    ids = tok.encode(PROMPTS[-1])
    assert len(ids) > 6
    result = greedy(model, tok, ids, max_tokens=14, repetition_penalty=1.5, repetition_context_size=6)
    assert result.tokens == reference_greedy(model, ids, 14, 1.5, 6)
    assert widths == [6] * 14


def test_repetition_penalty_sees_the_cached_ids(lm):
    """Continuing from a cache: the penalty window spans the cached ids (context_ids), not only the new prompt."""
    model, tok = lm
    first = tok.encode(PROMPTS[0])
    options = GenerationOptions(max_tokens=5, repetition_penalty=1.5, repetition_context_size=12)
    cache = om.make_cache(len(model.layers))
    part1 = om.generate(model, tok, first, options, cache=cache)
    assert part1.tokens == reference_greedy(model, first, 5, 1.5, 12)
    more = tok.encode(" Hello world", add_bos=False)
    part2 = om.generate(model, tok, part1.tokens[-1:] + more, replace(options, max_tokens=10), cache=cache,
                        context_ids=first + part1.tokens[:-1])
    assert part2.tokens == reference_greedy(model, first + part1.tokens + more, 10, 1.5, 12)


# ---------------------------------------------------------------------------- stop strings


def segments_and_text(model, tok, prompt, n):
    """Per-token text segments of a greedy run without stop strings."""
    responses = stream_list(model, tok, prompt, max_tokens=n)
    return [r.text for r in responses], "".join(r.text for r in responses)


def boundaries(segments):
    out, pos = set(), 0
    for s in segments[:-1]:
        pos += len(s)
        out.add(pos)
    return out


def test_stop_string_across_tokens_is_never_emitted(lm):
    model, tok = lm
    checked = 0
    for prompt in PROMPTS:
        segments, full = segments_and_text(model, tok, prompt, 24)
        # A stop string that spans a token boundary: the last char of one segment + the first of the next.
        cands = [(i, segments[i][-1] + segments[i + 1][0]) for i in range(2, len(segments) - 1)
                 if segments[i] and segments[i + 1]]
        for i, stop in cands:
            at = full.find(stop)
            if not any(at < b < at + len(stop) for b in boundaries(segments)):
                continue  # its first occurrence lies inside one token
            responses = stream_list(model, tok, prompt, max_tokens=24, stop=[stop])
            text = "".join(r.text for r in responses)
            assert text == full[:at], (stop, full)
            assert all(stop not in r.text for r in responses)
            assert responses[-1].finish_reason == "stop"
            assert all(r.finish_reason is None for r in responses[:-1])
            result = greedy(model, tok, prompt, max_tokens=24, stop=[stop])
            assert (result.text, result.finish_reason) == (full[:at], "stop")
            assert result.tokens == greedy(model, tok, prompt, max_tokens=24).tokens[:len(result.tokens)]
            checked += 1
            break
    assert checked >= 2, "no greedy output had a stop string spanning two tokens"


def test_first_of_several_stop_strings_wins(lm):
    model, tok = lm
    segments, full = segments_and_text(model, tok, PROMPTS[0], 24)
    late, early = full[-3:], full[4:6]
    result = greedy(model, tok, PROMPTS[0], max_tokens=24, stop=[late, early, "\u2603never"])
    assert result.text == full[:full.find(early)]
    assert result.finish_reason == "stop"


def test_held_back_partial_match_is_emitted_when_it_fails(lm):
    model, tok = lm
    prompt = PROMPTS[0]
    segments, full = segments_and_text(model, tok, prompt, 24)
    i = next(i for i in range(3, 20) if segments[i])
    stop = segments[i] + "\u2603"  # snowman: never generated by this ASCII-only model
    responses = stream_list(model, tok, prompt, max_tokens=24, stop=[stop])
    texts = [r.text for r in responses]
    assert "".join(texts) == full
    assert responses[-1].finish_reason == "length"
    # The partial match (all of segment i) was really held back at token i, then released.
    assert "".join(texts[:i + 1]) == "".join(segments[:i + 1])[:-len(segments[i])]
    assert "".join(texts[:i + 2]).startswith("".join(segments[:i + 1]))


def test_partial_match_at_the_end_is_flushed(lm):
    model, tok = lm
    segments, full = segments_and_text(model, tok, PROMPTS[1], 12)
    stop = full[-1] + "\u2603"
    result = greedy(model, tok, PROMPTS[1], max_tokens=12, stop=[stop])
    assert (result.text, result.finish_reason) == (full, "length")


def test_stop_matcher_unit():
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False)
    assert m.push("a") == ("a", False)  # the held "a" fails, the new one is held
    assert m.push("b") == ("", True)
    m = StopMatcher(["abc", "zz"])
    assert m.push("ab") == ("", False)
    assert m.push("d") == ("abd", False)
    assert m.push("z") == ("", False)
    assert m.flush() == "z"
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)


# ---------------------------------------------------------------------------- length and EOS


def test_max_tokens_is_respected(lm):
    model, tok = lm
    for n in (1, 5, 17):
        result = greedy(model, tok, PROMPTS[2], max_tokens=n)
        assert len(result.tokens) == n and result.finish_reason == "length"
        assert result.stats.generation_tokens == n


def test_max_tokens_zero(lm):
    model, tok = lm
    result = greedy(model, tok, PROMPTS[2], max_tokens=0)
    assert (result.text, result.tokens, result.finish_reason) == ("", [], "length")


@pytest.fixture(scope="module")
def eos_lm(checkpoints, spm_model, lm):
    """The tiny model with its EOS row of lm_head set to 1.001 x the row of a token that greedy emits
    for the first time a few steps in, so EOS becomes the argmax there (EOS's row is zero in `lm`:
    logit 0, never the argmax). Returns (model, tokenizer, prompt, index of EOS in the reference run)."""
    model, tok = om.load(checkpoints[0], dtype="float32", tokenizer=spm_model)
    prompt, plain, j = next((p, g, j) for p in PROMPTS for g in [reference_greedy(lm[0], tok.encode(p), 12)]
                            for j in range(3, 12) if g[j] not in g[:j])
    weight = model.lm_head.weight
    model.lm_head.weight = mx.concatenate([weight[:EOS], 1.001 * weight[plain[j]][None], weight[EOS + 1:]])
    ref = reference_greedy(model, tok.encode(prompt), 12)
    assert EOS in ref and ref.index(EOS) >= 2, ref  # precondition: EOS first appears mid-generation
    e = ref.index(EOS)
    assert ref[:e] == plain[:e]
    return model, tok, prompt, e


def test_eos_stops_generation(eos_lm):
    model, tok, prompt, e = eos_lm
    result = greedy(model, tok, prompt, max_tokens=30)
    assert result.finish_reason == "stop"
    assert result.tokens[-1] == EOS and len(result.tokens) == e + 1
    assert result.text == tok.decode(result.tokens[:-1])
    responses = stream_list(model, tok, prompt, max_tokens=30)
    assert responses[-1].token == EOS and responses[-1].finish_reason == "stop"
    assert len(responses) == e + 1


def test_eos_flushes_a_held_partial_stop(eos_lm):
    model, tok, prompt, e = eos_lm
    full = greedy(model, tok, prompt, max_tokens=30).text
    result = greedy(model, tok, prompt, max_tokens=30, stop=[full[-1] + "\u2603"])
    assert (result.text, result.finish_reason) == (full, "stop")


# ---------------------------------------------------------------------------- context limit


def test_prompt_longer_than_context_is_refused(small_lm):
    model, tok = small_lm
    ids = [1] + [5 + i % 50 for i in range(SMALL_CONTEXT + 5)]
    with pytest.raises(ContextLengthError, match=rf"{len(ids)} tokens.*context is {SMALL_CONTEXT} tokens"):
        greedy(model, tok, ids)
    with pytest.raises(ContextLengthError):
        om.batch_generate(model, tok, [ids, ids[:5]])
    # also with the sliding window: the prompt itself must fit
    with pytest.raises(ContextLengthError):
        greedy(model, tok, ids, sliding_window=True, prefill_step=8)


def test_generation_stops_at_the_context(small_lm):
    model, tok = small_lm
    ids = tok.encode(PROMPTS[-1])[:20]
    result = greedy(model, tok, ids, max_tokens=100)
    assert result.finish_reason == "length"
    assert len(ids) + len(result.tokens) == SMALL_CONTEXT
    full = greedy(model, tok, ids[:SMALL_CONTEXT], max_tokens=100)
    assert full.tokens == result.tokens
    exact = greedy(model, tok, tok.encode(PROMPTS[-1])[:SMALL_CONTEXT], max_tokens=5)
    assert (exact.tokens, exact.finish_reason) == ([], "length")


def test_cached_tokens_count_against_the_context(small_lm):
    model, tok = small_lm
    cache = om.make_cache(len(model.layers))
    om.generate(model, tok, tok.encode(PROMPTS[-1])[:20], GenerationOptions(max_tokens=3), cache=cache)
    with pytest.raises(ContextLengthError, match="cached"):
        om.generate(model, tok, [5] * 15, GenerationOptions(max_tokens=3), cache=cache)


def test_only_a_cache_overflow_suggests_the_sliding_window(small_lm):
    model, tok = small_lm
    too_long = [1] + [5 + i % 50 for i in range(SMALL_CONTEXT)]
    with pytest.raises(ContextLengthError) as alone:
        greedy(model, tok, too_long)
    assert "sliding window" not in str(alone.value)  # the prompt alone does not fit: the window cannot help
    cache = om.make_cache(len(model.layers))
    om.generate(model, tok, tok.encode(PROMPTS[-1])[:20], GenerationOptions(max_tokens=3), cache=cache)
    with pytest.raises(ContextLengthError, match="22 cached.*sliding window"):
        om.generate(model, tok, [5] * 15, GenerationOptions(max_tokens=3), cache=cache)


@pytest.mark.parametrize("prompt_len,max_tokens,full", [(20, 100, True), (20, 5, False), (20, 12, False),
                                                         (SMALL_CONTEXT, 5, True), (SMALL_CONTEXT, 0, False)])
def test_context_full_marks_a_stop_at_the_context(small_lm, prompt_len, max_tokens, full):
    """context_full says the context, not max_tokens, ended the generation (20 + 12 fills the context)."""
    model, tok = small_lm
    ids = (tok.encode(PROMPTS[-1]) * 3)[:prompt_len]
    responses = stream_list(model, tok, ids, max_tokens=max_tokens)
    assert responses[-1].finish_reason == "length" and responses[-1].context_full == full
    assert not any(r.context_full for r in responses[:-1])


def test_sliding_window_continues_past_the_context(small_lm):
    model, tok = small_lm
    ids = tok.encode(PROMPTS[-1])[:20]
    plain = greedy(model, tok, ids, max_tokens=100)
    sliding = greedy(model, tok, ids, max_tokens=40, sliding_window=True, prefill_step=8)
    assert sliding.finish_reason == "length" and len(sliding.tokens) == 40
    assert len(ids) + len(sliding.tokens) > SMALL_CONTEXT
    # Until the window is full nothing is dropped, so it agrees with the plain run.
    assert sliding.tokens[:len(plain.tokens)] == plain.tokens
    assert sliding.text == tok.decode(sliding.tokens)


def test_sliding_window_needs_a_small_prefill_step(small_lm):
    model, tok = small_lm
    with pytest.raises(ValueError, match="prefill_step") as info:
        greedy(model, tok, PROMPTS[0], sliding_window=True)  # default prefill_step 512 > 32
    assert isinstance(info.value, om.OpenELMError)  # a user error: the CLI prints it as one line
    assert greedy(model, tok, PROMPTS[0], sliding_window=True, prefill_step=SMALL_CONTEXT - 4).tokens


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("min_p", 1.0, "min_p"),
    ("min_p", -0.1, "min_p"),
    ("stop", [""], "stop"),
    ("stop", "", "stop"),
    ("max_tokens", -1, "max_tokens"),
    ("top_k", -1, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("repetition_penalty", -1.2, "repetition_penalty"),
    ("repetition_context_size", 0, "repetition_context_size"),
    ("prefill_step", 0, "prefill_step"),
    ("seed", -1, "seed"),
    ("seed", SEED_LIMIT, "seed"),
    ("seed", 1e20, "seed"),
    ("seed", True, "seed"),
])
def test_invalid_options_raise_value_error(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        GenerationOptions(**{field: value})
    assert "got" in str(info.value)  # the message names the rejected value
    assert isinstance(info.value, om.OpenELMError)


def test_options_defaults_and_normalisation():
    opts = GenerationOptions(stop="END")
    assert opts.stop == ("END",)
    assert GenerationOptions(stop=["a", "b"]).stop == ("a", "b")
    d = GenerationOptions()
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty) == (0.0, 0, 1.0, 0.0, 1.0)


# ---------------------------------------------------------------------------- streaming


def test_stream_responses(lm):
    model, tok = lm
    prompt = PROMPTS[1]
    responses = stream_list(model, tok, prompt, max_tokens=10)
    result = greedy(model, tok, prompt, max_tokens=10)
    assert "".join(r.text for r in responses) == result.text
    assert [r.token for r in responses] == result.tokens
    assert all(r.finish_reason is None for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens == len(tok.encode(prompt))
    assert last.generation_tokens == 10
    assert last.prompt_tps > 0 and last.ttft_s > 0 and last.generation_tps > 0
    assert last.peak_memory_bytes > 0
    assert [r.generation_tokens for r in responses] == list(range(1, 11))


# ---------------------------------------------------------------------------- batches


def test_batch_rows_equal_solo_runs(lm):
    model, tok = lm
    prompts = [PROMPTS[3], PROMPTS[1], "a", PROMPTS[0]]  # 1 to ~20 tokens: heavy left padding
    assert len({len(tok.encode(p)) for p in prompts}) == 4
    batch = om.batch_generate(model, tok, prompts, GenerationOptions(max_tokens=12))
    for prompt, row in zip(prompts, batch):
        solo = greedy(model, tok, prompt, max_tokens=12)
        assert row.tokens == solo.tokens, prompt
        assert row.text == solo.text and row.finish_reason == "length"
        assert row.stats.prompt_tokens == len(tok.encode(prompt))


def test_batch_with_stop_and_eos(eos_lm, lm):
    model, tok, prompt, e = eos_lm
    other = PROMPTS[2]
    solo_other = greedy(model, tok, other, max_tokens=12)
    batch = om.batch_generate(model, tok, [prompt, other], GenerationOptions(max_tokens=12))
    assert batch[0].tokens == greedy(model, tok, prompt, max_tokens=12).tokens
    assert batch[0].finish_reason == "stop" and batch[0].tokens[-1] == EOS
    assert batch[1].tokens == solo_other.tokens
    # a stop string in one row only
    stop = solo_other.text[5:7]
    rows = om.batch_generate(model, tok, [other, PROMPTS[3]], GenerationOptions(max_tokens=12, stop=[stop]))
    want = greedy(model, tok, other, max_tokens=12, stop=[stop])
    assert (rows[0].text, rows[0].finish_reason) == (want.text, "stop")
    want3 = greedy(model, tok, PROMPTS[3], max_tokens=12, stop=[stop])
    assert (rows[1].text, rows[1].finish_reason) == (want3.text, want3.finish_reason)


def test_batch_refuses_bad_input(lm):
    model, tok = lm
    with pytest.raises(ValueError):
        om.batch_generate(model, tok, [])
    with pytest.raises(ValueError):
        om.batch_generate(model, tok, [PROMPTS[0], []])


# ---------------------------------------------------------------------------- cache reuse


def test_cache_reuse_after_length_equals_from_scratch(lm):
    """After finish "length" the last generated token has not been fed (as in mlx-lm): the next
    call's prompt starts with it."""
    model, tok = lm
    first = tok.encode(PROMPTS[0])
    cache = om.make_cache(len(model.layers))
    part1 = om.generate(model, tok, first, GenerationOptions(max_tokens=6), cache=cache)
    assert part1.finish_reason == "length"
    assert cache[0].offset == len(first) + len(part1.tokens) - 1
    second = tok.encode(" Hello world", add_bos=False)
    part2 = om.generate(model, tok, [part1.tokens[-1]] + second, GenerationOptions(max_tokens=8), cache=cache)
    scratch = greedy(model, tok, first + part1.tokens + second, max_tokens=8)
    assert part2.tokens == scratch.tokens
    assert part2.stats.prompt_tokens == 1 + len(second)


@pytest.mark.parametrize("eos_is_last_allowed", [False, True], ids=["room-left", "eos-at-max-tokens"])
def test_cache_reuse_after_eos_equals_from_scratch(eos_lm, eos_is_last_allowed):
    """After EOS, as after "length", the cache holds all generated tokens but the last (here EOS):
    the follow-up prompt starts with it. Also when EOS is the max_tokens-th token (no step queued)."""
    model, tok, prompt, e = eos_lm
    first = tok.encode(prompt)
    cache = om.make_cache(len(model.layers))
    max_tokens = e + 1 if eos_is_last_allowed else 30
    turn = om.generate(model, tok, first, GenerationOptions(max_tokens=max_tokens), cache=cache)
    assert turn.finish_reason == "stop" and turn.tokens[-1] == EOS
    assert cache[0].offset == len(first) + len(turn.tokens) - 1
    follow = tok.encode("The quick", add_bos=False)
    again = om.generate(model, tok, [EOS] + follow, GenerationOptions(max_tokens=8), cache=cache)
    scratch = greedy(model, tok, first + turn.tokens + follow, max_tokens=8)
    assert again.tokens == scratch.tokens


# ---------------------------------------------------------------------------- cache contract
# However stream_generate ends, the cache then holds the prompt and every token the caller received but
# the last (with max_tokens 0: the prompt). EOS and "length" are checked by the cache reuse tests above.


def assert_cache_holds(model, cache, ids):
    """Every layer holds exactly `ids`: its keys and values equal those of a fresh prefill of them."""
    assert [(c.offset, c.size) for c in cache] == [(len(ids), len(ids))] * len(cache)
    if not ids:
        return
    fresh = om.make_cache(len(model.layers))
    model.hidden(mx.array([ids]), fresh)
    for held, want in zip(cache, fresh):
        for got, expected in zip(held.state, want.state):
            np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)


def assert_contract(model, tok, prompt, received, cache):
    """The cache holds `prompt` and `received` but its last token, and continuing from it with that last
    token and more text gives the tokens of a fresh run over the whole sequence."""
    assert_cache_holds(model, cache, prompt + received[:-1])
    follow = tok.encode(" Hello world", add_bos=False)
    again = om.generate(model, tok, received[-1:] + follow, GenerationOptions(max_tokens=6), cache=cache)
    assert again.tokens == greedy(model, tok, prompt + received + follow, max_tokens=6).tokens


def receive_then_end(model, tok, prompt, cache, k, ending):
    """Take k responses of a long generation, then close the iterator or drop it (garbage collected)."""
    stream = om.stream_generate(model, tok, prompt, GenerationOptions(max_tokens=50), cache=cache)
    received = [next(stream).token for _ in range(k)]
    if ending == "close":
        stream.close()
    else:
        del stream
        gc.collect()
    return received


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("ending", ["close", "drop"])
def test_cache_contract_when_the_caller_stops_early(lm, ending, k):
    model, tok = lm
    prompt = tok.encode(PROMPTS[1])
    cache = om.make_cache(len(model.layers))
    received = receive_then_end(model, tok, prompt, cache, k, ending)
    assert received == greedy(model, tok, prompt, max_tokens=k).tokens
    assert_contract(model, tok, prompt, received, cache)


def test_cache_contract_after_a_stop_string(lm):
    model, tok = lm
    prompt = tok.encode(PROMPTS[0])
    full = greedy(model, tok, prompt, max_tokens=20).text
    cache = om.make_cache(len(model.layers))
    result = om.generate(model, tok, prompt, GenerationOptions(max_tokens=20, stop=[full[8:11]]), cache=cache)
    assert result.finish_reason == "stop" and len(result.tokens) < 20  # a pipelined step was in flight
    assert_contract(model, tok, prompt, result.tokens, cache)


def test_cache_contract_when_the_context_is_full(small_lm):
    model, tok = small_lm
    prompt = tok.encode(PROMPTS[-1])[:20]
    cache = om.make_cache(len(model.layers))
    result = om.generate(model, tok, prompt, GenerationOptions(max_tokens=100), cache=cache)
    assert result.stats.context_full and len(result.tokens) == SMALL_CONTEXT - 20
    assert_cache_holds(model, cache, prompt + result.tokens[:-1])  # no room left to continue with more


@pytest.mark.parametrize("prefill_step", [512, 3])
def test_cache_contract_with_max_tokens_zero(lm, prefill_step):
    """max_tokens 0 prefills the prompt: the next call continues after it."""
    model, tok = lm
    prompt = tok.encode(PROMPTS[2])
    cache = om.make_cache(len(model.layers))
    result = om.generate(model, tok, prompt, GenerationOptions(max_tokens=0, prefill_step=prefill_step), cache=cache)
    assert (result.tokens, result.finish_reason) == ([], "length")
    assert_contract(model, tok, prompt, [], cache)


class FailingModel:
    """The model, failing in its `fail_at`-th forward pass after only its first layer took the new positions."""

    def __init__(self, model, fail_at):
        self.model, self.args, self.layers, self.fail_at, self.calls = model, model.args, model.layers, fail_at, 0

    def hidden(self, ids, cache=None, last=None):
        self.calls += 1
        if self.calls == self.fail_at:
            try:
                self.model.hidden(ids, cache[:1], last)  # layer 0 writes its cache, layer 1 finds none
            except IndexError:
                pass
            raise RuntimeError("simulated failure in a forward pass")
        return self.model.hidden(ids, cache, last)

    def logits(self, hidden):
        return self.model.logits(hidden)


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_cache_contract_after_a_failure(lm, fail_at):
    model, tok = lm
    prompt = tok.encode(PROMPTS[1])
    cache = om.make_cache(len(model.layers))
    received = []
    with pytest.raises(RuntimeError, match="simulated"):
        for response in om.stream_generate(FailingModel(model, fail_at), tok, prompt,
                                           GenerationOptions(max_tokens=50), cache=cache):
            received.append(response.token)
    # Pass 1 prefills the prompt; pass n + 1 feeds token n, before token n is handed out.
    assert len(received) == max(fail_at - 2, 0)
    # A failed prefill leaves the cache as it was (empty here).
    assert_contract(model, tok, prompt if fail_at > 1 else [], received, cache)


def test_prefill_evaluates_every_layers_keys_and_values(lm, monkeypatch):
    """Each prefill chunk ends with an evaluation of the whole cache state, so no lazy graph is carried over."""
    model, tok = lm
    cache = om.make_cache(len(model.layers))
    real_eval, checked = mx.eval, []

    def checking_eval(*arrays):
        real_eval(*arrays)
        evaluated = [np.array(a) for _, a in tree_flatten(list(arrays))]
        for layer_cache in cache:
            for held in layer_cache.state:
                checked.append(any(a.shape == held.shape and np.array_equal(a, np.array(held)) for a in evaluated))

    monkeypatch.setattr(mx, "eval", checking_eval)
    ids = tok.encode(PROMPTS[-1])
    om.generate(model, tok, ids, GenerationOptions(max_tokens=2, prefill_step=4), cache=cache)
    assert len(checked) == 2 * len(cache) * ((len(ids) - 1) // 4) and all(checked)


# ---------------------------------------------------------------------------- golden outputs


def golden_cases():
    readme = (DOCS_TARGET / "README.md").read_text()
    found = re.findall(r"### `(.*?)`\n.*?prompt ids \(with BOS\): `(\[.*?\])`.*?greedy ids: `(\[.*?\])`"
                       r".*?continuation text \(JSON string\): `(\".*?\")`\n", readme, re.S)
    return [(p, json.loads(a), json.loads(b), json.loads(t)) for p, a, b, t in found]


@pytest.fixture(scope="module")
def docs_target():
    if not (DOCS_TARGET / "model.safetensors").is_file() or not LLAMA2_TOKENIZER.is_file():
        pytest.skip("the docs-target model or the Llama-2 tokenizer is not present")
    return om.load(DOCS_TARGET, dtype="float32", tokenizer=LLAMA2_TOKENIZER)


def test_golden_readme_parsed():
    if not (DOCS_TARGET / "README.md").is_file():
        pytest.skip("docs-target README not present")
    cases = golden_cases()
    assert len(cases) == 5
    assert all(len(ids) == 32 for _, _, ids, _ in cases)


def test_golden_greedy_outputs(docs_target):
    """Apple's modeling code, float32, from the bf16 checkpoint: prompt ids and 32 greedy ids exact."""
    model, tok = docs_target
    cases = golden_cases()
    assert len(cases) == 5
    mismatches = []
    for prompt, prompt_ids, greedy_ids, text in cases:
        assert tok.encode(prompt) == prompt_ids, prompt
        result = greedy(model, tok, prompt, max_tokens=32)
        assert result.finish_reason == "length"
        if result.tokens != greedy_ids or result.text != text:
            mismatches.append((prompt, result.tokens, greedy_ids))
    assert not mismatches, mismatches


def test_golden_greedy_outputs_batched(docs_target):
    """The 5 prompts (4 to 8 tokens) as one left-padded batch give the same golden ids."""
    model, tok = docs_target
    cases = golden_cases()
    rows = om.batch_generate(model, tok, [c[0] for c in cases], GenerationOptions(max_tokens=32))
    assert [r.tokens for r in rows] == [c[2] for c in cases]
    assert [r.text for r in rows] == [c[3] for c in cases]
