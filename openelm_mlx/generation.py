"""Text generation: options, the pipelined decode loop, streaming with stop strings, batches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import DEFAULT_KEEP, KVCache, make_cache
from .constraints import Constraint, ConstraintState, apply_masks, mask_rows
from .drafting import DraftModel, Drafter, Scoring, Speculation, accept_drafts
from .errors import ContextLengthError, InvalidOptionError
from .model import Model
from .sampling import make_repetition_penalty, make_sampler
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
# mx.random.key takes a seed in [0, 2**64).
SEED_LIMIT = 2 ** 64


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. Every default lives here (the CLI reads them from this class)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; Apple's model cards use 1.2
    repetition_context_size: int = 20
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    prefill_step: int = 512  # prompt tokens per forward pass
    sliding_window: bool = False  # keep going past the context by dropping old positions
    # Speculative decoding (with a `draft`): tokens drafted per verify round. 2: with docs-target and
    # docs-draft, acceptance falls from 0.71 (k=1) to 0.50 (2), 0.41 (3), 0.34 (4), and a verify pass over
    # 4+ tokens costs far more than over 3 on the CPU; see docs/generate.md#speculative-decoding.
    num_draft_tokens: int = 2
    # Structured output: the text must match this (JSON schema, regex, choice, grammar); see constraints.py.
    constraint: Optional[Constraint] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens must be a non-negative integer", self.max_tokens),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)", self.temperature),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be a non-negative integer (0 turns it off)", self.top_k),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 turns it off)", self.top_p),
            (0 <= self.min_p < 1, "min_p must be in [0, 1) (0 turns it off)", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)", self.repetition_penalty),
            (isinstance(self.repetition_context_size, int) and self.repetition_context_size > 0,
             "repetition_context_size must be a positive integer", self.repetition_context_size),
            (isinstance(self.prefill_step, int) and self.prefill_step > 0, "prefill_step must be a positive integer",
             self.prefill_step),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and 0 <= self.seed < SEED_LIMIT),
             f"seed must be an integer from 0 to {SEED_LIMIT - 1}", self.seed),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings", self.stop),
            (isinstance(self.num_draft_tokens, int) and self.num_draft_tokens > 0,
             "num_draft_tokens must be a positive integer", self.num_draft_tokens),
            (self.constraint is None or isinstance(self.constraint, Constraint),
             "constraint must be an openelm_mlx.Constraint (Constraint.json_schema(...), .regex(...), ...)",
             self.constraint),
        ]
        for ok, message, value in checks:
            if not ok:
                raise InvalidOptionError(f"{message}, got {value!r}")
        if self.constraint is not None and self.stop:
            # A stop string could cut the text short of what the constraint requires.
            raise InvalidOptionError("stop strings cannot be combined with a constraint: the constraint decides "
                                     "where the text ends (drop the stop strings)")

    def scoring(self) -> Scoring:
        """The penalty and sampler settings as one `Scoring` (what speculative decoding compares p and q by)."""
        return Scoring(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                       self.repetition_context_size)


@dataclass
class GenerationResponse:
    """One streamed step: the new text and token; finish_reason and final statistics on the last."""

    text: str
    token: int
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"
    # With finish_reason "length": True when the context was full, not max_tokens reached.
    context_full: bool = False
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    peak_memory_bytes: int = 0
    # Speculative decoding: whether this token was a draft the target accepted, and (running totals)
    # the drafted and accepted tokens and the target's verify passes.
    from_draft: bool = False
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens so far (0 without speculative decoding)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    finish_reason: str
    stats: GenerationResponse = field(repr=False)


class StopMatcher:
    """Finds stop strings across token boundaries; text that might start one is held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> Tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class CompletionText:
    """The text of one completion as tokens arrive: streaming detokenizer plus stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], *, continues_text: bool = False):
        self._eos_id = tokenizer.eos_id
        self._detokenizer = tokenizer.detokenizer(continues_text=continues_text)
        self._stops = StopMatcher(stops)

    def add(self, token: int) -> Tuple[str, bool]:
        """Return (text safe to emit, whether the completion ended: EOS or a stop string)."""
        if token == self._eos_id:
            return self.finish(), True
        return self._stops.push(self._detokenizer.add_token(token))

    def finish(self) -> str:
        """Flush what is held back: an incomplete character, a partial stop-string match."""
        tail, hit = self._stops.push(self._detokenizer.finalize())
        return tail if hit else tail + self._stops.flush()


def context_room(model: Model, prompt_len: int, cache: Optional[List[KVCache]], sliding_window: bool) -> Optional[int]:
    """How many tokens may be generated before the context is full (None: unbounded)."""
    limit = model.args.max_context_length
    cached = cache[0].offset if cache else 0
    if prompt_len > limit:  # the sliding window cannot help: the prompt itself must fit
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens, but OpenELM's context is {limit} tokens: shorten the prompt")
    if not sliding_window and cached + prompt_len > limit:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens after {cached} cached ones, but OpenELM's context is {limit} "
            "tokens: shorten the prompt (or enable the sliding window to keep a long chat going)")
    return None if sliding_window else limit - cached - prompt_len


def cache_window(model: Model, options: GenerationOptions) -> Optional[int]:
    """The KV cache's `max_size` for `options`: None without the sliding window, else the context.

    Every prefill chunk must fit in the window next to the DEFAULT_KEEP positions it never drops."""
    if not options.sliding_window:
        return None
    context = model.args.max_context_length
    if options.prefill_step > context - DEFAULT_KEEP:
        raise InvalidOptionError(
            f"prefill_step must be at most the context minus {DEFAULT_KEEP} kept positions when the sliding "
            f"window is on, got {options.prefill_step} for a {context}-token context")
    return context


def decode_tokens(model: Model, ids: mx.array, cache: List[KVCache], options: GenerationOptions,
                  limit: int, *, history: Optional[mx.array] = None,
                  speculation: Optional[Speculation] = None,
                  constraints: Optional[Sequence[ConstraintState]] = None) -> Iterator[List[int]]:
    """Prefill `ids` [B, T] in chunks, then yield up to `limit` steps of [B] sampled tokens.

    `history` [B, H]: ids before `ids` that the cache already holds; the repetition penalty looks at
    the last repetition_context_size ids of history, `ids` and the generated tokens together.
    Step n+1 is queued with async_eval before step n is read, so the device never waits for Python.
    With `speculation` (B = 1), every token after the first comes from a verify round: the drafter
    proposes, the target scores the last token and the drafts in one pass, the rejected positions are
    trimmed, and the accepted drafts plus one target token are yielded one by one (the counters in
    `speculation` say whether each came from the draft). The drafter sees history + ids + generated.
    With `constraints` (one state per row), every token is drawn from the logits its row's constraint
    allows, after the penalty; a state has taken each token by the time it is yielded. This costs the
    pipelining: the next step's mask needs the token on the host (its forward pass still overlaps the mask).
    However it ends (exhausted, closed, garbage collected, failed), the cache then holds `ids` and every
    yielded token but the last (the pipelined step may already have fed it): with limit 0 just `ids`,
    and what it held before if it failed before the first token.
    """
    if speculation is not None and ids.shape[0] != 1:
        raise InvalidOptionError("speculative decoding works on one sequence at a time, not on a batch")
    scoring = options.scoring()
    sampler = make_sampler(options.temperature, options.top_k, options.top_p, options.min_p)
    penalty = (make_repetition_penalty(options.repetition_penalty, options.repetition_context_size)
               if options.repetition_penalty != 1.0 else None)
    key = mx.random.key(options.seed) if options.seed is not None else None
    window_size = options.repetition_context_size
    window = None  # [B, <= window_size]: the ids the penalty looks at
    if penalty is not None:
        seen = ids if history is None else mx.concatenate([history.astype(ids.dtype), ids], axis=1)
        window = seen[:, max(0, seen.shape[1] - window_size):]

    def step(new_ids: mx.array) -> mx.array:
        nonlocal key, window
        hidden = model.hidden(new_ids, cache)
        logits = model.logits(hidden[:, -1, :]).astype(mx.float32)  # only the last position's logits
        if penalty is not None:
            logits = penalty(window, logits)
        if constraints is not None:
            mx.async_eval(logits)  # the forward pass runs while the CPU computes the masks
            logits = apply_masks(logits, constraints)
        sub = None
        if key is not None:
            key, sub = mx.random.split(key)
        token = sampler(logits, sub)
        if penalty is not None:  # a fixed-size window: drop the oldest id once it is full
            kept = window[:, max(0, window.shape[1] + 1 - window_size):]
            window = mx.concatenate([kept, token[:, None].astype(window.dtype)], axis=1)
        return token

    held_before, prompt_len = cache[0].offset, ids.shape[1]
    prefilled, delivered = False, 0
    try:
        # Whole chunks first; the last 1..prefill_step ids go through `step`, which samples (limit 0: none do).
        last_chunk = (prompt_len - 1) % options.prefill_step + 1 if limit > 0 else 0
        for start in range(0, prompt_len - last_chunk, options.prefill_step):
            model.hidden(ids[:, start:start + options.prefill_step], cache)
            mx.eval([layer_cache.state for layer_cache in cache])  # every layer's keys and values
        if limit <= 0:
            prefilled = True
            return
        token = step(ids[:, prompt_len - last_chunk:])
        mx.async_eval(token)
        prefilled = True
        if speculation is not None:
            sequence = ([] if history is None else history[0].tolist()) + ids[0].tolist()
            pending, from_draft = [token.item()], 0  # to yield; how many at its front are accepted drafts
            constraint = constraints[0] if constraints is not None else None
            if constraint is not None:
                constraint.advance(pending[0])
            while True:
                for i, pending_token in enumerate(pending):
                    speculation.last_from_draft = i < from_draft
                    delivered += 1
                    yield [pending_token]
                    if delivered == limit:
                        return
                sequence += pending
                round_key = None
                if key is not None:
                    key, round_key = mx.random.split(key)
                pending, from_draft = _verify_round(model, cache, sequence, scoring, speculation,
                                                    limit - delivered, round_key, constraint)
        for n in range(1, limit + 1):
            if constraints is not None:  # the next mask depends on this token: wait for it
                for state, row_token in zip(constraints, token.tolist()):
                    state.advance(row_token)
            if n < limit:
                next_token = step(token[:, None])
                mx.async_eval(next_token)
            step_tokens = token.tolist()
            delivered = n
            yield step_tokens
            if n < limit:
                token = next_token
    finally:
        held = held_before + (prompt_len + max(delivered - 1, 0) if prefilled else 0)
        for layer_cache in cache:  # also evens out layers that a failed step reached only partly
            layer_cache.trim(layer_cache.offset - held)


def _verify_round(model: Model, cache: List[KVCache], sequence: List[int], scoring: Scoring,
                  speculation: Speculation, remaining: int, key: Optional[mx.array],
                  constraint: Optional[ConstraintState] = None) -> Tuple[List[int], int]:
    """One speculative round after `sequence` (the cache holds all of it but the last id): draft, score
    the last id and the drafts in one target pass, keep what the target agrees with and trim the rest.
    Returns (the tokens to emit: accepted drafts, then one target token; how many drafts are among them).
    Never more than `remaining` tokens. With a `constraint`, each position's logits are masked by the
    state after the drafts before it, so a draft the constraint refuses is rejected like one the target
    would not draw; the constraint ends the round having taken exactly the returned tokens."""
    draft_key = None
    if key is not None:
        key, draft_key = mx.random.split(key)
    k = min(speculation.num_draft_tokens, remaining - 1)
    drafts, q = speculation.drafter.propose(sequence, k, scoring, draft_key) if k > 0 else ([], None)
    drafts = [int(t) for t in drafts[:k]]
    if q is not None:
        q = q[:len(drafts)]
    hidden = model.hidden(mx.array([sequence[-1:] + drafts]), cache)
    logits = model.logits(hidden[0]).astype(mx.float32)  # [k + 1, V]: after the last id and each draft
    logits = scoring.penalise(logits, [sequence + drafts[:j] for j in range(len(drafts) + 1)])
    if constraint is not None:
        logits = mask_rows(logits, constraint.draft_masks(drafts, logits.shape[-1]))
    if scoring.greedy:
        targets = mx.argmax(logits, axis=-1).tolist()
        accepted = next((j for j, d in enumerate(drafts) if d != targets[j]), len(drafts))
        follow = targets[accepted]
    else:
        accepted, follow = accept_drafts(scoring.probabilities(logits), q, drafts, key)
    for layer_cache in cache:  # the rejected drafts leave the cache; the accepted ones stay
        layer_cache.trim(len(drafts) - accepted)
    if constraint is not None:
        for emitted in drafts[:accepted] + [follow]:
            constraint.advance(emitted)
    speculation.drafted += len(drafts)
    speculation.accepted += accepted
    speculation.target_passes += 1
    return drafts[:accepted] + [follow], accepted


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: Prompt,
                    options: Optional[GenerationOptions] = None, *,
                    cache: Optional[List[KVCache]] = None, context_ids: Sequence[int] = (),
                    continues_text: bool = False,
                    draft: Optional[Union[Model, Drafter]] = None) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS, or token ids), one response per token.

    Text segments concatenate to the decoded completion without stop strings or EOS; with
    `continues_text` the completion's first word keeps its space (it continues the text before). Pass a
    `cache` from an earlier call to continue from it (only `prompt` is prefilled), and the ids it holds
    as `context_ids` (the last repetition_context_size suffice) so the repetition penalty sees them too.
    However generation ends (EOS, stop string, length, a full context, the caller closing or dropping
    the iterator, an exception), the cache then holds the prompt and every generated token but the
    last: a follow-up prompt starts with that last token. With max_tokens 0 it holds the prompt.

    `draft` turns on speculative decoding: a draft `Model` (same vocabulary), a `DraftModel` (keeps its
    cache between calls), `PromptLookup()` or any `Drafter`. Greedy output is unchanged token for token
    and sampling keeps the target's distribution; each response says whether its token was an accepted
    draft (`from_draft`) and carries the running drafted / accepted counts. A draft model drafts from
    `context_ids` + prompt + generated, so pass all the ids the cache holds.

    With `options.constraint` the text matches it: generation ends ("stop") once the constraint is
    finished, or with EOS, which it allows only when the text is complete; "length" means it was cut short.
    """
    options = options or GenerationOptions()
    speculation = _speculation(model, draft, options)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    room = context_room(model, len(ids), cache, options.sliding_window)
    limit = options.max_tokens if room is None else min(options.max_tokens, room)
    context_full = room is not None and room < options.max_tokens  # the context ends it, not max_tokens
    max_size = cache_window(model, options)
    if cache is None:
        cache = make_cache(len(model.layers), max_size=max_size)
    # The penalty needs only the last ids; a drafter looks at all of them.
    recent = list(context_ids)[-options.repetition_context_size:] if speculation is None else list(context_ids)
    history = mx.array([recent]) if recent else None
    completion = CompletionText(tokenizer, options.stop, continues_text=continues_text)
    constraint = options.constraint.start(tokenizer) if options.constraint is not None else None
    mx.reset_peak_memory()
    stats = GenerationResponse(text="", token=-1, prompt_tokens=len(ids))
    start = time.perf_counter()
    first_at = start
    tokens = decode_tokens(model, mx.array([ids]), cache, options, limit, history=history, speculation=speculation,
                           constraints=None if constraint is None else [constraint])
    try:
        for n, (token,) in enumerate(tokens, 1):
            if speculation is not None:
                stats.drafted_tokens, stats.accepted_tokens = speculation.drafted, speculation.accepted
                stats.verify_passes = speculation.target_passes
            now = time.perf_counter()
            if n == 1:
                first_at = now
                stats.ttft_s = now - start
                stats.prompt_tps = len(ids) / stats.ttft_s
            stats.generation_tokens = n
            stats.generation_tps = (n - 1) / (now - first_at) if n > 1 else 0.0
            text, ended = completion.add(token)
            done = not ended and constraint is not None and constraint.is_finished  # only EOS could follow
            finish = "stop" if ended or done else ("length" if n == limit else None)
            if finish == "length" or done:
                text += completion.finish()
            stats.peak_memory_bytes = mx.get_peak_memory()
            if finish:
                tokens.close()  # settles the cache before the caller sees the last response
            yield replace(stats, text=text, token=token, finish_reason=finish,
                          context_full=finish == "length" and context_full,
                          from_draft=speculation is not None and speculation.last_from_draft)
            if finish:
                return
        if limit == 0:
            yield replace(stats, finish_reason="length", context_full=context_full)
    finally:
        tokens.close()


