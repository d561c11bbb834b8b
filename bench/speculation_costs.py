"""What speculative decoding could gain on a target/draft pair: verify-pass and draft-step costs, and
the speedups they imply for given acceptance rates.

    python -m openelm_mlx.bench.speculation_costs [--target 3B] [--draft 270M] [--max-k 8] [--vs-mlx-lm]

Builds synthetic (random-weight) models of the two sizes and times, after a --context-token cache: a
target forward over k+1 new tokens (a verify pass with k drafts, every position's logits) for k = 0
(the 1-token decode step) to --max-k, and a 1-token draft step. With --vs-mlx-lm, mlx-lm's OpenELM
models on the very same arrays (no copy) are timed in the same run, trials interleaved with ours
(one timer: bench.forward.measure_interleaved). From the costs in units of a target step, for a
per-token acceptance rate a: a round with k drafts yields (1 - a^(k+1)) / (1 - a) tokens on average
and costs verify(k) + k x draft_step, so the speedup over plain decoding (1 token per step) is their
ratio. Random weights cannot show real acceptance rates: the rates are assumptions, the costs are
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .forward import DEFAULT_CONTEXT, measure_interleaved

DEFAULT_TARGET = "3B"
DEFAULT_DRAFT = "270M"
DEFAULT_MAX_K = 8
DEFAULT_RATES = (0.5, 0.7, 0.9)
DEFAULT_REPEATS = 3


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one round with k drafts yields on average when each draft is accepted with probability
    `rate` (independently, until the first rejection), counting the target's own token."""
    return float(k + 1) if rate == 1 else (1 - rate ** (k + 1)) / (1 - rate)


def speedups(verify: Sequence[float], draft_step: float, rates: Sequence[float]) -> Dict[float, List[float]]:
    """Rate -> speedup over plain decoding for k = 1..len(verify): `verify[k-1]` is the cost of a pass
    with k drafts, `draft_step` of one draft step, both in units of a target step."""
    return {rate: [expected_tokens(rate, k) / (cost + k * draft_step) for k, cost in enumerate(verify, 1)]
            for rate in rates}


def measure_costs(target, draft, *, max_k: int = DEFAULT_MAX_K, context: int = DEFAULT_CONTEXT,
                  repeats: int = DEFAULT_REPEATS, vs_mlx_lm: bool = False) -> Dict[str, Dict]:
    """Implementation -> {"step_ms", "verify" [k = 1..max_k, x a step], "draft_step" (x a step)}: ours on
    `target` and `draft`, and mlx-lm's models on the same arrays with `vs_mlx_lm`."""
    from .forward import mlx_workloads

    def costs_workloads(verify_runs, draft_runs):
        return {"verify": verify_runs, "draft": {1: draft_runs[1]}}

    tokens = tuple(range(2, max_k + 2))
    workloads = {"openelm-mlx": costs_workloads(mlx_workloads(target, (), tokens, context)["verify"],
                                                mlx_workloads(draft, (), (), context)["verify"])}
    if vs_mlx_lm:
        theirs_target, theirs_draft = mlx_lm_sharing(target), mlx_lm_sharing(draft)
        workloads["mlx-lm"] = costs_workloads(mlx_lm_verify_workloads(theirs_target, tokens, context),
                                              mlx_lm_verify_workloads(theirs_draft, (), context))
    timings = measure_interleaved(workloads, repeats)
    out = {}
    for impl, kinds in timings.items():
        step = kinds["verify"][1]
        out[impl] = {"step_ms": step, "draft_step_ms": kinds["draft"][1],
                     "verify": [kinds["verify"][n] / step for n in tokens], "draft_step": kinds["draft"][1] / step}
    return out


def mlx_lm_sharing(model):
    """mlx-lm's OpenELM model holding `model`'s own arrays (load_weights takes them as they are: no copy)."""
    from mlx.utils import tree_flatten

    from .checkpoint import mlx_lm_skeleton

    theirs = mlx_lm_skeleton(model.args)
    theirs.load_weights(tree_flatten(model.parameters()), strict=True)
    return theirs


