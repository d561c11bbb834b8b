"""Text generation: options, the pipelined one-sequence decode loop, streaming with stop strings."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field, replace
from typing import Deque, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import DEFAULT_KEEP, DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES, KVCache, make_cache
from .constraints import Constraint, ConstraintState, mask_rows
from .drafting import DraftModel, Drafter, Scoring, Speculation, accept_drafts, check_num_draft_tokens
from .errors import ContextLengthError, InvalidOptionError
from .model import Model
from .sampling import (MAX_LOGIT_BIAS, MAX_TOKEN_PENALTY, MAX_TOP_LOGPROBS, SequenceSampler,
                       describe_logprobs)
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
    # Speculative decoding (with a `draft`): tokens drafted per verify round, or "auto" (drafting.ADAPTIVE:
    # adapts to the acceptance, see drafting.AdaptiveDraftLength). 2: with docs-target and
    # docs-draft, acceptance falls from 0.71 (k=1) to 0.50 (2), 0.41 (3), 0.34 (4), and a verify pass over
    # 4+ tokens costs far more than over 3 on the CPU; "auto" was no faster (it climbs into those passes):
    # see docs/generate.md#speculative-decoding and docs/bench.md#adaptive-k.
    num_draft_tokens: Union[int, str] = 2
    # Quantized KV cache: keys and values stored in kv_bits (4 or 8; None: the model's dtype), with a
    # scale and bias per kv_group_size elements; quality and memory: docs/generate.md#quantized-kv-cache.
    kv_bits: Optional[int] = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    # OpenAI's penalties on the tokens generated so far: presence subtracts once a token has appeared,
    # frequency once per appearance (-2..2; 0 is off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: {token id: -100..100} added to the logits (a mapping; kept as sorted pairs).
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    # Log-probabilities of each generated token and its `logprobs` likeliest alternatives (None: off).
    logprobs: Optional[int] = None
    # Structured output: the text must match this (JSON schema, regex, choice, grammar); see constraints.py.
    constraint: Optional[Constraint] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
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
            (self.kv_bits is None or self.kv_bits in KV_BITS,
             f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (None: no quantization)", self.kv_bits),
            (self.kv_group_size in KV_GROUP_SIZES,
             f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}", self.kv_group_size),
            (-MAX_TOKEN_PENALTY <= self.presence_penalty <= MAX_TOKEN_PENALTY,
             f"presence_penalty must be between -{MAX_TOKEN_PENALTY} and {MAX_TOKEN_PENALTY}", self.presence_penalty),
            (-MAX_TOKEN_PENALTY <= self.frequency_penalty <= MAX_TOKEN_PENALTY,
             f"frequency_penalty must be between -{MAX_TOKEN_PENALTY} and {MAX_TOKEN_PENALTY}",
             self.frequency_penalty),
            (all(t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
             f"logit_bias must map token ids to biases between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}",
             dict(self.logit_bias)),
            (self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                       and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be None or the number of alternatives to report, 0 to {MAX_TOP_LOGPROBS}", self.logprobs),
            (self.constraint is None or isinstance(self.constraint, Constraint),
             "constraint must be an openelm_mlx.Constraint (Constraint.json_schema(...), .regex(...), ...)",
             self.constraint),
        ]
        for ok, message, value in checks:
            if not ok:
                raise InvalidOptionError(f"{message}, got {value!r}")
        check_num_draft_tokens(self.num_draft_tokens)
        if self.constraint is not None and self.stop:
            # A stop string could cut the text short of what the constraint requires.
            raise InvalidOptionError("stop strings cannot be combined with a constraint: the constraint decides "
                                     "where the text ends (drop the stop strings)")

    def sequence_sampler(self, seen: Optional[mx.array] = None) -> SequenceSampler:
        """A fresh `SequenceSampler` for one sequence (or a batch sharing these options) that has seen the
        ids `seen` [B, N] so far."""
        return SequenceSampler(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                               self.repetition_context_size, self.seed, seen, presence_penalty=self.presence_penalty,
                               frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias,
                               logprobs=self.logprobs)

    def scoring(self) -> Scoring:
        """The penalty and sampler settings as one `Scoring` (what speculative decoding compares p and q by)."""
        return Scoring(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                       self.repetition_context_size)

    @property
    def uses_token_processing(self) -> bool:
        """Whether presence/frequency penalties, logit_bias or logprobs are asked for (what speculative
        decoding does not do)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias) or self.logprobs is not None


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
    # With GenerationOptions.logprobs: this token's log-probability and the likeliest alternatives
    # [(id, logprob)], most likely first (log-softmax of the logits it was sampled from, after penalties).
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None

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


def new_cache(model: Model, options: GenerationOptions) -> List[KVCache]:
    """An empty cache for `options`: its sliding window (`cache_window`) and its KV quantization."""
    head_dim = model.args.head_dim
    if options.kv_bits is not None and head_dim % options.kv_group_size:
        raise InvalidOptionError(f"kv_group_size must divide the model's head_dim ({head_dim}), "
                                 f"got {options.kv_group_size}")
    return make_cache(len(model.layers), max_size=cache_window(model, options), kv_bits=options.kv_bits,
                      kv_group_size=options.kv_group_size)


