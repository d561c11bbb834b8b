"""Speculative decoding, greedy: token for token the output of plain greedy decoding (float32), with a
draft model that agrees only partly (rejections and rollbacks), a draft equal to the target (accepts
everything) and prompt lookup; over several prompts and draft lengths, with max_tokens landing in the
middle of a round, EOS inside an accepted run, stop strings, the cache contract on every exit and the
combinations that are refused."""

from __future__ import annotations

import mlx.core as mx
import pytest

from helpers import noisy_copy, random_state_dict, text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.drafting import (ADAPTIVE, ADAPTIVE_MAX_DRAFT_TOKENS, ADAPTIVE_START_DRAFT_TOKENS,
                                  AdaptiveDraftLength, DraftModel, PromptLookup, Speculation)
from openelm_mlx.errors import InvalidOptionError
from openelm_mlx.streaming import decode_tokens

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox jumps over the quick brown fox",
           "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"]
EOS = 2
SMALL_CONTEXT = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory, spm_model):
    """Target, a draft that is the target plus noise (it agrees often, not always), a draft of another
    shape, and the target with a 64-token context."""
    root = tmp_path_factory.mktemp("spec")
    config = tiny_config(tied=False)
    state = text_only_state(config, spm_model)
    noisy = noisy_copy(state)
    small_config = tiny_config(num_layers=2, model_dim=32, tied=False)

    def load(name, cfg, weights):
        return om.load(write_hf_checkpoint(root / name, cfg, weights), dtype="float32", tokenizer=spm_model)

    target, tok = load("target", config, state)
    return {
        "tok": tok, "target": target,
        "noisy": load("noisy", config, noisy)[0],
        "small": load("small", small_config, text_only_state(small_config, spm_model, seed=3))[0],
        "short": load("short", tiny_config(tied=False, max_context_length=SMALL_CONTEXT), state)[0],
    }


def plain(models, prompt, **kw):
    return om.generate(models["target"], models["tok"], prompt, GenerationOptions(**kw))


def speculative(models, prompt, draft, **kw):
    return om.generate(models["target"], models["tok"], prompt, GenerationOptions(**kw), draft=draft)


def drafter(models, name):
    return PromptLookup() if name == "lookup" else models[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["noisy", "target", "small", "lookup"])
@pytest.mark.parametrize("k", [1, 3, 7, ADAPTIVE])
def test_greedy_equals_plain_greedy(models, name, k):
    drafted = accepted = 0
    for prompt in PROMPTS:
        for penalty in (1.0, 1.3):
            # 23 tokens: the first, then rounds of up to k + 1, so the last round is cut short for most k.
            kw = dict(max_tokens=23, repetition_penalty=penalty, num_draft_tokens=k)
            want, got = plain(models, prompt, **kw), speculative(models, prompt, drafter(models, name), **kw)
            assert got.tokens == want.tokens and got.text == want.text
            assert got.finish_reason == "length" and got.stats.generation_tokens == 23
            drafted, accepted = drafted + got.stats.drafted_tokens, accepted + got.stats.accepted_tokens
    if name == "target":
        assert accepted == drafted > 0
    elif name in ("noisy", "lookup"):  # both accepting and rejecting happened
        assert 0 < accepted < drafted


def test_from_draft_marks_the_accepted_drafts(models):
    responses = list(om.stream_generate(models["target"], models["tok"], PROMPTS[0],
                                        GenerationOptions(max_tokens=20, num_draft_tokens=4), draft=models["noisy"]))
    last = responses[-1]
    assert sum(r.from_draft for r in responses) == last.accepted_tokens > 0
    assert not responses[0].from_draft  # the first token comes from the prefill
    # Each verify pass yields its accepted drafts and then one token of the target's own.
    assert len(responses) == 1 + last.verify_passes + last.accepted_tokens
    assert last.acceptance_rate == last.accepted_tokens / last.drafted_tokens


def eos_target(models, spm_model, tmp_path):
    """The target with EOS's head row copied from the token greedy emits 6th, plus a little: EOS is then
    the argmax wherever that token was, so generation stops inside a run."""
    prompt_ids = models["tok"].encode(PROMPTS[0])
    sixth = plain(models, prompt_ids, max_tokens=6).tokens[-1]
    config = tiny_config(tied=False)
    state = text_only_state(config, spm_model)
    state["lm_head.weight"][EOS] = state["lm_head.weight"][sixth] * 1.01
    return om.load(write_hf_checkpoint(tmp_path / "eos", config, state), dtype="float32", tokenizer=spm_model)[0]


