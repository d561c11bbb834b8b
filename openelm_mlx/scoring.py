"""Log-likelihood scoring: the one place that turns a model's logits into token log-probabilities.

`score_continuations` scores continuations given contexts (what lm-evaluation-harness's
`loglikelihood` asks for, and what a perplexity window is), batched, with contexts shared by
several requests (a multiple-choice question's choices) run once through the KV cache.
`log_probs` / `log_softmax` / `target_log_probs` are the full-distribution pieces the converter's
quality report uses. Log-softmax always runs in float32, whatever the model's dtype. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import KVCache, make_cache
from .errors import ContextLengthError, InvalidOptionError
from .model import Model

# Positions whose logits are computed at once: bounds the [positions, vocab] float32 block
# (1024 x 32000 x 4 bytes = 131 MB for the Llama-2 vocabulary).
LOGIT_CHUNK = 1024
# Requests (rows) per forward pass, unless the caller says otherwise.
DEFAULT_BATCH_SIZE = 8

Request = Tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a continuation is after its context."""

    log_prob: float  # summed log-probability of the continuation's tokens, nats
    tokens: int  # how many tokens were scored
    greedy: bool  # every continuation token was the model's argmax

    @property
    def nll(self) -> float:
        """Summed negative log-likelihood, nats."""
        return -self.log_prob


def log_softmax(logits: mx.array) -> mx.array:
    """Logits -> log-probabilities, in float32."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def log_probs(model: Model, ids: Sequence[int]) -> mx.array:
    """Next-token log-probabilities [T, vocab] in float32 for one sequence (position t predicts ids[t + 1])."""
    return log_softmax(model(mx.array([list(ids)]))[0])


def target_log_probs(log_probs_: mx.array, targets: Sequence[int]) -> mx.array:
    """The log-probability [N] each row of `log_probs_` [N, vocab] gives its target token."""
    return mx.take_along_axis(log_probs_, mx.array(list(targets))[:, None], axis=-1)[:, 0]


@dataclass
class _Row:
    """One request as the batch sees it: `prefix` goes through the cache first (shared by a group),
    `tail` is run on top of it, and the tail's last len(targets) positions predict the continuation."""

    prefix: Tuple[int, ...]
    tail: List[int]
    targets: List[int]
    index: int  # position in the caller's list


def score_continuations(model: Model, requests: Sequence[Request], *, batch_size: int = DEFAULT_BATCH_SIZE,
                        share_prefixes: bool = True,
                        progress: Optional[Callable[[int], None]] = None) -> List[ContinuationScore]:
    """Score each (context, continuation) pair: the summed log-probability of the continuation's tokens.

    Contexts must be non-empty (begin them with BOS) and continuations non-empty; context plus
    continuation must fit the model's context. Up to `batch_size` requests share a forward pass.
    With `share_prefixes`, requests with the same context (two or more) run it once, its KV cache
    then copied to each continuation; results equal unshared scoring up to float rounding.
    `progress`, if given, is called with the number of requests scored by each forward pass.
    """
    if batch_size < 1:
        raise InvalidOptionError(f"batch_size must be at least 1, got {batch_size}")
    limit = model.args.max_context_length
    for context, continuation in requests:
        if not context or not continuation:
            raise InvalidOptionError("every request needs a non-empty context (start it with BOS) and continuation")
        if len(context) + len(continuation) - 1 > limit:
            raise ContextLengthError(f"a request of {len(context) + len(continuation)} tokens does not fit the "
                                     f"model's {limit}-token context: shorten it")
    rows = _rows(requests, share_prefixes)
    scores: List[ContinuationScore] = [None] * len(requests)  # type: ignore[list-item]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        for row, score in zip(batch, _score_batch(model, batch)):
            scores[row.index] = score
        if progress is not None:
            progress(len(batch))
    return scores


def _rows(requests: Sequence[Request], share_prefixes: bool) -> List[_Row]:
    """Split each request into a cached prefix and a tail. A context shared by two or more requests
    becomes their common prefix (all but its last token, which predicts the continuation's first)."""
    counts: Dict[Tuple[int, ...], int] = {}
    for context, _ in requests:
        key = tuple(context)
        counts[key] = counts.get(key, 0) + 1
    rows = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        shared = share_prefixes and counts[tuple(context)] > 1 and len(context) > 1
        prefix = tuple(context[:-1]) if shared else ()
        tail = context[len(prefix):] + continuation[:-1]
        rows.append(_Row(prefix, tail, continuation, i))
    # Longest first, so a batch holds rows of similar length (little padding); a group stays together.
    groups: Dict[object, List[_Row]] = {}
    for row in rows:
        groups.setdefault(row.prefix or ("unshared", row.index), []).append(row)
    ordered = sorted(groups.values(), key=lambda g: -(len(g[0].prefix) + max(len(r.tail) for r in g)))
    return [row for group in ordered for row in sorted(group, key=lambda r: -len(r.tail))]


def _score_batch(model: Model, rows: List[_Row]) -> List[ContinuationScore]:
    """One forward pass over the rows' tails (right-padded), on top of their prefixes' caches."""
    cache = _prefix_cache(model, rows)
    width = max(len(r.tail) for r in rows)
    ids = mx.array([r.tail + [0] * (width - len(r.tail)) for r in rows])  # right padding: causal, never seen
    hidden = model.hidden(ids, cache)
    # Only the positions that predict a continuation token get logits.
    picks = mx.array([b * width + t for b, r in enumerate(rows)
                      for t in range(len(r.tail) - len(r.targets), len(r.tail))])
    flat = hidden.reshape(-1, hidden.shape[-1])[picks]
    targets = [t for r in rows for t in r.targets]
    chosen, greedy = [], []
    for start in range(0, len(targets), LOGIT_CHUNK):
        lp = log_softmax(model.logits(flat[start:start + LOGIT_CHUNK]))
        chunk_targets = targets[start:start + LOGIT_CHUNK]
        chosen.append(target_log_probs(lp, chunk_targets))
        greedy.append(lp.argmax(axis=-1) == mx.array(chunk_targets))
    chosen_all = mx.concatenate(chosen).tolist()
    greedy_all = mx.concatenate(greedy).tolist()
    out, at = [], 0
    for r in rows:
        n = len(r.targets)
        out.append(ContinuationScore(float(sum(chosen_all[at:at + n])), n, all(greedy_all[at:at + n])))
        at += n
    return out


def _prefix_cache(model: Model, rows: List[_Row]) -> List[KVCache] | None:
    """The rows' prefixes run once per distinct prefix (left-padded), the cache then copied per row;
    None when no row has a prefix."""
    distinct = list(dict.fromkeys(r.prefix for r in rows))
    if distinct == [()]:
        return None
    width = max(len(p) for p in distinct)
    pads = [width - len(p) for p in distinct]
    cache = make_cache(len(model.layers), left_padding=pads)
    model.hidden(mx.array([[0] * pad + list(p) for pad, p in zip(pads, distinct)]), cache)
    which = mx.array([distinct.index(r.prefix) for r in rows])
    row_pads = [pads[i] for i in which.tolist()]
    copies = []
    for layer in cache:
        keys, values = layer.state
        meta = {**layer.meta_state, "left_padding": row_pads}
        copies.append(KVCache.from_state((keys[which], values[which]), meta))
    return copies