def cache_fits(cache: List[KVCache], model: Model, options: GenerationOptions) -> bool:
    """Whether `cache` is what `new_cache(model, options)` would build (window and quantization)."""
    return (len(cache) == len(model.layers) and cache[0].max_size == cache_window(model, options)
            and quantized_as_asked(cache, options))


def quantized_as_asked(cache: List[KVCache], options: GenerationOptions) -> bool:
    """Whether `cache` stores keys and values as `options` ask (kv_bits, kv_group_size)."""
    group_size = None if options.kv_bits is None else options.kv_group_size
    return cache[0].kv_bits == options.kv_bits and cache[0].kv_group_size == group_size


class TokenLogprobs:
    """What `decode_tokens` reports beside each step's tokens when options.logprobs is set: `last` is, per
    row, (the token's logprob, [(id, logprob)] of the likeliest alternatives, most likely first)."""

    def __init__(self) -> None:
        self.last: List[Tuple[float, List[Tuple[int, float]]]] = []
        self._pending: Deque[Tuple[mx.array, mx.array, mx.array]] = collections.deque()

    def push(self, arrays: Tuple[mx.array, mx.array, mx.array]) -> None:
        """A step's (chosen [B], top ids [B, n], top logprobs [B, n]), computed ahead of its yield."""
        self._pending.append(arrays)

    def advance(self) -> None:
        """`last` becomes the oldest pushed step (the one about to be yielded)."""
        self.last = describe_logprobs(self._pending.popleft())


def decode_tokens(model: Model, ids: mx.array, cache: List[KVCache], options: GenerationOptions,
                  limit: int, *, history: Optional[mx.array] = None,
                  speculation: Optional[Speculation] = None,
                  logprobs: Optional[TokenLogprobs] = None,
                  constraints: Optional[Sequence[ConstraintState]] = None) -> Iterator[List[int]]:
    """Prefill `ids` [B, T] in chunks, then yield up to `limit` steps of [B] sampled tokens.

    `history` [B, H]: ids before `ids` that the cache already holds; the repetition penalty looks at
    the last repetition_context_size ids of history, `ids` and the generated tokens together.
    Step n+1 is queued with async_eval before step n is read, so the device never waits for Python.
    With `speculation` (B = 1), every token after the first comes from a verify round: the drafter
    proposes, the target scores the last token and the drafts in one pass, the rejected positions are
    trimmed, and the accepted drafts plus one target token are yielded one by one (the counters in
    `speculation` say whether each came from the draft). The drafter sees history + ids + generated.
    Presence/frequency penalties count the generated tokens only; logit_bias is added last. With
    options.logprobs, pass `logprobs`: its `last` describes the step just yielded.
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
    if speculation is not None and options.uses_token_processing:
        raise InvalidOptionError("speculative decoding does not support presence_penalty, frequency_penalty, "
                                 "logit_bias or logprobs: generate without a draft for these")
    if (options.logprobs is None) != (logprobs is None):
        raise InvalidOptionError("options.logprobs and the `logprobs` recorder go together: pass both or neither")
    seen = ids if history is None else mx.concatenate([history.astype(ids.dtype), ids], axis=1)
    sample = options.sequence_sampler(seen)

    def step(new_ids: mx.array) -> mx.array:
        hidden = model.hidden(new_ids, cache)
        logits = model.logits(hidden[:, -1, :]).astype(mx.float32)  # only the last position's logits
        if constraints is not None:
            mx.async_eval(logits)  # the forward pass runs while the CPU computes the masks
        token = sample(logits, constraints)
        if logprobs is not None:
            logprobs.push(sample.reported)
            mx.async_eval(token, *sample.reported)
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
                round_key = sample.next_key()
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
            if logprobs is not None:
                logprobs.advance()
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
    k = min(speculation.draft_length, remaining - 1)
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
    speculation.record_round(len(drafts), accepted)
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
    cache_window(model, options)  # checks prefill_step against the window, also for a given cache
    if cache is None:
        cache = new_cache(model, options)
    elif not quantized_as_asked(cache, options):
        held = (f"{cache[0].kv_bits}-bit (group size {cache[0].kv_group_size})" if cache[0].kv_bits
                else "unquantized")
        raise InvalidOptionError(f"the cache holds {held} keys and values but kv_bits is {options.kv_bits} "
                                 f"(group size {options.kv_group_size}): pass a cache built for these options")
    # The penalty needs only the last ids; a drafter looks at all of them.
    recent = list(context_ids)[-options.repetition_context_size:] if speculation is None else list(context_ids)
    history = mx.array([recent]) if recent else None
    completion = CompletionText(tokenizer, options.stop, continues_text=continues_text)
    constraint = options.constraint.start(tokenizer) if options.constraint is not None else None
    mx.reset_peak_memory()
    stats = GenerationResponse(text="", token=-1, prompt_tokens=len(ids))
    start = time.perf_counter()
    first_at = start
    recorder = TokenLogprobs() if options.logprobs is not None else None
    tokens = decode_tokens(model, mx.array([ids]), cache, options, limit, history=history, speculation=speculation,
                           logprobs=recorder, constraints=None if constraint is None else [constraint])
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
            if recorder is not None:
                stats.logprob, stats.top_logprobs = recorder.last[0]
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