def test_eos_inside_an_accepted_run_stops_exactly_there(models, spm_model, tmp_path):
    target = eos_target(models, spm_model, tmp_path)
    tok = models["tok"]
    want = om.generate(target, tok, PROMPTS[0], GenerationOptions(max_tokens=30))
    assert want.finish_reason == "stop" and want.tokens[-1] == EOS and len(want.tokens) <= 8
    cache = om.make_cache(len(target.layers))
    got = om.generate(target, tok, PROMPTS[0], GenerationOptions(max_tokens=30, num_draft_tokens=8), cache=cache,
                      draft=target)
    assert got.tokens == want.tokens and got.finish_reason == "stop"
    assert got.stats.drafted_tokens == 8  # one round drafted past the EOS
    assert cache[0].offset == len(tok.encode(PROMPTS[0])) + len(got.tokens) - 1


def test_a_stop_string_inside_a_run_ends_the_text_there(models):
    base = plain(models, PROMPTS[1], max_tokens=16)
    stop = base.text[len(base.text) // 2:][:3]
    want = plain(models, PROMPTS[1], max_tokens=16, stop=(stop,))
    got = speculative(models, PROMPTS[1], models["target"], max_tokens=16, stop=(stop,), num_draft_tokens=8)
    assert got.text == want.text and stop not in got.text and got.finish_reason == "stop"


@pytest.mark.parametrize("name", ["noisy", "lookup"])
@pytest.mark.parametrize("stop_after", [1, 2, 5, 9])
def test_the_cache_holds_the_sequence_when_the_caller_stops(models, name, stop_after):
    """Closing the stream at any token (inside a round or at its end) leaves the prompt and every
    generated token but the last in the cache; a follow-up continues exactly like a fresh run."""
    target, tok = models["target"], models["tok"]
    ids = tok.encode(PROMPTS[2])
    cache = om.make_cache(len(target.layers))
    stream = om.stream_generate(target, tok, ids, GenerationOptions(max_tokens=20, num_draft_tokens=4), cache=cache,
                                draft=drafter(models, name))
    got = [next(stream).token for _ in range(stop_after)]
    stream.close()
    assert cache[0].offset == len(ids) + stop_after - 1
    follow = got[-1:] + tok.encode(" world", add_bos=False)
    context = ids + got[:-1]
    again = om.generate(target, tok, follow, GenerationOptions(max_tokens=8), cache=cache, context_ids=context,
                        draft=drafter(models, name))
    assert again.tokens == plain(models, context + follow, max_tokens=8).tokens


def test_a_draft_model_keeps_its_cache_across_calls(models):
    """A DraftModel reused for a longer prompt only catches up on the new ids (what chat turns do)."""
    draft = DraftModel(models["noisy"])
    first = speculative(models, PROMPTS[0], draft, max_tokens=10)
    held = len(draft.tokens)
    ids = models["tok"].encode(PROMPTS[0]) + first.tokens + [5, 6]
    assert speculative(models, ids, draft, max_tokens=10).tokens == plain(models, ids, max_tokens=10).tokens
    assert held > len(models["tok"].encode(PROMPTS[0])) and draft.cache[0].offset == len(draft.tokens)


def test_a_full_context_ends_speculation_without_overrunning(models):
    short, tok = models["short"], models["tok"]
    want = om.generate(short, tok, PROMPTS[2], GenerationOptions(max_tokens=100))
    got = om.generate(short, tok, PROMPTS[2], GenerationOptions(max_tokens=100, num_draft_tokens=7), draft=short)
    assert got.tokens == want.tokens and got.stats.context_full and got.finish_reason == "length"


def test_a_draft_with_another_vocabulary_is_refused(models, tmp_path, spm_model):
    config = tiny_config(vocab_size=400)
    other = om.load(write_hf_checkpoint(tmp_path / "v400", config, random_state_dict(config)), dtype="float32",
                    tokenizer=spm_model)[0]
    with pytest.raises(InvalidOptionError, match="vocabulary has 400 tokens but the target's has 320"):
        speculative(models, PROMPTS[0], other, max_tokens=4)


@pytest.mark.parametrize("name", ["noisy", "lookup"])
def test_speculation_with_the_sliding_window_is_refused(models, name):
    """A verify pass would fill the window at another moment than plain steps, dropping other positions."""
    with pytest.raises(InvalidOptionError, match="cannot be combined with the sliding window"):
        speculative(models, PROMPTS[0], drafter(models, name), max_tokens=4, sliding_window=True)


def test_a_batch_cannot_speculate(models):
    target = models["target"]
    ids = mx.array([[1, 5, 6], [1, 7, 8]])
    with pytest.raises(InvalidOptionError, match="one sequence at a time"):
        next(decode_tokens(target, ids, om.make_cache(len(target.layers)), GenerationOptions(), 4,
                           speculation=Speculation(PromptLookup(), 4)))


def test_bare_tokens_refuse_what_needs_the_tokenizer(models):
    """decode_tokens has no tokenizer: stop strings and constraints are refused, not ignored."""
    target = models["target"]
    for options in (GenerationOptions(stop=("x",)), GenerationOptions(constraint=om.Constraint.choice(["a", "b"]))):
        with pytest.raises(InvalidOptionError, match="tokenizer"):
            next(decode_tokens(target, [1, 5, 6], om.make_cache(len(target.layers)), options, 4))


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "fast", "8"])
def test_num_draft_tokens_is_validated(value):
    with pytest.raises(InvalidOptionError, match="num_draft_tokens"):
        GenerationOptions(num_draft_tokens=value)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup, scoring = PromptLookup(max_ngram=2), GenerationOptions().scoring()
    # "7 8" occurs twice before the end; the latest occurrence is followed by 10 11.
    assert lookup.propose([7, 8, 9, 7, 8, 10, 11, 12, 7, 8], 3, scoring, None) == ([10, 11, 12], None)
    assert lookup.propose([7, 8, 9, 5, 8], 2, scoring, None) == ([9, 5], None)  # falls back to the 1-gram "8"
    assert lookup.propose([1, 2, 3], 4, scoring, None) == ([], None)
    with pytest.raises(InvalidOptionError, match="n-gram"):
        PromptLookup(max_ngram=0)


