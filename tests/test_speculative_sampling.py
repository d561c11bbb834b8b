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
from openelm_mlx import GenerationOptions, engine, streaming
from openelm_mlx.drafting import ADAPTIVE, AdaptiveDraftLength, DraftModel, PromptLookup, Speculation, accept_drafts
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


def make_pair(root, vocab_size, std=0.5):
    """A tiny target and its draft over `vocab_size` tokens."""
    config = tiny_config(num_layers=2, model_dim=32, vocab_size=vocab_size)

    # std 0.5 with 16 tokens (0.2 with 8): peaked enough that the filters cut; the draft is the target plus
    # noise (NOISE x its std), so it agrees often but not always (acceptance 0.3-0.7).
    state = random_state_dict(config, seed=0, std=std)
    noise = random_state_dict(config, seed=1, std=std)
    draft_state = {k: v + NOISE * (noise[k] - (1.0 if v.ndim == 1 else 0.0)) for k, v in state.items()}
    return tuple(load_model(write_hf_checkpoint(root / name, config, weights), dtype="float32")
                 for name, weights in (("target", state), ("draft", draft_state)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("spec-sampling"), VOCAB)


def exact_distribution(model, options: GenerationOptions, length: int = 3, prompt=PROMPT) -> np.ndarray:
    """P(t1, ..., t_length) [V] * length of plain sampling after `prompt`: every prefix scored by a full
    forward, the penalty in numpy."""
    vocab = model.args.vocab_size

    def next_probs(rows):
        logits = np.array(model(mx.array(rows))[:, -1].astype(mx.float32))
        seen = np.zeros(logits.shape, dtype=bool)  # [N, V]: the ids in each row's penalty window
        seen[np.arange(len(rows))[:, None], np.array(rows)[:, -options.repetition_context_size:]] = True
        penalised = np.where(logits > 0, logits / options.repetition_penalty, logits * options.repetition_penalty)
        logits = np.where(seen, penalised, logits)
        filtered = filter_logits(mx.array(logits), options.temperature, options.top_k, options.top_p, options.min_p)
        return np.array(mx.softmax(filtered, axis=-1))

    joint = np.ones(1)
    for n in range(length):  # the prefixes in itertools.product order are the rows of joint, flattened
        probs = next_probs([prompt + list(prefix) for prefix in itertools.product(range(vocab), repeat=n)])
        joint = (joint[:, None] * probs).reshape(-1)
    return joint.reshape((vocab,) * length)


def sampled_counts(target, drafter, options: GenerationOptions) -> np.ndarray:
    """Counts [V, V] of (t2, t3) over DRAWS seeded runs of the speculative loop (k = 2: one round)."""
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(DRAWS):
        speculation = Speculation(drafter, num_draft_tokens=2)
        cache = om.make_cache(len(target.layers))
        steps = streaming.decode_tokens(target, mx.array([PROMPT]), cache, replace(options, seed=seed), 3,
                                         speculation=speculation)
        _, second, third = list(steps)
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
        list(streaming.decode_tokens(target, mx.array([PROMPT]), om.make_cache(len(target.layers)),
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
    monkeypatch.setattr(engine, "accept_drafts", resample_from_p)
    assert chi_square_z(sampled_counts(target, DraftModel(draft), options), expected) > 4  # p < 3e-5


@pytest.mark.slow
def test_prompt_lookup_sampling_matches_the_target(pair):
    """q is one-hot for prompt lookup: accept with probability p(d), else draw from p without d."""
    target, _ = pair
    options = GenerationOptions(temperature=1.0)
    expected = exact_distribution(target, options).sum(axis=0)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(DRAWS // 2):
        steps = streaming.decode_tokens(target, mx.array([PROMPT]), om.make_cache(len(target.layers)),
                                         GenerationOptions(temperature=1.0, seed=seed), 3,
                                         speculation=Speculation(PromptLookup(), 2))
        _, second, third = list(steps)
        counts[second, third] += 1
    assert chi_square_z(counts, expected) < 3.3


class CountingDraft(DraftModel):
    """A draft model that records, for each round, how many tokens it was asked for and how many the
    speculation had accepted before."""

    def __init__(self, model):
        super().__init__(model)
        self.asked, self.accepted_before, self.speculation = [], [], None

    def propose(self, ids, k, scoring, key):
        self.asked.append(k)
        self.accepted_before.append(self.speculation.accepted)
        return super().propose(ids, k, scoring, key)


SMALL_VOCAB = 8  # 5 tokens: the exact distribution scores 8^4 prefixes
SMALL_PROMPT = [1, 5, 3, 5]
SMALL_DRAWS = 1000  # 64 cells


@pytest.mark.slow
def test_adaptive_draft_length_keeps_the_target_distribution(tmp_path):
    """K changes between rounds with the outcome of the previous one: 5 tokens, the first round drafts
    2; after a rejection of its first draft the next round drafts 1, where a fixed K would draft 2 (3
    tokens remain). The joint distribution of the last two tokens is still the target's."""
    target, draft = make_pair(tmp_path, SMALL_VOCAB, std=0.2)
    options = GenerationOptions(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.5)
    expected = exact_distribution(target, options, length=5, prompt=SMALL_PROMPT).sum(axis=(0, 1, 2))  # (t4, t5)
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    shrunk = 0
    for seed in range(SMALL_DRAWS):
        drafter = CountingDraft(draft)
        speculation = drafter.speculation = Speculation(drafter, ADAPTIVE)
        speculation.adaptive = AdaptiveDraftLength(start=2, most=2)
        steps = streaming.decode_tokens(target, mx.array([SMALL_PROMPT]), om.make_cache(len(target.layers)),
                                         replace(options, seed=seed), 5, speculation=speculation)
        *_, fourth, fifth = list(steps)
        counts[fourth, fifth] += 1
        # The first draft rejected (nothing accepted before round 2), then a round of 1.
        shrunk += drafter.asked[:2] == [2, 1] and drafter.accepted_before[1] == 0
    assert shrunk > SMALL_DRAWS // 20  # the adaptive length really changed K in many runs
    assert chi_square_z(counts, expected) < 3.3