def _speculation(model: Model, draft: Optional[Union[Model, Drafter]],
                 options: GenerationOptions) -> Optional[Speculation]:
    """The Speculation for `draft` (None: plain decoding); a draft model is checked against the target."""
    if draft is None:
        return None
    if options.sliding_window:
        # A verify pass of k + 1 positions fills the window at another moment than single steps do, so
        # different positions would be dropped and the output would differ from plain decoding.
        raise InvalidOptionError("speculative decoding cannot be combined with the sliding window: turn one off")
    drafter = DraftModel(draft) if isinstance(draft, Model) else draft
    if isinstance(drafter, DraftModel):
        drafter.check_target(model)
    return Speculation(drafter, options.num_draft_tokens)


def generate(model: Model, tokenizer: Tokenizer, prompt: Prompt,
             options: Optional[GenerationOptions] = None, *,
             cache: Optional[List[KVCache]] = None, context_ids: Sequence[int] = (),
             draft: Optional[Union[Model, Drafter]] = None) -> GenerationResult:
    """Generate a whole completion; see `stream_generate`."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, prompt, options, cache=cache, context_ids=context_ids,
                                draft=draft):
        text.append(last.text)
        if last.token >= 0:
            tokens.append(last.token)
    return GenerationResult("".join(text), tokens, last.finish_reason, last)


def batch_generate(model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                   options: Optional[GenerationOptions] = None) -> List[GenerationResult]:
    """Generate for several prompts at once (left-padded). Greedy rows equal their solo runs."""
    options = options or GenerationOptions()
    if options.sliding_window:
        raise ValueError("batch_generate does not support the sliding window")
    rows = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not rows or not all(rows):
        raise ValueError("batch_generate needs at least one prompt, and no prompt may be empty")
    width = max(len(r) for r in rows)
    limit = min(options.max_tokens, context_room(model, width, None, False))
    pads = [width - len(r) for r in rows]
    ids = mx.array([[0] * pad + r for pad, r in zip(pads, rows)])  # pad id is never attended to
    cache = make_cache(len(model.layers), left_padding=pads)
    completions = [CompletionText(tokenizer, options.stop) for _ in rows]
    constraints = [options.constraint.start(tokenizer) for _ in rows] if options.constraint is not None else None
    texts: List[List[str]] = [[] for _ in rows]
    out_tokens: List[List[int]] = [[] for _ in rows]
    finish: List[Optional[str]] = [None] * len(rows)
    for n, step_tokens in enumerate(decode_tokens(model, ids, cache, options, limit, constraints=constraints), 1):
        for i, token in enumerate(step_tokens):
            if finish[i]:
                continue
            out_tokens[i].append(token)
            text, ended = completions[i].add(token)
            if not ended and constraints is not None and constraints[i].is_finished:
                text, ended = text + completions[i].finish(), True
            finish[i] = "stop" if ended else None
            texts[i].append(text)
        if all(finish):
            break
    results = []
    for i in range(len(rows)):
        if not finish[i]:
            texts[i].append(completions[i].finish())
        stats = GenerationResponse(text="", token=-1, prompt_tokens=len(rows[i]),
                                   generation_tokens=len(out_tokens[i]))
        results.append(GenerationResult("".join(texts[i]), out_tokens[i], finish[i] or "length", stats))
    return results
