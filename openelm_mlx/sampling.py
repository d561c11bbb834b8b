"""Samplers and logits processors: small pure functions, composed once per generation.

Filters apply in Hugging Face's order (temperature, top-k, top-p, min-p), each to the
distribution left by the previous one. Greedy is plain argmax: no softmax, no sort.

Nothing sorts the whole vocabulary unless top-p alone asks for it: top-k is an argpartition and
the later filters and the draw work on its k survivors only; min-p is a threshold. The sampler is
compiled with `mx.compile` (one graph per sampler, the random key or state an explicit input).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .constraints import ConstraintState, apply_masks
from .errors import InvalidOptionError

# logits [B, V] float32, PRNG key or None (global state) -> token ids [B]
Sampler = Callable[[mx.array, Optional[mx.array]], mx.array]
# token history [B, N], logits [B, V] -> logits [B, V]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
    """The most likely token of each row (ties: the lowest id)."""
    return mx.argmax(logits, axis=-1)


def _top_p(values: mx.array, top_p: float) -> mx.array:
    """Nucleus filter on scaled logits [B, C]: keep each token with less than `top_p` of the
    probability strictly above it (so the token that crosses `top_p` is kept); -inf elsewhere."""
    ascending = mx.sort(values, axis=-1)  # values only: cheaper than argsort, the mask needs no ids
    probs = mx.softmax(ascending, axis=-1)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    num_dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)  # [B, 1], the least likely ones
    threshold = mx.take_along_axis(ascending, num_dropped, axis=-1)
    return mx.where(values >= threshold, values, -mx.inf)


def _candidates(logits: mx.array, inv_temp: float, top_k: int, top_p: float,
                min_p: float) -> Tuple[mx.array, Optional[mx.array]]:
    """The filtered, temperature-scaled logits: values [B, C] (-inf where filtered out) and their
    token ids [B, C], or None when C is the whole vocabulary in order."""
    ids = None
    if 0 < top_k < logits.shape[-1]:
        # Temperature keeps the order, so the k largest raw logits are the top-k (ties at the k-th
        # place are broken arbitrarily: Hugging Face would keep them all).
        ids = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]  # [B, k], unordered
        logits = mx.take_along_axis(logits, ids, axis=-1)
    values = logits * inv_temp
    if top_p < 1.0:
        values = _top_p(values, top_p)
    if min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p): no softmax needed, and the ratio
        # is the same after top-p's renormalisation (top-p always keeps the most likely token).
        floor = values.max(axis=-1, keepdims=True) + math.log(min_p)
        values = mx.where(values >= floor, values, -mx.inf)
    return values, ids


def filter_logits(logits: mx.array, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> mx.array:
    """The logits [B, V] that `make_sampler` draws from: divided by `temperature`, -inf for every
    token top-k, top-p and min-p remove (0, 1 and 0 turn them off). Softmax gives the distribution."""
    if not temperature > 0:
        raise InvalidOptionError(f"temperature must be > 0 to filter (0 is greedy), got {temperature!r}")
    values, ids = _candidates(logits, 1.0 / temperature, top_k, top_p, min_p)
    if ids is None:
        return values
    return mx.put_along_axis(mx.full(logits.shape, -mx.inf, dtype=values.dtype), ids, values, axis=-1)


def make_sampler(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, *,
                 compiled: bool = True) -> Sampler:
    """A sampler for the given options; temperature 0 is greedy (the other options are then moot).

    The same key gives the same token; without a key the draw uses (and advances) MLX's global
    random state, like `mx.random.categorical`. `compiled=False` runs the same graph op by op (the
    draws are identical; bench/sampler.py measures what compiling gains).
    """
    if temperature == 0:
        return greedy
    inv_temp = 1.0 / temperature

    def draw(logits: mx.array, key: Optional[mx.array]) -> mx.array:
        values, ids = _candidates(logits, inv_temp, top_k, top_p, min_p)
        choice = mx.random.categorical(values, key=key)  # [B], an index into the candidates
        return choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

    if not compiled:
        return lambda logits, key=None: draw(logits, key)
    with_key = mx.compile(draw)
    # Without a key the global random state is read and advanced: compiled as an input and output.
    with_state = mx.compile(lambda logits: draw(logits, None), inputs=mx.random.state, outputs=mx.random.state)

    def sample(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
        return with_state(logits) if key is None else with_key(logits, key)

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


# OpenAI's bounds for presence_penalty / frequency_penalty and for logit_bias values.
MAX_TOKEN_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# The most top_logprobs a token may report (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20


def apply_token_penalties(logits: mx.array, counts: mx.array, presence: float, frequency: float) -> mx.array:
    """OpenAI's presence and frequency penalties: `counts` [B, V] says how often each token was
    generated so far; each logit loses frequency x its count, plus presence once it has appeared."""
    return logits - frequency * counts - presence * (counts > 0).astype(logits.dtype)


def logit_bias_vector(bias: Sequence[Tuple[int, float]], vocab_size: int) -> mx.array:
    """The dense [V] float32 vector that OpenAI's `logit_bias` ({token id: bias}) adds to every row."""
    dense = [0.0] * vocab_size
    for token, value in bias:
        if not 0 <= token < vocab_size:
            raise InvalidOptionError(f"logit_bias names token {token}, but the vocabulary has ids 0..{vocab_size - 1}")
        dense[token] = float(value)
    return mx.array(dense, dtype=mx.float32)


