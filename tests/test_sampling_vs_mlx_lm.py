"""Our samplers and repetition penalty agree with mlx-lm's where the two define the same thing.

The runtime keeps its own copies because importing mlx_lm pulls in transformers (and torch).
"""

import mlx.core as mx
import numpy as np
import pytest

from openelm_mlx.sampling import make_repetition_penalty, make_sampler

sample_utils = pytest.importorskip("mlx_lm.sample_utils")


@pytest.mark.parametrize("penalty,context", [(1.2, 20), (2.0, 3), (0.8, 8)])
def test_repetition_penalty_equals_mlx_lm(penalty, context):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((1, 50)).astype(np.float32) * 3)
    history = rng.integers(0, 50, size=30)
    ours = make_repetition_penalty(penalty, context)(mx.array(history[None]), logits)
    theirs = sample_utils.make_repetition_penalty(penalty, context)(mx.array(history), mx.array(logits))
    np.testing.assert_array_equal(np.array(ours), np.array(theirs))


def test_greedy_equals_mlx_lm():
    logits = mx.array(np.random.default_rng(1).standard_normal((4, 100)).astype(np.float32))
    np.testing.assert_array_equal(np.array(make_sampler(0.0)(logits)), np.array(sample_utils.make_sampler(0.0)(logits)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_plain_temperature_sampling_draws_the_same_tokens_as_mlx_lm(temperature):
    """Same global seed, same draws: plain temperature sampling is the same categorical draw."""
    logits = mx.array(np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32) * 2)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # mlx-lm samples from logprobs
    ours, theirs = make_sampler(temperature), sample_utils.make_sampler(temperature)
    mx.random.seed(123)
    a = [ours(logits).item() for _ in range(40)]
    mx.random.seed(123)
    b = [theirs(logprobs).item() for _ in range(40)]
    assert a == b
    assert len(set(a)) > 3  # really sampling
