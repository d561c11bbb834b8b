"""The samplers against a NumPy reference written from the definitions (Hugging Face's order:
temperature, top-k, top-p, min-p, each on the distribution the previous one left).

Exact checks compare the kept set and probabilities of `filter_logits`; statistical checks draw a
few thousand tokens from `make_sampler` (the compiled graph the decode loop runs) and compare the
counts with the reference distribution. Planted bugs show that both checks catch a wrong filter.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from openelm_mlx.errors import InvalidOptionError
from openelm_mlx import sampling
from openelm_mlx.sampling import filter_logits, greedy, make_sampler

# (temperature, top_k, top_p, min_p): each filter alone, pairs, all three, temperatures either side of 1.
CONFIGS = [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0),
    (1.0, 5, 1.0, 0.0), (1.0, 40, 1.0, 0.0), (1.0, 1, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0), (0.5, 0, 0.6, 0.0), (1.5, 0, 0.95, 0.0),
    (1.0, 0, 1.0, 0.05), (2.0, 0, 1.0, 0.3),
    (1.0, 40, 0.9, 0.0), (0.8, 10, 0.5, 0.0),
    (1.0, 0, 0.9, 0.1), (1.3, 40, 0.9, 0.05), (0.6, 25, 0.8, 0.2),
]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def reference_keep(row: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Which tokens of one row survive, straight from the definitions, in float64."""
    z = row.astype(np.float64) / temperature
    keep = np.ones(len(z), bool)
    if top_k > 0:
        keep[:] = False
        keep[np.argsort(-z, kind="stable")[:top_k]] = True
    if top_p < 1.0:
        p = softmax(np.where(keep, z, -np.inf))
        mass_before = 0.0
        for i in np.argsort(-p, kind="stable"):  # most likely first
            if mass_before >= top_p:  # this token and all after it have top_p above them
                keep[i] = False
            mass_before += p[i]
    if min_p > 0.0:
        p = softmax(np.where(keep, z, -np.inf))
        keep &= p >= min_p * p.max()
    return keep


def reference_probs(row, temperature, top_k, top_p, min_p) -> np.ndarray:
    keep = reference_keep(row, temperature, top_k, top_p, min_p)
    return softmax(np.where(keep, row.astype(np.float64) / temperature, -np.inf))


def boundary_gap(row, temperature, top_k, top_p, min_p) -> float:
    """How far the data are from a decision boundary (float32 rounding could flip a token there)."""
    z = np.sort(row.astype(np.float64) / temperature)[::-1]
    gaps = [z[top_k - 1] - z[top_k]] if 0 < top_k < len(z) else []  # no tie at the k-th place
    p = softmax(z[:top_k] if top_k else z)
    if top_p < 1.0:
        gaps.append(np.abs(np.cumsum(p) - top_p).min())
        p = p[:np.searchsorted(np.cumsum(p) - p, top_p)]  # the kept prefix (the rule in reference_keep)
        p = p / p.sum()
    if min_p > 0.0:
        gaps.append(np.abs(np.log(p / p.max() / min_p)).min())  # in logits, where float32 rounds
    return float(min(gaps, default=np.inf))


def random_logits(rows: int, vocab: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * 2.5).astype(np.float32)


def chi_square_rejects(counts: np.ndarray, probs: np.ndarray, *, alpha_z: float = 4.0) -> bool:
    """Whether draws `counts` are implausible under `probs`: a draw of a probability-0 token, or
    Pearson's chi-square beyond its (1 - ~3e-5) quantile (Wilson-Hilferty, z = alpha_z)."""
    n = counts.sum()
    if np.any(counts[probs == 0] > 0):
        return True
    kept = probs > 0
    df = int(kept.sum()) - 1
    if df == 0:
        return False
    expected = n * probs[kept]
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical


