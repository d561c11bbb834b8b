"""Timing: our decode loop and mlx-lm's on the same checkpoint, trials interleaved, uncounted warm-up.

Each trial starts from an empty cache: prefill `prompt_tokens`, then greedy-decode `gen_tokens`
(no EOS stop). Prefill speed is prompt tokens / time to first token; decode speed is the tokens
after the first over the time after it. Memory is what the implementation itself holds: the
process's peak minus what was in use before the trial, plus the implementation's own weights (both
models live in one process, so the raw process peak would count the other model too).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..cache import make_cache
from ..drafting import ADAPTIVE, DraftModel, PromptLookup, Speculation, check_num_draft_tokens
from ..errors import InvalidOptionError
from ..generation import GenerationOptions
from ..loading import DTYPES, default_dtype
from ..streaming import decode_tokens
from .checkpoint import Checkpoint, build_mlx_lm_model, build_model, parameter_bytes
from .forward import measure_interleaved, mlx_workloads

OURS = "openelm-mlx"
MLX_LM = "mlx-lm"
SPECULATIVE = "+draft"  # suffix of an implementation's name when it decodes speculatively

# CoreNet's mlx_examples/open_elm/inference.py timing prompt (36 tokens with BOS) and length.
PAPER_PROMPT = ("Squire Trelawney, Dr. Livesey, and the rest of these gentlemen having asked me to write down "
                "the whole particulars about Treasure Island, from the")
PAPER_GEN_TOKENS = 1024


@dataclass(frozen=True)
class BenchSettings:
    """How to measure. Every default lives here (the CLI reads them from this class).

    The defaults keep the plain `openelm-mlx bench` near a minute on a 2-core CPU; the speed goals
    are stated for --prompt-tokens 128 --gen-tokens 128.
    """

    prompt_tokens: int = 64
    gen_tokens: int = 32
    trials: int = 3
    warmup: int = 1
    vs_mlx_lm: bool = False
    seed: int = 0  # of the random prompt ids
    num_draft_tokens: Union[int, str] = GenerationOptions.num_draft_tokens  # with a draft model or prompt lookup
    prompt_lookup: Optional[int] = None  # n-gram size: also decode speculatively with prompt lookup

    def __post_init__(self) -> None:
        for name, lowest in (("prompt_tokens", 1), ("gen_tokens", 1), ("trials", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < lowest:
                raise InvalidOptionError(f"{name.replace('_', '-')} must be an integer >= {lowest}, got {value!r}")
        check_num_draft_tokens(self.num_draft_tokens)


@dataclass
class Trial:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_memory_bytes: int  # whole trial (prefill and decode)
    decode_peak_memory_bytes: int  # after the first token
    kv_cache_bytes: int
    tokens: List[int]
    drafted_tokens: int = 0  # speculative decoding only: drafts proposed and accepted, target verify passes
    accepted_tokens: int = 0
    verify_passes: int = 0


@dataclass
class Measurement:
    """One implementation on one configuration: its trials and what it was given."""

    impl: str
    checkpoint: Checkpoint
    compute_dtype: str
    requested_dtype: Optional[str]  # forced on every implementation; None: each its default
    prompt_tokens: int
    gen_tokens: int
    weight_bytes: int
    trials: List[Trial] = field(default_factory=list)
    drafter: Optional[str] = None  # speculative: "draft NAME" or "prompt lookup N"
    num_draft_tokens: Optional[Union[int, str]] = None
    verify_cost: Optional[float] = None  # ours, fixed K: a pass over num_draft_tokens + 1 tokens / a 1-token step

    @property
    def config(self) -> str:
        """The configuration's name in reports: model, quantization, and the dtype asked for."""
        ckpt = self.checkpoint
        quant = f" {ckpt.bits}-bit g{ckpt.group_size}" if ckpt.bits else ""
        return f"{ckpt.name}{quant}, {self.requested_dtype or 'default dtypes'}"

    def median(self, name: str) -> float:
        return statistics.median(getattr(t, name) for t in self.trials)

    def spread(self, name: str):
        values = [getattr(t, name) for t in self.trials]
        return min(values), max(values)


@dataclass
class Implementation:
    """A model plus the loop that drives it: `tokens(prompt_ids, gen_tokens, cache)` yields ints."""

    name: str
    compute_dtype: str
    model: object
    make_cache: Callable[[], list]
    tokens: Callable[[List[int], int, list], Iterator[int]]
    drafter: Optional[str] = None  # speculative: what drafts
    num_draft_tokens: Optional[Union[int, str]] = None
    speculation: Optional[Speculation] = None  # ours speculative: the current trial's counters


