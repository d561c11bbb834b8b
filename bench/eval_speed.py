"""Scoring speed and agreement against mlx-lm: `python -m openelm_mlx.bench.eval_speed`.

On one MLX checkpoint directory (loadable by both: convert with --tokenizer), in one process:
- perplexity: our `score_continuations` and `mlx_lm.perplexity.eval_ppl` on the same non-overlapping
  chunks of a text (same tokens scored, so the mean NLLs must agree), then our strided default;
- log-likelihood: our lm-evaluation-harness class and `mlx_lm.evaluate.MLXLM` on the same requests
  (a local multiple-choice task's), with the largest difference between their answers.
Time is reported per 1,000 scored tokens (continuation tokens for log-likelihood). Imports mlx_lm
(and through it transformers): a benchmark, never the runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from ..loading import load
from ..perplexity import perplexity
from ..scoring import DEFAULT_BATCH_SIZE, score_continuations


def timed(fn: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def perplexity_rows(model_dir: str, dtype: Optional[str], ids: List[int], context: int,
                    batch_size: int) -> Dict[str, Dict]:
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.perplexity import eval_ppl

    ours, _ = load(model_dir, dtype=dtype)
    theirs, _ = mlx_lm_load(model_dir)
    count = len(ids) // context
    chunks = [ids[i * context:(i + 1) * context] for i in range(count)]  # mlx-lm's layout: whole chunks
    scored = count * (context - 1)
    requests = [(chunk[:1], chunk[1:]) for chunk in chunks]
    score_continuations(ours, requests[:1], batch_size=batch_size)  # warm-up (compilation, allocation)
    scores, our_s = timed(lambda: score_continuations(ours, requests, batch_size=batch_size))
    with contextlib.redirect_stdout(io.StringIO()):  # eval_ppl prints a progress line
        eval_ppl(theirs, mx.array(chunks[:1]), batch_size=batch_size)
        (their_ppl, _), their_s = timed(lambda: eval_ppl(theirs, mx.array(chunks), batch_size=batch_size))
    our_nll = sum(s.nll for s in scores) / scored
    strided, strided_s = timed(lambda: perplexity(ours, ids, context=context, batch_size=batch_size))
    return {
        "same_chunks": {"tokens": scored, "chunks": count, "context": context,
                        "ours": {"mean_nll": our_nll, "s_per_1k_tokens": 1000 * our_s / scored},
                        "mlx_lm": {"mean_nll": math.log(their_ppl),
                                   "s_per_1k_tokens": 1000 * their_s / scored}},
        "strided": {"tokens": strided.tokens, "windows": strided.windows, "context": strided.context,
                    "stride": strided.stride, "perplexity": strided.perplexity, "mean_nll": strided.mean_nll,
                    "s_per_1k_tokens": 1000 * strided_s / strided.tokens},
    }


def loglikelihood_rows(model_dir: str, dtype: Optional[str], include_path: Path, task: str,
                       batch_size: int) -> Dict[str, Dict]:
    from lm_eval.tasks import TaskManager
    from mlx_lm.evaluate import MLXLM

    from ..evaluation import OpenELMLM

    task_obj = TaskManager(include_path=str(include_path), include_defaults=False).load([task])["tasks"][task]
    task_obj.build_all_requests(limit=None, rank=0, world_size=1)
    requests = [r for r in task_obj.instances if r.request_type == "loglikelihood"]
    model, tokenizer = load(model_dir, dtype=dtype)
    ours = OpenELMLM(model, tokenizer, batch_size=batch_size)
    theirs = MLXLM(model_dir, batch_size=batch_size, use_chat_template=False)
    tokens = sum(len(ours.tok_encode(ctx + cont)) - len(ours.tok_encode(ctx)) for ctx, cont in
                 (r.args for r in requests))
    ours.loglikelihood(requests[:4], disable_tqdm=True)  # warm-up
    our_answers, our_s = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
    with contextlib.redirect_stderr(io.StringIO()):  # MLXLM's own progress bar
        theirs.loglikelihood(requests[:4])
        their_answers, their_s = timed(lambda: theirs.loglikelihood(requests))
    diff = max(abs(a[0] - b[0]) for a, b in zip(our_answers, their_answers))
    return {"requests": len(requests), "continuation_tokens": tokens, "max_abs_diff": diff,
            "ours": {"s_per_1k_tokens": 1000 * our_s / tokens, "s": our_s},
            "mlx_lm": {"s_per_1k_tokens": 1000 * their_s / tokens, "s": their_s}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.eval_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="MLX checkpoint directory with tokenizer files")
    parser.add_argument("--text", required=True, type=Path, help="text for the perplexity rows")
    parser.add_argument("--context", type=int, default=256, help="tokens per window / chunk (default %(default)s)")
    parser.add_argument("--include-path", type=Path, default=Path("tests/data"), help="local task directory")
    parser.add_argument("--task", default="openelm_docs_mc", help="local multiple-choice task (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="our compute dtype (mlx-lm computes in the stored one: pass that to compare like for like)")
    args = parser.parse_args(argv)
    _, tokenizer = load(args.model)
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))
    record = {"model": args.model, "text": str(args.text), "batch_size": args.batch_size, "dtype": args.dtype,
              "perplexity": perplexity_rows(args.model, args.dtype, ids, args.context, args.batch_size),
              "loglikelihood": loglikelihood_rows(args.model, args.dtype, args.include_path, args.task,
                                                  args.batch_size)}
    json.dump(record, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
