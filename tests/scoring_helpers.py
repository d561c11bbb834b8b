"""Shared by test_perplexity and test_eval: a direct log-likelihood to check scores against."""

from __future__ import annotations

import numpy as np

from openelm_mlx.scoring import log_probs


def direct_log_prob(model, context, continuation) -> float:
    """Summed log-probability of `continuation` after `context`: one plain full-sequence float32 forward."""
    ids = list(context) + list(continuation)
    lp = np.array(log_probs(model, ids[:-1]))
    return float(sum(lp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))