def ours(checkpoint: Checkpoint, dtype: Optional[str]) -> Implementation:
    """Our model and `decode_tokens` loop; `dtype` None is our per-backend default."""
    compute = dtype or default_dtype(quantized=checkpoint.args.quantization is not None)
    model = build_model(checkpoint, DTYPES[compute])
    options = GenerationOptions()  # greedy; only the last position's logits are computed

    def tokens(prompt, gen_tokens, cache):
        yield from decode_tokens(model, prompt, cache, options, gen_tokens)

    return Implementation(OURS, compute, model, lambda: make_cache(len(model.layers)), tokens)


def ours_speculative(plain: Implementation, draft: Optional[Checkpoint], prompt_lookup: Optional[int],
                     num_draft_tokens: Union[int, str]) -> Implementation:
    """Our `decode_tokens` loop decoding speculatively with `plain`'s model (shared, not a copy): drafting
    with `draft`'s model (in the same compute dtype) or, when `draft` is None, prompt lookup with n-grams
    up to `prompt_lookup`. Each trial starts a fresh drafter (a draft model's cache would otherwise
    already hold the repeated prompt)."""
    impl = replace(plain)
    options = GenerationOptions(num_draft_tokens=num_draft_tokens)
    if draft is not None:
        draft_model = build_model(draft, DTYPES[impl.compute_dtype])
        DraftModel(draft_model).check_target(impl.model)
        new_drafter = lambda: DraftModel(draft_model)  # noqa: E731
        impl.drafter = f"draft {draft.name}"
    else:
        new_drafter = lambda: PromptLookup(prompt_lookup)  # noqa: E731
        impl.drafter = f"prompt lookup {prompt_lookup}"

    def tokens(prompt, gen_tokens, cache):
        impl.speculation = Speculation(new_drafter(), num_draft_tokens)
        yield from decode_tokens(impl.model, prompt, cache, options, gen_tokens, speculation=impl.speculation)

    impl.name, impl.num_draft_tokens, impl.tokens = OURS + SPECULATIVE, num_draft_tokens, tokens
    return impl


def mlx_lm_speculative(plain: Implementation, draft: Checkpoint, num_draft_tokens: int) -> Implementation:
    """mlx-lm's `speculative_generate_step` on `plain`'s model (shared), with its own OpenELM model of
    `draft` (in the same compute dtype) as the draft."""
    from mlx_lm.generate import speculative_generate_step
    from mlx_lm.models.cache import make_prompt_cache

    impl = replace(plain)
    draft_model = build_mlx_lm_model(draft, DTYPES[impl.compute_dtype])

    def tokens(prompt, gen_tokens, cache):
        # mlx-lm does not say how many tokens it drafted: count what it accepted and its target passes
        # (each yields one token of the target's own; the first is the prefill's, as in ours).
        impl.speculation = counters = Speculation(drafter=None, num_draft_tokens=num_draft_tokens)
        counters.target_passes = -1
        for token, _, from_draft in speculative_generate_step(
                mx.array(prompt), impl.model, draft_model, num_draft_tokens=num_draft_tokens,
                max_tokens=gen_tokens, prompt_cache=cache):
            counters.accepted += bool(from_draft)
            counters.target_passes += not from_draft
            yield int(token)

    impl.name, impl.drafter, impl.num_draft_tokens, impl.tokens = (
        MLX_LM + SPECULATIVE, f"draft {draft.name}", num_draft_tokens, tokens)
    impl.make_cache = lambda: make_prompt_cache(impl.model) + make_prompt_cache(draft_model)
    return impl


