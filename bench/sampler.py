"""What sampling costs per token, ours against mlx-lm's, measured in one process.

    python -m openelm_mlx.bench.sampler [--tokens N] [--repeats R] [--no-model]

Two measurements for each sampler setting:
- `logits`: the sampler alone on [1, vocab] float32 logits, evaluated token by token (as the decode
  loop reads each token). Ours compiled and op by op, and mlx-lm's `make_sampler`, which is given
  log-probabilities as its `generate_step` gives it (the logsumexp its loop runs first is not counted).
- `decode`: a whole decode step of a tiny random model with a 32000-token vocabulary (the sampler
  is then a large part of the step): our `decode_tokens` against mlx-lm's `generate_step`.

Runs are interleaved and alternate which goes first; each figure is the median over repeats of the
mean ms/token of a repeat, after an uncounted warm-up. mlx-lm applies top-p and min-p before top-k,
so "all three" and "top-k 40 + top-p 0.9" draw from different distributions there (same cost shape).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler as make_mlx_lm_sampler

from ..cache import make_cache
from ..config import ModelArgs
from ..errors import InvalidOptionError
from ..generation import GenerationOptions
from ..sampling import make_sampler
from ..streaming import decode_tokens
from .checkpoint import build_mlx_lm_model, build_model, synthetic_checkpoint

VOCAB = 32000  # Llama-2's
TEMPERATURE = 1.0

# name -> our make_sampler options (mlx-lm's spelling differs only in "off" for top_p: 0 there, 1 here).
SETTINGS: Dict[str, dict] = {
    "temperature only": {},
    "top-k 40": {"top_k": 40},
    "top-p 0.9": {"top_p": 0.9},
    "min-p 0.05": {"min_p": 0.05},
    "top-k 40 + top-p 0.9": {"top_k": 40, "top_p": 0.9},
    "all three": {"top_k": 40, "top_p": 0.9, "min_p": 0.05},
}

# A tiny OpenELM whose decode step is cheap next to a 32000-way sampler.
TINY_MODEL = {"num_transformer_layers": 2, "model_dim": 64, "head_dim": 16, "vocab_size": VOCAB,
              "ffn_multipliers": [0.5, 4.0], "num_query_heads": [4, 4], "num_kv_heads": [1, 1], "ffn_dim_divisor": 32}
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class SamplerBenchSettings:
    """How to measure. Every default lives here (the command line reads them from this class)."""

    tokens: int = 50  # per repeat
    repeats: int = 7
    warmup: int = 10  # tokens, uncounted
    model: bool = True  # also time the decode step of a tiny model
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lowest in (("tokens", 2), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < lowest:
                raise InvalidOptionError(f"{name} must be an integer >= {lowest}, got {value!r}")


@dataclass
class Row:
    measurement: str  # "logits" or "decode"
    setting: str
    ms_per_token: Dict[str, float]  # implementation -> median ms/token


def mlx_lm_options(options: dict) -> dict:
    return {"top_k": options.get("top_k", 0), "top_p": options.get("top_p", 0.0), "min_p": options.get("min_p", 0.0)}


def _median_ms(runs: Dict[str, Callable[[int], None]], settings: SamplerBenchSettings) -> Dict[str, float]:
    """Median over repeats of ms/token; `runs[name](n)` produces n tokens. Interleaved, order alternating."""
    for run in runs.values():
        run(settings.warmup)
    per_token: Dict[str, List[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(settings.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name](settings.tokens)
            per_token[name].append((time.perf_counter() - start) * 1e3 / settings.tokens)
    return {name: statistics.median(times) for name, times in per_token.items()}


def _sampler_run(sample: Callable[[mx.array], mx.array], logits: mx.array) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            mx.eval(sample(logits))

    return run


def measure_logits(settings: SamplerBenchSettings) -> List[Row]:
    """The samplers alone on [1, VOCAB] logits (global random state, as without a seed)."""
    rng = np.random.default_rng(settings.seed)
    logits = mx.array(rng.standard_normal((1, VOCAB)).astype(np.float32) * 3)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(logits, logprobs)
    rows = []
    for name, options in SETTINGS.items():
        runs = {
            "ours": _sampler_run(make_sampler(TEMPERATURE, **options), logits),
            "ours uncompiled": _sampler_run(make_sampler(TEMPERATURE, **options, compiled=False), logits),
            "mlx-lm": _sampler_run(make_mlx_lm_sampler(TEMPERATURE, **mlx_lm_options(options)), logprobs),
        }
        rows.append(Row("logits", name, _median_ms(runs, settings)))
    return rows


def measure_decode(settings: SamplerBenchSettings) -> List[Row]:
    """Decode steps of a tiny float32 model, greedy and with each sampler, ours and mlx-lm's loop."""
    checkpoint = synthetic_checkpoint(ModelArgs.from_dict(TINY_MODEL), "tiny", seed=settings.seed)
    ours, theirs = build_model(checkpoint, mx.float32), build_mlx_lm_model(checkpoint, mx.float32)
    prompt = np.random.default_rng(settings.seed).integers(3, VOCAB, size=PROMPT_TOKENS).tolist()

    def our_run(options: GenerationOptions) -> Callable[[int], None]:
        def run(n: int) -> None:
            # n steps after the first token (prefill excluded, as in the per-token figure)
            tokens = decode_tokens(ours, prompt, make_cache(len(ours.layers)), options, n + 1)
            next(tokens)
            for _ in tokens:
                pass

        return run

    def their_run(sampler) -> Callable[[int], None]:
        def run(n: int) -> None:
            tokens = generate_step(mx.array(prompt), theirs, max_tokens=n + 1, sampler=sampler,
                                   prompt_cache=make_prompt_cache(theirs))
            next(tokens)
            for _ in tokens:
                pass

        return run

    rows = []
    cases = {"greedy": None, **SETTINGS}
    for name, options in cases.items():
        temperature = 0.0 if options is None else TEMPERATURE
        options = options or {}
        runs = {
            "ours": our_run(GenerationOptions(temperature=temperature, **options)),
            "mlx-lm": their_run(make_mlx_lm_sampler(temperature, **mlx_lm_options(options))),
        }
        rows.append(Row("decode", name, _median_ms(runs, settings)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """One line per measurement and setting: ms/token of each implementation, and mlx-lm / ours."""
    impls = ["ours", "ours uncompiled", "mlx-lm"]
    lines = [f"{'':8} {'setting':22} " + " ".join(f"{i:>15}" for i in impls) + f" {'mlx-lm/ours':>12}"]
    for row in rows:
        cells = " ".join(f"{row.ms_per_token[i]:15.3f}" if i in row.ms_per_token else f"{'-':>15}" for i in impls)
        ratio = row.ms_per_token["mlx-lm"] / row.ms_per_token["ours"]
        lines.append(f"{row.measurement:8} {row.setting:22} {cells} {ratio:11.2f}x")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure and print the table (ms/token); exit 2 with one line on a bad option."""
    defaults = SamplerBenchSettings()
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.sampler", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens per repeat (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeats; the median is reported (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="uncounted warm-up tokens (default %(default)s)")
    parser.add_argument("--no-model", action="store_true", help="only the samplers on logits, not the tiny model's decode step")
    args = parser.parse_args(argv)
    try:
        settings = SamplerBenchSettings(tokens=args.tokens, repeats=args.repeats, warmup=args.warmup,
                                        model=not args.no_model)
    except InvalidOptionError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"MLX {mx.__version__} on {mx.default_device()}; ms/token, median of {settings.repeats} repeats "
          f"of {settings.tokens} tokens; vocabulary {VOCAB}, temperature {TEMPERATURE}", flush=True)
    rows = measure_logits(settings)
    if settings.model:
        rows += measure_decode(settings)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
