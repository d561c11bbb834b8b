"""Text generation's parts: options, responses, streamed text with stop strings, cache sizing. The decode loop
that uses them is engine.py; the one-sequence entry points are streaming.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import DEFAULT_KEEP, DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES, KVCache, make_cache
from .constraints import Constraint
from .drafting import Scoring, check_num_draft_tokens
from .errors import ContextLengthError, InvalidOptionError
from .model import Model
from .sampling import MAX_LOGIT_BIAS, MAX_TOKEN_PENALTY, MAX_TOP_LOGPROBS, SequenceSampler
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