class RecordingDrafter:
    """A drafter that remembers how many tokens each round asked it for and, with a `speculation` to
    watch, the drafted / accepted totals when it was asked (their steps give each round's outcome)."""

    def __init__(self, inner):
        self.inner, self.asked, self.totals, self.speculation = inner, [], [], None

    def propose(self, ids, k, scoring, key):
        self.asked.append(k)
        if self.speculation is not None:
            self.totals.append((self.speculation.drafted, self.speculation.accepted))
        return self.inner.propose(ids, k, scoring, key)


def test_adaptive_draft_length_grows_after_full_acceptance_and_shrinks_after_a_rejection():
    policy = AdaptiveDraftLength(start=2, most=4)
    rounds = [(2, 2), (3, 3), (4, 4), (4, 4), (4, 1), (3, 0), (2, 1), (1, 0), (0, 0), (1, 1)]
    seen = []
    for drafted, accepted in rounds:
        policy.update(drafted, accepted)
        seen.append(policy.current)
    # Capped at 4, floored at 1; a round with nothing drafted (no lookup match) changes nothing.
    assert seen == [3, 4, 4, 4, 3, 2, 1, 1, 1, 2]


def test_adaptive_draft_length_climbs_to_its_cap_when_every_draft_is_accepted(models):
    """The target as its own draft accepts everything: K goes 2, 3, ... up to the cap, then stays,
    except where max_tokens cuts the last round short; the output is plain greedy decoding's."""
    recorder = RecordingDrafter(DraftModel(models["target"]))
    got = speculative(models, PROMPTS[0], recorder, max_tokens=60, num_draft_tokens=ADAPTIVE)
    assert got.tokens == plain(models, PROMPTS[0], max_tokens=60).tokens
    climb = list(range(ADAPTIVE_START_DRAFT_TOKENS, ADAPTIVE_MAX_DRAFT_TOKENS + 1))
    assert recorder.asked[:len(climb)] == climb
    assert set(recorder.asked[len(climb):-1]) == {ADAPTIVE_MAX_DRAFT_TOKENS}
    assert got.stats.accepted_tokens == got.stats.drafted_tokens == sum(recorder.asked)


@pytest.mark.parametrize("name", ["noisy", "lookup"])
def test_adaptive_draft_length_changes_mid_generation_and_keeps_greedy_output(models, name):
    """A draft that is sometimes rejected: K goes both up and down within one generation (the policy
    rule checked round by round), and the tokens stay plain greedy decoding's."""
    for prompt in PROMPTS:
        inner = drafter(models, name)
        recorder = RecordingDrafter(DraftModel(inner) if name == "noisy" else inner)
        recorder.speculation = speculation = Speculation(recorder, ADAPTIVE)
        ids = models["tok"].encode(prompt)
        steps = decode_tokens(models["target"], mx.array([ids]), om.make_cache(len(models["target"].layers)),
                              GenerationOptions(max_tokens=40), 40, speculation=speculation)
        assert list(steps) == plain(models, ids, max_tokens=40).tokens
        asked, totals = recorder.asked, recorder.totals
        want = ADAPTIVE_START_DRAFT_TOKENS  # the rule, replayed independently of AdaptiveDraftLength
        for r in range(len(asked)):
            remaining = 40 - (1 + totals[r][1] + r)  # the first token, then accepted drafts + 1 per round
            assert asked[r] == min(want, remaining - 1), (r, asked, totals)
            if r + 1 < len(asked):
                drafted, accepted = (totals[r + 1][0] - totals[r][0], totals[r + 1][1] - totals[r][1])
                if drafted:
                    want = min(want + 1, ADAPTIVE_MAX_DRAFT_TOKENS) if accepted == drafted else max(want - 1, 1)
        if name == "noisy":
            assert len(set(asked)) >= 2, asked