def mlx_lm_verify_workloads(model, tokens: Sequence[int], context: int):
    """Like forward.mlx_workloads' "verify": a forward of n new tokens (every position's logits) on a
    `context`-token mlx-lm cache, trimmed back afterwards; n = 1 is the decode step."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    def prompt(n: int) -> mx.array:
        return mx.random.randint(0, model.args.vocab_size, (1, n), key=mx.random.key(n))

    cache = make_prompt_cache(model)
    mx.eval(model(prompt(context), cache=cache))

    def forward_then_trim(ids):
        def run() -> None:
            mx.eval(model(ids, cache=cache))
            for layer_cache in cache:
                layer_cache.trim(ids.shape[1])
        return run

    return {n: forward_then_trim(prompt(n)) for n in (1, *tokens)}


def format_tables(costs: Dict[str, Dict], rates: Sequence[float]) -> str:
    """Markdown: verify cost per k and draft-step cost for each implementation, then the implied
    speedups per acceptance rate with the best k."""
    names = list(costs)
    max_k = len(next(iter(costs.values()))["verify"])
    lines = ["| k drafts (pass of k+1 tokens) | " + " | ".join(f"{n} verify (x step)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for k in range(1, max_k + 1):
        lines.append(f"| {k} | " + " | ".join(f"{costs[n]['verify'][k - 1]:.2f}" for n in names) + " |")
    lines.append("| target step | " + " | ".join(f"{costs[n]['step_ms']:.1f} ms" for n in names) + " |")
    lines.append("| draft step (x target step) | "
                 + " | ".join(f"{costs[n]['draft_step']:.3f} ({costs[n]['draft_step_ms']:.1f} ms)" for n in names)
                 + " |")
    for name in names:
        table = speedups(costs[name]["verify"], costs[name]["draft_step"], rates)
        lines += ["", f"{name}: speedup over plain decoding if each draft is accepted with probability a",
                  "| a | " + " | ".join(f"k={k}" for k in range(1, max_k + 1)) + " | best k |",
                  "|---|" + "---|" * (max_k + 1)]
        for rate, row in table.items():
            best = max(range(max_k), key=row.__getitem__)
            lines.append(f"| {rate} | " + " | ".join(f"{s:.2f}" for s in row) + f" | {best + 1} (x{row[best]:.2f}) |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.speculation_costs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="synthetic target size (default %(default)s)")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="synthetic draft size (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of both models (default %(default)s; the 3B needs 12 GB in float32)")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="most drafts per pass (default %(default)s)")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help="cached tokens before each pass (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per figure (default %(default)s)")
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES),
                        help="assumed per-token acceptance rates (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="BLAS threads (default: the BLAS's own)")
    parser.add_argument("--vs-mlx-lm", action="store_true",
                        help="also time mlx-lm's OpenELM models on the same arrays, interleaved with ours")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the costs and speedups as JSON")
    args = parser.parse_args(argv)
    from ..config import PRESETS

    for name, size in (("--target", args.target), ("--draft", args.draft)):
        if size not in PRESETS:
            parser.error(f"{name}: unknown size {size!r}; use one of " + ", ".join(PRESETS))
    if args.max_k < 1 or args.repeats < 1 or args.context < 1:
        parser.error("--max-k, --repeats and --context must be positive")
    if not all(0 <= rate <= 1 for rate in args.rates):
        parser.error("--rates must be between 0 and 1")
    if args.threads:  # before the BLAS starts its thread pool
        for var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    from ..blas import use_optimized_blas

    use_optimized_blas()
    from ..blas import describe_blas
    from ..loading import DTYPES
    from ..synthetic import synthetic_model

    dtype = DTYPES[args.dtype]
    print(f"[building synthetic {args.target} target and {args.draft} draft, {args.dtype}; BLAS: {describe_blas()}]",
          file=sys.stderr, flush=True)
    target = synthetic_model(args.target, dtype=dtype)
    draft = synthetic_model(args.draft, dtype=dtype, seed=1)
    costs = measure_costs(target, draft, max_k=args.max_k, context=args.context, repeats=args.repeats,
                          vs_mlx_lm=args.vs_mlx_lm)
    print(f"synthetic {args.target} target, synthetic {args.draft} draft, {args.dtype}, {args.context}-token "
          f"context, median of {args.repeats}; speedups assume the acceptance rates (random weights cannot "
          "show real ones)")
    print(format_tables(costs, args.rates))
    if args.json:
        records = {impl: {**c, "speedups": {str(r): s for r, s in speedups(c["verify"], c["draft_step"],
                                                                            args.rates).items()}}
                   for impl, c in costs.items()}
        args.json.write_text(json.dumps({"target": args.target, "draft": args.draft, "dtype": args.dtype,
                                         "context": args.context, "costs": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
