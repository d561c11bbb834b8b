"""OpenAI's presence / frequency penalties, logit_bias and logprobs in the decode loop, checked against a
direct recomputation: full forwards without a cache, the penalties written out in NumPy, log-softmax in
float64."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.drafting import PromptLookup
from openelm_mlx.errors import InvalidOptionError
from openelm_mlx.sampling import apply_token_penalties, token_logprobs

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, spm_model):
    config = tiny_config(tied=False)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("tokproc") / "tiny", config, text_only_state(config, spm_model))
    return om.load(path, dtype="float32", tokenizer=spm_model)


def reference_logits(model, ids, generated, *, repetition=1.0, context=20, presence=0.0, frequency=0.0, bias=None):
    """The logits the next token is drawn from, recomputed: a full forward, CTRL's penalty on the last
    `context` ids, OpenAI's penalties on the generated ids, then logit_bias."""
    sequence = list(ids) + list(generated)
    logits = np.array(model(mx.array([sequence]))[0, -1].astype(mx.float32), dtype=np.float64)
    if repetition != 1.0:
        for t in set(sequence[-context:]):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
    for t in set(generated):
        logits[t] -= frequency * generated.count(t) + presence
    for t, b in (bias or {}).items():
        logits[t] += b
    return logits


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def test_token_penalties_math():
    logits = mx.array([[1.0, 2.0, 3.0, 4.0]])
    counts = mx.array([[0.0, 1.0, 3.0, 0.0]])
    out = np.array(apply_token_penalties(logits, counts, presence=0.5, frequency=0.25))
    np.testing.assert_allclose(out, [[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]])


def test_token_logprobs_math():
    logits = mx.array([[0.0, 1.0, 2.0, -1.0]])
    chosen, top_ids, top = token_logprobs(logits, mx.array([1]), 2)
    want = log_softmax(np.array([0.0, 1.0, 2.0, -1.0]))
    assert chosen.item() == pytest.approx(want[1], abs=1e-6)
    assert sorted(top_ids[0].tolist()) == [1, 2]
    assert sorted(top[0].tolist()) == pytest.approx(sorted([want[1], want[2]]), abs=1e-6)


@pytest.mark.parametrize("settings", [
    dict(presence=1.5),
    dict(frequency=1.0),
    dict(presence=0.5, frequency=0.7, repetition=1.3),
    dict(bias={5: 3.0, 100: -100.0}),
])
def test_greedy_with_penalties_equals_the_direct_computation(lm, settings):
    model, tok = lm
    options = GenerationOptions(max_tokens=12, presence_penalty=settings.get("presence", 0.0),
                                frequency_penalty=settings.get("frequency", 0.0),
                                repetition_penalty=settings.get("repetition", 1.0),
                                logit_bias=settings.get("bias", {}))
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        generated = []
        for _ in range(12):
            generated.append(int(np.argmax(reference_logits(model, ids, generated, **settings))))
        assert om.generate(model, tok, prompt, options).tokens == generated


def test_penalties_change_the_output(lm):
    """Without this, equality with the reference could hold only because the penalties did nothing."""
    model, tok = lm
    changed = 0
    for prompt in PROMPTS:
        plain = om.generate(model, tok, prompt, GenerationOptions(max_tokens=20)).tokens
        penalised = om.generate(model, tok, prompt, GenerationOptions(max_tokens=20, frequency_penalty=2.0,
                                                                      presence_penalty=2.0)).tokens
        changed += plain != penalised
    assert changed >= 2


def test_logit_bias_bans_and_forces_tokens(lm):
    model, tok = lm
    plain = om.generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=10)).tokens
    banned = om.generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=10, logit_bias={plain[0]: -100})).tokens
    assert plain[0] not in banned
    forced = om.generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=5, logit_bias={100: 100},
                                                                    temperature=1.0, seed=3)).tokens
    assert forced == [100] * 5


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_log_softmax_of_the_penalised_logits(lm, temperature):
    """Each token's logprob and its top alternatives, greedy and sampled, with every processor on."""
    model, tok = lm
    settings = dict(repetition=1.2, presence=0.4, frequency=0.3, bias={7: 2.0})
    options = GenerationOptions(max_tokens=10, temperature=temperature, seed=11, logprobs=4,
                                repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3,
                                logit_bias={7: 2.0})
    ids = tok.encode(PROMPTS[2])
    responses = list(om.stream_generate(model, tok, ids, options))
    generated = []
    for response in responses:
        want = log_softmax(reference_logits(model, ids, generated, **settings))
        assert response.logprob == pytest.approx(want[response.token], abs=1e-4)
        assert [t for t, _ in response.top_logprobs] == list(np.argsort(-want)[:4])
        assert [lp for _, lp in response.top_logprobs] == pytest.approx(sorted(want, reverse=True)[:4], abs=1e-4)
        generated.append(response.token)
    if temperature == 0:
        assert all(r.top_logprobs[0][0] == r.token for r in responses)


def test_no_logprobs_unless_asked(lm):
    model, tok = lm
    response = list(om.stream_generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=2)))[-1]
    assert response.logprob is None and response.top_logprobs is None
    only_chosen = list(om.stream_generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=2, logprobs=0)))
    assert all(r.logprob is not None and r.top_logprobs == [] for r in only_chosen)


@pytest.mark.parametrize("options, says", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
])
def test_bad_options_are_refused(options, says):
    with pytest.raises(InvalidOptionError, match=says):
        GenerationOptions(**options)


def test_a_token_id_outside_the_vocabulary_is_refused(lm):
    model, tok = lm
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        om.generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=2, logit_bias={40000: 1}))


@pytest.mark.parametrize("options", [dict(logprobs=2), dict(presence_penalty=1.0), dict(logit_bias={3: 1})])
def test_speculative_decoding_refuses_what_it_cannot_do(lm, options):
    model, tok = lm
    with pytest.raises(InvalidOptionError, match="speculative decoding does not support"):
        om.generate(model, tok, PROMPTS[0], GenerationOptions(max_tokens=4, **options), draft=PromptLookup())


def test_batch_generate_refuses_logprobs_and_applies_penalties_per_row(lm):
    model, tok = lm
    with pytest.raises(InvalidOptionError, match="logprobs"):
        om.batch_generate(model, tok, PROMPTS, GenerationOptions(max_tokens=2, logprobs=1))
    options = GenerationOptions(max_tokens=8, frequency_penalty=1.5, presence_penalty=0.5)
    batch = om.batch_generate(model, tok, PROMPTS, options)
    assert [r.tokens for r in batch] == [om.generate(model, tok, p, options).tokens for p in PROMPTS]
