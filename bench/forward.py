"""Time the multi-token forward: a fresh prefill, and a verify pass of k+1 tokens after a context.

    python -m openelm_mlx.bench.forward [--size 270M] [--threads 2] [--blas-threads N] [--repeats 5] [--torch]

Prints, for a synthetic (random float32) model: the time of a fresh prefill of each --prefill
length (as generation runs it: the last position's logits only, and the last layer's other rows
skipped, `Model.hidden(..., last=1)`), and the time of a forward over
each --verify count of new tokens after a --context-token cache (logits of every new position, as
speculative verification needs), relative to a 1-token decode step on the same cache. With
--torch, the same for a minimal PyTorch forward of the same math on the same weights (float32,
torch's SDPA, a KV cache; built here, since Apple's modeling code cannot be fetched offline),
whose prefill takes the last position's logits only but runs its last layer in full.
Each figure is the median of --repeats timings after one warm-up; the implementations alternate
within each repeat, so a busy machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

DEFAULT_PREFILL = (64, 128, 512)
DEFAULT_VERIFY = (2, 3, 4, 8, 16)
DEFAULT_CONTEXT = 64

Workloads = Dict[str, Dict[int, Callable[[], None]]]  # "prefill" / "verify" -> token count -> one run
Timings = Dict[str, Dict[int, float]]  # "prefill" / "verify" -> token count -> median ms
# Idle time before each timed run: torch's OpenMP threads spin for up to 200 ms after their last task
# (OpenMP's default block time), and without a pause that spin ran into the next implementation's
# run (an 8-token pass of ours measured 1.99x a step right after torch's runs, 1.36x alone).
SETTLE_S = 0.25


def measure_interleaved(workloads: Dict[str, Workloads], repeats: int) -> Dict[str, Timings]:
    """Median ms of every workload; implementations alternate within each repeat (a shared machine's
    load then hits them alike), each run after `SETTLE_S` of idle. One uncounted warm-up call each."""
    samples: Dict[tuple, List[float]] = {}
    for impl, kinds in workloads.items():
        for kind, runs in kinds.items():
            for n, run in runs.items():
                run()
    first = next(iter(workloads.values()))
    for kind, runs in first.items():
        for n in runs:
            for _ in range(repeats):
                for impl in workloads:
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    workloads[impl][kind][n]()
                    samples.setdefault((impl, kind, n), []).append((time.perf_counter() - start) * 1e3)
    return {impl: {kind: {n: statistics.median(samples[(impl, kind, n)]) for n in runs}
                   for kind, runs in first.items()} for impl in workloads}


def mlx_workloads(model, prefill: Sequence[int], verify: Sequence[int], context: int) -> Workloads:
    """Callables: a fresh prefill per length; a forward of n new tokens on a `context`-token cache,
    trimmed back afterwards (n = 1 is the decode step the others are compared with)."""
    import mlx.core as mx

    from ..cache import make_cache

    def prompt(n: int) -> mx.array:
        return mx.random.randint(0, model.args.vocab_size, (1, n), key=mx.random.key(n))

    def fresh_prefill(ids: mx.array) -> Callable[[], None]:
        def run() -> None:
            hidden = model.hidden(ids, make_cache(len(model.layers)), last=1)
            mx.eval(model.logits(hidden))  # generation needs the last position's logits only
        return run

    cache = make_cache(len(model.layers))
    mx.eval(model(prompt(context), cache))

    def forward_then_trim(ids: mx.array) -> Callable[[], None]:
        def run() -> None:
            mx.eval(model(ids, cache))  # every new position's logits, as a verify pass needs
            for layer_cache in cache:
                layer_cache.trim(ids.shape[1])
        return run

    return {"prefill": {n: fresh_prefill(prompt(n)) for n in prefill},
            "verify": {n: forward_then_trim(prompt(n)) for n in (1, *verify)}}


def torch_workloads(model, prefill: Sequence[int], verify: Sequence[int], context: int) -> Workloads:
    """The same workloads for a minimal PyTorch forward on the MLX model's weights (float32)."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten

    weights = {name: torch.from_numpy(np.array(value, dtype=np.float32))
               for name, value in tree_flatten(model.parameters())}
    forward = _TorchOpenELM(model.args, weights)

    def prompt(n: int) -> torch.Tensor:
        return torch.randint(0, model.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))

    def fresh_prefill(ids: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                forward(ids, [], last_only=True)
        return run

    cache: List = []
    with torch.inference_mode():
        forward(prompt(context), cache, last_only=True)

    def forward_then_trim(ids: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                forward(ids, cache, last_only=False)
            for i, (k, v) in enumerate(cache):
                cache[i] = (k[:, :, :-ids.shape[1]], v[:, :, :-ids.shape[1]])
        return run

    return {"prefill": {n: fresh_prefill(prompt(n)) for n in prefill},
            "verify": {n: forward_then_trim(prompt(n)) for n in (1, *verify)}}


class _TorchOpenELM:
    """OpenELM's forward (spec section 1) in float32 PyTorch with a concatenating KV cache; tied output
    layer and q/k norms, as in every released size. `cache` is a list of (keys, values) per layer."""

    def __init__(self, args, weights):
        self.args, self.w = args, weights

    def __call__(self, ids, cache: List, *, last_only: bool):
        import torch
        import torch.nn.functional as F

        a, w = self.args, self.w
        hd, eps = a.head_dim, a.rms_norm_eps
        T = ids.shape[1]
        past = cache[0][0].shape[2] if cache else 0
        positions = torch.arange(past, past + T, dtype=torch.float32)
        inv_freq = 1.0 / (a.rope_freq_constant ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        # Bottom-right aligned causal mask: new token i sees the past and new tokens 0..i.
        mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool).tril(past)

        def rope(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        def norm(x, weight):
            return F.rms_norm(x, (x.shape[-1],), weight, eps)

        x = w["transformer.token_embeddings.weight"][ids]
        for i in range(a.num_transformer_layers):
            p = f"transformer.layers.{i}."
            nq, nkv = a.num_query_heads[i], a.num_kv_heads[i]
            qkv = (norm(x, w[p + "attn_norm.weight"]) @ w[p + "attn.qkv_proj.weight"].T).view(1, T, nq + 2 * nkv, hd)
            q, k, v = qkv.split([nq, nkv, nkv], dim=2)
            q, k = norm(q, w[p + "attn.q_norm.weight"]), norm(k, w[p + "attn.k_norm.weight"])
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = rope(q), rope(k)
            if len(cache) > i:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            x = x + out.transpose(1, 2).reshape(1, T, nq * hd) @ w[p + "attn.out_proj.weight"].T
            gate, up = (norm(x, w[p + "ffn_norm.weight"]) @ w[p + "ffn.proj_1.weight"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w[p + "ffn.proj_2.weight"].T
        x = norm(x[:, -1:] if last_only else x, w["transformer.norm.weight"])
        return x @ w["transformer.token_embeddings.weight"].T


def format_tables(results: Dict[str, Dict[str, Dict[int, float]]]) -> str:
    """Markdown tables: prefill ms per implementation, and verify cost relative to a step."""
    names = list(results)
    lines = ["| prefill tokens | " + " | ".join(f"{n} ms" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for n in next(iter(results.values()))["prefill"]:
        lines.append(f"| {n} | " + " | ".join(f"{results[name]['prefill'][n]:.0f}" for name in names) + " |")
    lines += ["", "| tokens in the pass | " + " | ".join(f"{n} ms (x step)" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for n in next(iter(results.values()))["verify"]:
        cells = []
        for name in names:
            verify = results[name]["verify"]
            cells.append(f"{verify[n]:.1f} ({verify[n] / verify[1]:.2f}x)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="270M", help="synthetic model size (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--blas-threads", type=int,
                        help="MKL/OpenBLAS threads (default: the BLAS's own; MKL runs on one thread and "
                             "openelm-mlx splits work over CPU streams)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default %(default)s)")
    parser.add_argument("--prefill", type=int, nargs="+", default=list(DEFAULT_PREFILL))
    parser.add_argument("--verify", type=int, nargs="+", default=list(DEFAULT_VERIFY))
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--torch", action="store_true", help="also time a PyTorch forward of the same weights")
    args = parser.parse_args(argv)
    if args.blas_threads:  # before the BLAS starts its thread pool
        for var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.blas_threads)
    from ..blas import use_optimized_blas

    use_optimized_blas()
    import mlx.core as mx

    from ..blas import blas_threads, describe_blas
    from ..synthetic import synthetic_model

    model = synthetic_model(args.size, dtype=mx.float32)
    print(f"synthetic {args.size} float32, BLAS: {describe_blas()}, {blas_threads()} BLAS thread(s); "
          f"torch: {args.threads} threads", file=sys.stderr)
    workloads = {"openelm-mlx": mlx_workloads(model, args.prefill, args.verify, args.context)}
    if args.torch:
        import torch

        torch.set_num_threads(args.threads)
        workloads[f"torch {torch.__version__}"] = torch_workloads(model, args.prefill, args.verify, args.context)
    print(format_tables(measure_interleaved(workloads, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