def draw_counts(sampler, row: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Token counts from `draws` independent draws: one batched call, a row per draw."""
    batch = mx.broadcast_to(mx.array(row)[None], (draws, len(row)))
    tokens = np.array(sampler(batch, mx.random.key(seed)))
    return np.bincount(tokens, minlength=len(row))


# ---------------------------------------------------------------------------------- exact


def filter_mismatches(temperature, top_k, top_p, min_p) -> int:
    """Rows of a random batch where `filter_logits` disagrees with the reference (kept set, kept
    values, probabilities)."""
    logits = random_logits(4, 300, seed=11)
    ours = np.array(filter_logits(mx.array(logits), temperature, top_k, top_p, min_p))
    wrong = 0
    for row, got in zip(logits, ours):
        assert boundary_gap(row, temperature, top_k, top_p, min_p) > 1e-5  # the data are unambiguous
        keep = reference_keep(row, temperature, top_k, top_p, min_p)
        wrong += not (np.array_equal(np.isfinite(got), keep) and np.all(got[~keep] == -np.inf)
                      and np.allclose(got[keep], row[keep] / np.float32(temperature), rtol=1e-6, atol=0)
                      and np.allclose(softmax(got.astype(np.float64)),
                                      reference_probs(row, temperature, top_k, top_p, min_p), rtol=1e-5, atol=1e-9))
    return wrong


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CONFIGS)
def test_filter_keeps_the_reference_set_and_probabilities(temperature, top_k, top_p, min_p):
    assert filter_mismatches(temperature, top_k, top_p, min_p) == 0
    row = random_logits(1, 300, seed=11)[0]
    kept = reference_keep(row, temperature, top_k, top_p, min_p).sum()
    assert kept < len(row) or (top_k, top_p, min_p) == (0, 1.0, 0.0)  # the filters did filter


def test_filters_apply_in_hugging_face_order():
    """Each filter sees the distribution the previous one left; mlx-lm's order (top-p, min-p, top-k)
    keeps different sets on these rows."""
    def kept(row, **options):
        return np.isfinite(np.array(filter_logits(mx.array(np.log(np.array([row], np.float32))), 1.0, **options)))[0].tolist()

    # top-k 2 leaves (0.556, 0.444): the first token alone reaches top-p 0.55. Top-p first would
    # keep two (0.5 < 0.55 of the whole row).
    assert kept([0.5, 0.4, 0.06, 0.04], top_k=2, top_p=0.55) == [True, False, False, False]
    # top-p 0.6 keeps 0.3, 0.25, 0.2, then min-p 0.5 keeps all three (0.2 >= 0.15). Min-p first would
    # leave four tokens whose renormalised mass crosses 0.6 at the second.
    assert kept([0.3, 0.25, 0.2, 0.15, 0.1], top_p=0.6, min_p=0.5) == [True, True, True, False, False]


def test_top_k_at_least_the_vocabulary_is_off():
    logits = mx.array(random_logits(2, 50, seed=3))
    for k in (50, 51, 10_000):
        np.testing.assert_array_equal(np.array(filter_logits(logits, 1.0, top_k=k)), np.array(logits))


def test_filter_needs_a_positive_temperature():
    with pytest.raises(InvalidOptionError, match="temperature"):
        filter_logits(mx.zeros((1, 4)), 0.0)


# ---------------------------------------------------------------------------------- statistical

# A small vocabulary with a clear shape, so a few thousand draws see every kept token many times.
SMALL_ROW = np.log(np.array([0.30, 0.22, 0.15, 0.11, 0.08, 0.05, 0.04, 0.02, 0.015, 0.01, 0.003, 0.002],
                            np.float32)) + 0.7
DRAWS = 4000


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (1.3, 8, 0.9, 0.0), (1.0, 6, 0.75, 0.3), (0.9, 0, 0.9, 0.05),
])
@pytest.mark.parametrize("compiled", [True, False])
def test_draws_follow_the_reference_distribution(temperature, top_k, top_p, min_p, compiled):
    sampler = make_sampler(temperature, top_k, top_p, min_p, compiled=compiled)
    counts = draw_counts(sampler, SMALL_ROW, DRAWS, seed=7)
    probs = reference_probs(SMALL_ROW, temperature, top_k, top_p, min_p)
    assert not chi_square_rejects(counts, probs), (counts, np.round(probs * DRAWS))
    assert (counts > 0).sum() == (probs > 0).sum()  # every kept token was drawn
    tv = 0.5 * np.abs(counts / DRAWS - probs).sum()
    assert tv < 0.05


def top_p_dropping_the_crossing_token(values: mx.array, top_p: float) -> mx.array:
    """A planted bug: top-p keeping only the tokens whose mass, their own included, stays below top_p."""
    ascending = mx.sort(values, axis=-1)
    mass_from = mx.cumsum(mx.softmax(ascending, axis=-1), axis=-1, reverse=True)
    num_dropped = mx.minimum((mass_from >= top_p).sum(axis=-1, keepdims=True), values.shape[-1] - 1)
    return mx.where(values >= mx.take_along_axis(ascending, num_dropped, axis=-1), values, -mx.inf)


def test_both_checks_catch_a_top_p_that_drops_the_crossing_token(monkeypatch):
    monkeypatch.setattr(sampling, "_top_p", top_p_dropping_the_crossing_token)
    assert filter_mismatches(1.0, 0, 0.9, 0.0) == 4
    assert filter_mismatches(1.0, 40, 0.9, 0.0) == 4
    top_p = 0.6  # cumulative 0.30, 0.52, 0.67: the third token (0.15 of the mass) crosses
    counts = draw_counts(make_sampler(1.0, top_p=top_p), SMALL_ROW, DRAWS, seed=7)
    assert counts[2] == 0 and chi_square_rejects(counts, reference_probs(SMALL_ROW, 1.0, 0, top_p, 0.0))


def test_chi_square_check_catches_a_crossing_token_at_half_weight():
    """The statistical check's power: a subtler bug (the crossing token drawn half as often) is
    rejected too, while draws from the right distribution with the same generator pass."""
    probs = reference_probs(SMALL_ROW, 1.0, 0, 0.6, 0.0)
    subtle = probs.copy()
    subtle[2] /= 2
    subtle /= subtle.sum()
    for dist, rejected in ((subtle, True), (probs, False)):
        draws = np.random.default_rng(0).choice(len(dist), size=DRAWS, p=dist)
        assert chi_square_rejects(np.bincount(draws, minlength=len(dist)), probs) == rejected


def test_rows_of_a_batch_are_filtered_and_drawn_separately():
    """Each row's draws stay in its own kept set (top-k indices are mapped back per row)."""
    logits = random_logits(6, 300, seed=5)
    sampler = make_sampler(1.0, 20, 0.9, 0.02)
    for seed in range(20):
        tokens = np.array(sampler(mx.array(logits), mx.random.key(seed)))
        for row, token in zip(logits, tokens):
            assert reference_keep(row, 1.0, 20, 0.9, 0.02)[token]


# ---------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (1.0, 40, 0.9, 0.05), (0.8, 0, 0.9, 0.0)])
def test_same_key_same_token(temperature, top_k, top_p, min_p):
    logits = mx.array(random_logits(2, 1000, seed=2))
    first, second = make_sampler(temperature, top_k, top_p, min_p), make_sampler(temperature, top_k, top_p, min_p)
    uncompiled = make_sampler(temperature, top_k, top_p, min_p, compiled=False)
    draws = [np.array(first(logits, mx.random.key(s))).tolist() for s in range(30)]
    assert draws == [np.array(second(logits, mx.random.key(s))).tolist() for s in range(30)]
    assert draws == [np.array(uncompiled(logits, mx.random.key(s))).tolist() for s in range(30)]
    assert len({tuple(d) for d in draws}) > 3  # the key matters


def test_global_seed_reproduces_draws():
    logits = mx.array(random_logits(1, 1000, seed=4))
    sampler = make_sampler(1.0, 40, 0.95)
    mx.random.seed(9)
    first = [sampler(logits).item() for _ in range(20)]
    mx.random.seed(9)
    assert [sampler(logits).item() for _ in range(20)] == first
    assert len(set(first)) > 3  # the global state advances between draws


def test_greedy_is_argmax():
    logits = mx.array(random_logits(3, 500, seed=8))
    assert make_sampler(0.0) is greedy
    np.testing.assert_array_equal(np.array(greedy(logits)), np.argmax(np.array(logits), axis=-1))
    top_1 = make_sampler(1.0, top_k=1)  # top-k 1 leaves one token whatever the key
    for seed in range(5):
        np.testing.assert_array_equal(np.array(top_1(logits, mx.random.key(seed))), np.argmax(np.array(logits), axis=-1))
