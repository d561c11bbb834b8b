"""Quality and memory of the quantized KV cache: `python -m openelm_mlx.bench.kv_quant`.

Each context (--context tokens of the given text files, BOS first) is fed teacher-forced in chunks
through the model with the full-precision cache and with a quantized cache per --bits, all with the
same sliding window, so positions are dropped at the same moments. At every --stride-th position it
compares the next-token distributions: KL(full || quantized) in nats, and whether the top-1 token
agrees. Memory is the bytes each cache holds per position of its capacity (scales and biases included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from ..cache import KV_BITS, KV_GROUP_SIZES, make_cache
from ..loading import load
from ..model import Model


def contexts(ids: List[int], length: int, count: int, bos: int) -> List[List[int]]:
    """Up to `count` non-overlapping windows of `length` tokens (BOS first) from `ids`."""
    body = length - 1
    return [[bos] + ids[i * body:(i + 1) * body] for i in range(min(count, len(ids) // body))]


def compare(model: Model, ids: List[int], *, bits: Sequence[int], group_size: int, window: Optional[int],
            chunk: int, stride: int) -> Dict[int, Dict[str, float]]:
    """Per bit width: KL and top-1 agreement of the quantized cache against the full-precision one over
    `ids` (every `stride`-th position is scored; all are fed), and the bytes each cache holds."""
    layers = len(model.layers)
    full = make_cache(layers, max_size=window)
    quantized = {b: make_cache(layers, max_size=window, kv_bits=b, kv_group_size=group_size) for b in bits}
    sums = {b: {"kl": 0.0, "kl_max": 0.0, "agree": 0} for b in bits}
    scored = 0
    for start in range(0, len(ids), chunk):
        x = mx.array([ids[start:start + chunk]])
        picked = mx.array([i for i in range(x.shape[1]) if (start + i) % stride == 0])
        p_log = log_softmax(model.logits(model.hidden(x, full)[0][picked]).astype(mx.float32))
        for b, cache in quantized.items():
            q_log = log_softmax(model.logits(model.hidden(x, cache)[0][picked]).astype(mx.float32))
            kl = (mx.exp(p_log) * (p_log - q_log)).sum(axis=-1)  # [scored positions]
            same = mx.argmax(p_log, axis=-1) == mx.argmax(q_log, axis=-1)
            mx.eval(kl, same)
            sums[b]["kl"] += kl.sum().item()
            sums[b]["kl_max"] = max(sums[b]["kl_max"], kl.max().item())
            sums[b]["agree"] += same.sum().item()
        scored += picked.size
    full_bytes = sum(c.nbytes for c in full) / full[0].keys.shape[2]
    return {b: {"kl_mean": sums[b]["kl"] / scored, "kl_max": sums[b]["kl_max"],
                "top1_agreement": sums[b]["agree"] / scored, "scored_positions": scored,
                "bytes_per_position_full": full_bytes,
                "bytes_per_position_quantized": sum(c.nbytes for c in quantized[b]) / quantized[b][0].keys[0].shape[2]}
            for b in bits}


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.kv_quant", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--tokenizer", help="tokenizer.model, if the model directory has none")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text", nargs="+", required=True, type=Path, help="text files to take contexts from")
    parser.add_argument("--context", type=int, default=2000, help="tokens per context (default %(default)s)")
    parser.add_argument("--contexts", type=int, default=2, help="how many contexts (default %(default)s)")
    parser.add_argument("--window", type=int, action="append",
                        help="sliding window size (repeatable; default: 256, the docs models' training length)")
    parser.add_argument("--bits", type=int, action="append", choices=KV_BITS, help="default: 8 and 4")
    parser.add_argument("--group-size", type=int, default=32, choices=KV_GROUP_SIZES,
                        help="default %(default)s (the docs models' head_dim is 32)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (default %(default)s)")
    parser.add_argument("--stride", type=int, default=4,
                        help="score every N-th position (all are fed; the logits dominate the cost; default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in args.text)
    ids = tokenizer.encode(text)[1:]  # no BOS: each context gets its own
    samples = contexts(ids, args.context, args.contexts, tokenizer.bos_id)
    if not samples:
        parser.error(f"the text is {len(ids)} tokens, shorter than one {args.context}-token context")
    results = []
    bits = args.bits or [8, 4]
    for window in args.window or [256]:
        started = time.perf_counter()
        runs = [compare(model, sample, bits=bits, group_size=args.group_size, window=window, chunk=args.chunk,
                        stride=args.stride) for sample in samples]
        seconds = round(time.perf_counter() - started, 1)
        for b in bits:
            per = [run[b] for run in runs]
            total = sum(r["scored_positions"] for r in per)
            row = {"window": window, "bits": b, "group_size": args.group_size, "dtype": args.dtype,
                   "contexts": len(per), "context_tokens": args.context, "scored_positions": total,
                   "kl_mean": sum(r["kl_mean"] * r["scored_positions"] for r in per) / total,
                   "kl_max": max(r["kl_max"] for r in per),
                   "top1_agreement": sum(r["top1_agreement"] * r["scored_positions"] for r in per) / total,
                   "bytes_per_position_full": per[0]["bytes_per_position_full"],
                   "bytes_per_position_quantized": per[0]["bytes_per_position_quantized"],
                   "seconds_all_bits": seconds}
            results.append(row)
            ratio = row["bytes_per_position_quantized"] / row["bytes_per_position_full"]
            print(f"window {window:5d}  {b} bits (group {args.group_size}): KL mean {row['kl_mean']:.2e} nats, "
                  f"max {row['kl_max']:.2e}; top-1 agreement {100 * row['top1_agreement']:.2f}% over {total} "
                  f"positions; cache {row['bytes_per_position_quantized']:.0f} B/position vs "
                  f"{row['bytes_per_position_full']:.0f} ({ratio:.3f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
