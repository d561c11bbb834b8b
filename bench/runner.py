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
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..cache import make_cache
from ..errors import InvalidOptionError
from ..generation import GenerationOptions, decode_tokens
from ..loading import DTYPES, default_dtype
from .checkpoint import Checkpoint, build_mlx_lm_model, build_model, parameter_bytes

OURS = "openelm-mlx"
MLX_LM = "mlx-lm"

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

    def __post_init__(self) -> None:
        for name, lowest in (("prompt_tokens", 1), ("gen_tokens", 1), ("trials", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < lowest:
                raise InvalidOptionError(f"{name.replace('_', '-')} must be an integer >= {lowest}, got {value!r}")


@dataclass
class Trial:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_memory_bytes: int  # whole trial (prefill and decode)
    decode_peak_memory_bytes: int  # after the first token
    kv_cache_bytes: int
    tokens: List[int]


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


def ours(checkpoint: Checkpoint, dtype: Optional[str]) -> Implementation:
    """Our model and `decode_tokens` loop; `dtype` None is our per-backend default."""
    compute = dtype or default_dtype(quantized=checkpoint.args.quantization is not None)
    model = build_model(checkpoint, DTYPES[compute])
    options = GenerationOptions()  # greedy; only the last position's logits are computed

    def tokens(prompt, gen_tokens, cache):
        for (token,) in decode_tokens(model, mx.array([prompt]), cache, options, gen_tokens):
            yield token

    return Implementation(OURS, compute, model, lambda: make_cache(len(model.layers)), tokens)


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
    return Trial(
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
            prompt: Optional[Sequence[int]] = None,
            progress: Callable[[str], None] = lambda _: None) -> List[Measurement]:
    """Time ours (and mlx-lm's with `settings.vs_mlx_lm`) on `checkpoint`, trials interleaved.

    `dtype` forces one compute dtype on every implementation; None lets each take its default.
    """
    prompt = list(prompt) if prompt is not None else prompt_ids(checkpoint.args.vocab_size, settings)
    context = checkpoint.args.max_context_length
    if len(prompt) + settings.gen_tokens > context:
        raise InvalidOptionError(f"{len(prompt)} prompt + {settings.gen_tokens} generated tokens exceed the "
                                 f"model's {context}-token context: lower --prompt-tokens or --gen-tokens")
    builders = [ours] + ([mlx_lm] if settings.vs_mlx_lm else [])
    impls = [build(checkpoint, dtype) for build in builders]
    results = [Measurement(impl=i.name, checkpoint=checkpoint, compute_dtype=i.compute_dtype, requested_dtype=dtype,
                           prompt_tokens=len(prompt), gen_tokens=settings.gen_tokens,
                           weight_bytes=parameter_bytes(i.model)) for i in impls]
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
    del impls
    mx.clear_cache()
    return results
