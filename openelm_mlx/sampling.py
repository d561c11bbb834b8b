"""Samplers and logits processors: small pure functions, composed once per generation.

Filters apply in Hugging Face's order (temperature, top-k, top-p, min-p), each to the
distribution left by the previous one. Greedy is plain argmax: no softmax, no sort.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

# logits [B, V] float32, PRNG key or None (global state) -> token ids [B]
Sampler = Callable[[mx.array, Optional[mx.array]], mx.array]
# token history [B, N], logits [B, V] -> logits [B, V]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


def make_sampler(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """A sampler for the given options; temperature 0 is greedy (the other options are then moot)."""
    if temperature == 0:
        return greedy
    inv_temp = 1.0 / temperature
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return lambda logits, key=None: mx.random.categorical(logits * inv_temp, key=key)

    def sample(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
        order = mx.argsort(-logits, axis=-1)  # [B, V], most likely first
        ranked = mx.take_along_axis(logits, order, axis=-1) * inv_temp
        neg_inf = mx.array(-float("inf"), ranked.dtype)
        if top_k > 0:
            ranked = mx.where(mx.arange(ranked.shape[-1]) < top_k, ranked, neg_inf)
        if top_p < 1.0:
            probs = mx.softmax(ranked, axis=-1)
            mass_before = mx.cumsum(probs, axis=-1) - probs  # keeps the token that crosses top_p
            ranked = mx.where(mass_before < top_p, ranked, neg_inf)
        if min_p > 0.0:
            probs = mx.softmax(ranked, axis=-1)
            ranked = mx.where(probs >= min_p * probs[:, :1], ranked, neg_inf)
        choice = mx.random.categorical(ranked, key=key)  # index into the ranking
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    return sample


def make_repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    """CTRL's penalty (sign-aware: positive logits divided, negative multiplied) on the last tokens."""

    def apply(history: mx.array, logits: mx.array) -> mx.array:
        recent = history[:, -context_size:]
        if recent.shape[1] == 0:
            return logits
        chosen = mx.take_along_axis(logits, recent, axis=-1)
        chosen = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
        return mx.put_along_axis(logits, recent, chosen, axis=-1)

    return apply
