"""Speculative sampling leaves the target's distribution unchanged, under every sampler setting.

A tiny target and a different tiny draft with a 16-token vocabulary: the second and third generated
tokens come from one verify round (two drafts). Their joint distribution over thousands of seeded runs
is compared (chi-square, numpy only) with the target's own, computed exactly from full forwards without a cache,
the penalty in numpy. A planted bug (resampling from p instead of the residual max(0, p - q) after a
rejection) must fail the same test.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from helpers import random_state_dict, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions, generation
from openelm_mlx.drafting import DraftModel, PromptLookup, Speculation, accept_drafts
from openelm_mlx.loading import load_model
from openelm_mlx.sampling import filter_logits

VOCAB = 16
PROMPT = [1, 5, 9, 5]
DRAWS = 1500
NOISE = 0.2
SETTINGS = {
    "temperature": dict(temperature=1.0),
    "every filter and the penalty": dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-sampling")
    config = tiny_config(num_layers=2, model_dim=32, vocab_size=VOCAB)

    # std 0.5: peaked enough that the filters cut; the draft is the target plus noise (NOISE x its std), so
    # it agrees often but not always (acceptance 0.3-0.7).
    state = random_state_dict(config, seed=0, std=0.5)
    noise = random_state_dict(config, seed=1, std=0.5)
    draft_state = {k: v + NOISE * (noise[k] - (1.0 if v.ndim == 1 else 0.0)) for k, v in state.items()}
    return tuple(load_model(write_hf_checkpoint(root / name, config, weights), dtype="float32")
                 for name, weights in (("target", state), ("draft", draft_state)))


def exact_distribution(model, options: GenerationOptions) -> np.ndarray:
    """P(t1, t2, t3) [V, V, V] of plain sampling: every prefix scored by a full forward, the penalty in numpy."""

    def next_probs(rows):
        logits = np.array(model(mx.array(rows))[:, -1].astype(mx.float32))
        for row, values in zip(rows, logits):
            for t in set(row[-options.repetition_context_size:]):
                values[t] = values[t] / options.repetition_penalty if values[t] > 0 else values[t] * options.repetition_penalty
        filtered = filter_logits(mx.array(logits), options.temperature, options.top_k, options.top_p, options.min_p)
        return np.array(mx.softmax(filtered, axis=-1))

    first = next_probs([PROMPT])[0]
    second = next_probs([PROMPT + [a] for a in range(VOCAB)])  # [V, V]
    third = next_probs([PROMPT + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)])
    return first[:, None, None] * second[:, :, None] * third.reshape(VOCAB, VOCAB, VOCAB)


def sampled_counts(target, drafter, options: GenerationOptions) -> np.ndarray:
    """Counts [V, V] of (t2, t3) over DRAWS seeded runs of the speculative loop (k = 2: one round)."""
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(DRAWS):
        speculation = Speculation(drafter, num_draft_tokens=2)
        cache = om.make_cache(len(target.layers))
        steps = generation.decode_tokens(target, mx.array([PROMPT]), cache, replace(options, seed=seed), 3,
                                         speculation=speculation)
        _, (second,), (third,) = list(steps)
        counts[second, third] += 1
    return counts


def chi_square_z(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square of `counts` against the distribution `expected` (cells with fewer than 5
    expected draws pooled into one), as a standard normal z by Wilson-Hilferty: z > 3.3 is p < 5e-4."""
    expected = expected.ravel() * counts.sum()
    counts = counts.ravel()
    rare = expected < 5
    observed = np.append(counts[~rare], counts[rare].sum())
    wanted = np.append(expected[~rare], expected[rare].sum())
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    df = len(observed) - 1
    return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / np.sqrt(2 / (9 * df))


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_speculative_sampling_keeps_the_target_distribution(pair, setting):
    target, draft = pair
    options = GenerationOptions(**SETTINGS[setting])
    expected = exact_distribution(target, options).sum(axis=0)  # (t2, t3)
    drafter = DraftModel(draft)
    counts = sampled_counts(target, drafter, options)
    assert chi_square_z(counts, expected) < 3.3
    # The draft must differ from the target enough for rejections to matter.
    assert 0.1 < sampled_acceptance(target, draft, options) < 0.9


def sampled_acceptance(target, draft, options):
    speculation = Speculation(DraftModel(draft), num_draft_tokens=2)
    for seed in range(50):
        list(generation.decode_tokens(target, mx.array([PROMPT]), om.make_cache(len(target.layers)),
                                      replace(options, seed=seed), 3,
                                      speculation=speculation))
    return speculation.acceptance_rate


def resample_from_p(p, q, drafts, key):
    """A planted bug: after a rejection, draw from p instead of the residual max(0, p - q)."""
    n, token = accept_drafts(p, q, drafts, key)
    if n < len(drafts):  # rejected: replace the residual draw by a draw from p itself
        token = mx.random.categorical(mx.log(p[n]), key=None if key is None else mx.random.split(key)[0]).item()
    return n, token


@pytest.mark.slow
def test_the_test_catches_a_wrong_residual(pair, monkeypatch):
    target, draft = pair
    options = GenerationOptions(**SETTINGS["temperature"])
    expected = exact_distribution(target, options).sum(axis=0)
    monkeypatch.setattr(generation, "accept_drafts", resample_from_p)
    assert chi_square_z(sampled_counts(target, DraftModel(draft), options), expected) > 4  # p < 3e-5


@pytest.mark.slow
def test_prompt_lookup_sampling_matches_the_target(pair):
    """q is one-hot for prompt lookup: accept with probability p(d), else draw from p without d."""
    target, _ = pair
    options = GenerationOptions(temperature=1.0)
    expected = exact_distribution(target, options).sum(axis=0)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(DRAWS // 2):
        steps = generation.decode_tokens(target, mx.array([PROMPT]), om.make_cache(len(target.layers)),
                                         GenerationOptions(temperature=1.0, seed=seed), 3,
                                         speculation=Speculation(PromptLookup(), 2))
        _, (second,), (third,) = list(steps)
        counts[second, third] += 1
    assert chi_square_z(counts, expected) < 3.3