def mlx_lm(checkpoint: Checkpoint, dtype: Optional[str]) -> Implementation:
    """mlx-lm's own OpenELM model and `generate_step` loop; by default it computes in the stored dtype."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    compute = dtype or checkpoint.stored_dtype
    model = build_mlx_lm_model(checkpoint, DTYPES[compute])

    def tokens(prompt, gen_tokens, cache):
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=gen_tokens, prompt_cache=cache):
            yield int(token)

    return Implementation(MLX_LM, compute, model, lambda: make_prompt_cache(model), tokens)


def run_trial(impl: Implementation, prompt: Sequence[int], gen_tokens: int, weight_bytes: int) -> Trial:
    cache = impl.make_cache()
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens: List[int] = []
    start = time.perf_counter()
    first_at = start
    prefill_peak = 0
    stream = impl.tokens(list(prompt), gen_tokens, cache)
    for token in stream:
        tokens.append(token)
        if len(tokens) == 1:
            first_at = time.perf_counter()
            prefill_peak = max(mx.get_peak_memory(), mx.get_active_memory())
            mx.reset_peak_memory()
    end = time.perf_counter()
    decode_peak = max(mx.get_peak_memory(), mx.get_active_memory())
    kv_bytes = sum(c.nbytes for c in cache)
    own = weight_bytes - baseline  # the process's memory outside this trial, less our weights
    ttft = first_at - start
    counters = impl.speculation
    return Trial(
        drafted_tokens=counters.drafted if counters else 0,
        accepted_tokens=counters.accepted if counters else 0,
        verify_passes=counters.target_passes if counters else 0,
        ttft_s=ttft,
        prefill_tok_s=len(prompt) / ttft,
        decode_tok_s=(len(tokens) - 1) / (end - first_at) if len(tokens) > 1 else 0.0,
        peak_memory_bytes=max(prefill_peak, decode_peak) + own,
        decode_peak_memory_bytes=decode_peak + own,
        kv_cache_bytes=kv_bytes,
        tokens=tokens,
    )


def prompt_ids(vocab_size: int, settings: BenchSettings) -> List[int]:
    """Random ids past the special tokens (speed does not depend on which tokens they are)."""
    rng = np.random.default_rng(settings.seed)
    return [1] + rng.integers(3, vocab_size, size=settings.prompt_tokens - 1).tolist()  # BOS first


def measure(checkpoint: Checkpoint, settings: BenchSettings, *, dtype: Optional[str] = None,
            prompt: Optional[Sequence[int]] = None, draft: Optional[Checkpoint] = None,
            progress: Callable[[str], None] = lambda _: None) -> List[Measurement]:
    """Time ours (and mlx-lm's with `settings.vs_mlx_lm`) on `checkpoint`, trials interleaved.

    `dtype` forces one compute dtype on every implementation; None lets each take its default. With
    `draft` (a draft model's checkpoint) or `settings.prompt_lookup`, ours also decodes speculatively
    (and mlx-lm too with a draft model: it has no prompt lookup), and the cost of our verify pass over
    num_draft_tokens + 1 tokens after the prompt is measured against a 1-token step.
    """
    if draft is not None and settings.prompt_lookup is not None:
        raise InvalidOptionError("give a draft model or prompt lookup, not both")
    prompt = list(prompt) if prompt is not None else prompt_ids(checkpoint.args.vocab_size, settings)
    context = checkpoint.args.max_context_length
    if len(prompt) + settings.gen_tokens > context:
        raise InvalidOptionError(f"{len(prompt)} prompt + {settings.gen_tokens} generated tokens exceed the "
                                 f"model's {context}-token context: lower --prompt-tokens or --gen-tokens")
    k = settings.num_draft_tokens
    speculative = draft is not None or settings.prompt_lookup is not None
    if k == ADAPTIVE and settings.vs_mlx_lm and draft is not None:
        raise InvalidOptionError(f"mlx-lm's speculative decoding drafts a fixed number of tokens: give a number, "
                                 f"not --num-draft-tokens {ADAPTIVE}, with --vs-mlx-lm")
    impls = [ours(checkpoint, dtype)]
    if speculative:
        impls.append(ours_speculative(impls[0], draft, settings.prompt_lookup, k))
    if settings.vs_mlx_lm:
        impls.append(mlx_lm(checkpoint, dtype))
        if draft is not None:
            impls.append(mlx_lm_speculative(impls[-1], draft, k))
    results = [Measurement(impl=i.name, checkpoint=checkpoint, compute_dtype=i.compute_dtype, requested_dtype=dtype,
                           prompt_tokens=len(prompt), gen_tokens=settings.gen_tokens,
                           weight_bytes=parameter_bytes(i.model), drafter=i.drafter,
                           num_draft_tokens=i.num_draft_tokens) for i in impls]
    for n in range(settings.warmup):
        for impl, result in zip(impls, results):
            progress(f"warm-up {n + 1}/{settings.warmup}: {impl.name}")
            run_trial(impl, prompt, settings.gen_tokens, result.weight_bytes)
    for n in range(settings.trials):
        # Interleaved, and which goes first alternates (ours, theirs, theirs, ours, ...), so a machine
        # that slows down or speeds up during the run favours neither.
        pairs = list(zip(impls, results))
        for impl, result in pairs if n % 2 == 0 else pairs[::-1]:
            progress(f"trial {n + 1}/{settings.trials}: {impl.name}")
            result.trials.append(run_trial(impl, prompt, settings.gen_tokens, result.weight_bytes))
    if speculative and k != ADAPTIVE:  # an adaptive K has no single verify pass to time
        progress(f"verify pass of {k + 1} tokens vs a 1-token step: {OURS}")
        results[1].verify_cost = verify_cost(impls[0].model, len(prompt), k + 1, settings.trials)
    del impls
    mx.clear_cache()
    return results


def verify_cost(model, context: int, tokens: int, repeats: int) -> float:
    """Time of a forward over `tokens` new tokens after a `context`-token cache (every position's
    logits, as a verify pass computes them) divided by a 1-token decode step's: medians of `repeats`."""
    timings = measure_interleaved({OURS: mlx_workloads(model, (), (tokens,), context)}, repeats)[OURS]["verify"]
    return timings[tokens] / timings[1]