def token_logprobs(logits: mx.array, tokens: mx.array, top_n: int) -> Tuple[mx.array, mx.array, mx.array]:
    """Log-probabilities under log-softmax(`logits` [B, V]): of `tokens` [B], and the `top_n` likeliest
    ids [B, top_n] with theirs [B, top_n] (unordered; top_n 0 gives empty arrays)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
    if top_n <= 0:
        empty = mx.zeros((logits.shape[0], 0))
        return chosen, empty.astype(mx.int32), empty
    top_ids = mx.argpartition(-logprobs, kth=top_n - 1, axis=-1)[:, :top_n]
    return chosen, top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1)


def describe_logprobs(reported: Tuple[mx.array, mx.array, mx.array]) -> List[Tuple[float, List[Tuple[int, float]]]]:
    """`token_logprobs`' arrays as plain values, per row: (the token's logprob, [(id, logprob)] of the
    likeliest alternatives, most likely first)."""
    chosen, top_ids, top = (a.tolist() for a in reported)
    return [(c, sorted(zip(i, t), key=lambda pair: -pair[1])) for c, i, t in zip(chosen, top_ids, top)]


class SequenceSampler:
    """One sequence's next-token choice: the repetition penalty over its own window of ids, its own
    sampler, and its own random key stream.

    With a seed, the n-th draw uses the n-th split of `mx.random.key(seed)`, a key no other sequence
    touches: a seeded sequence draws the same numbers whatever batch it shares and however its prompt
    was prefilled (cached or not, in whatever chunks). Rows are sampled one by one, so a batch's rows
    may each have their own settings; the decode loop and the batching engine both use this class.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                 repetition_context_size: int, seed: Optional[int], seen: Optional[mx.array] = None, *,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Sequence[Tuple[int, float]] = (), logprobs: Optional[int] = None):
        """`seen` [B, N]: ids before the first sampled token (the penalty looks at their last ones).
        `presence_penalty`/`frequency_penalty` count the tokens this sampler chose; `logit_bias` is added
        last; with `logprobs`, `reported` holds the last draw's `token_logprobs` (after all of them)."""
        self._sampler = make_sampler(temperature, top_k, top_p, min_p)
        self._penalty = (make_repetition_penalty(repetition_penalty, repetition_context_size)
                         if repetition_penalty != 1.0 else None)
        self._window_size = repetition_context_size
        self._key = mx.random.key(seed) if seed is not None else None
        self._window = None  # [B, <= window size]: the ids the penalty looks at
        if self._penalty is not None and seen is not None:
            self._window = seen[:, max(0, seen.shape[1] - repetition_context_size):]
        self._presence, self._frequency = presence_penalty, frequency_penalty
        self._counts = None  # [B, V]: how often each token was chosen (presence / frequency penalties)
        self._bias_pairs, self._bias = tuple(logit_bias), None
        self._logprobs = logprobs
        self.reported: Optional[Tuple[mx.array, mx.array, mx.array]] = None

    def next_key(self) -> Optional[mx.array]:
        """The next key of this sequence's stream (None without a seed: MLX's global random state)."""
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def __call__(self, logits: mx.array,
                 constraints: Optional[Sequence[Optional[ConstraintState]]] = None) -> mx.array:
        """The next tokens [B] for float32 `logits` [B, V]; the penalty window then takes them in. With
        `constraints` (a state per row, None: free), each row draws only what its constraint allows,
        after the penalties and the bias."""
        if self._penalty is not None and self._window is not None:
            logits = self._penalty(self._window, logits)
        counting = bool(self._presence or self._frequency)
        if counting:
            if self._counts is None:
                self._counts = mx.zeros(logits.shape, dtype=mx.float32)
            logits = apply_token_penalties(logits, self._counts, self._presence, self._frequency)
        if self._bias_pairs:
            if self._bias is None:
                self._bias = logit_bias_vector(self._bias_pairs, logits.shape[-1])
            logits = logits + self._bias
        if constraints is not None:
            logits = apply_masks(logits, constraints)
        token = self._sampler(logits, self.next_key())
        if counting:
            self._counts = self._counts + (mx.arange(logits.shape[-1])[None, :] == token[:, None])
        if self._logprobs is not None:
            self.reported = token_logprobs(logits, token, self._logprobs)
        if self._penalty is not None:  # a fixed-size window: drop the oldest id once it is full
            if self._window is None:
                self._window = token[:, None]
            else:
                kept = self._window[:, max(0, self._window.shape[1] + 1 - self._window_size):]
                self._window = mx.concatenate([kept, token[:, None].astype(self._window.dtype)], axis=1)
        return token
