"""Perplexity of a text with the strided sliding window, and `openelm-mlx perplexity`.

The method is Hugging Face's "perplexity of fixed-length models": windows of `context` tokens
start every `stride` tokens, and each window scores only the tokens the previous one did not, so
every token after the first window is predicted from at least `context - stride` tokens before it.
The text is encoded with BOS (as Apple's lm-evaluation-harness runs add it); every text token is
scored, the BOS is not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from tqdm import tqdm  # a dependency of huggingface-hub

from .cli_args import add_model_options, load_from_args
from .errors import InvalidOptionError, LoadError
from .model import Model
from .scoring import DEFAULT_BATCH_SIZE, score_continuations

Window = Tuple[int, int, int]  # (begin, first scored token, end): input ids[begin:end], scored ids[first:end]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    tokens: int  # scored tokens (the text's tokens; BOS is not scored)
    windows: int
    context: int
    stride: int


def sliding_windows(num_ids: int, context: int, stride: int) -> List[Window]:
    """The windows over `num_ids` ids (the first, BOS, is context only), each scoring what the last did not."""
    if num_ids < 2:
        raise InvalidOptionError("the text has no tokens to score: give a non-empty text")
    if context < 2:
        raise InvalidOptionError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride < context:
        raise InvalidOptionError(f"--stride must be between 1 and --context - 1 ({context - 1}), got {stride}: "
                                 "each window needs a token of context before what it scores")
    windows, scored_to = [], 1
    for begin in range(0, num_ids, stride):
        end = min(begin + context, num_ids)
        windows.append((begin, scored_to, end))
        scored_to = end
        if end == num_ids:
            break
    return windows


def window_settings(model: Model, context: Optional[int], stride: Optional[int]) -> Tuple[int, int]:
    """(context, stride) with the defaults filled in: the model's context length, half the context."""
    limit = model.args.max_context_length
    context = limit if context is None else context
    if context > limit:
        raise InvalidOptionError(f"--context {context} exceeds the model's {limit}-token context")
    return context, context // 2 if stride is None else stride


def perplexity(model: Model, ids: Sequence[int], *, context: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    """Perplexity of `ids` (begin them with BOS: ids[0] is never scored) with the strided sliding window.

    `context` defaults to the model's context length and `stride` to half the context. `progress`,
    if given, is called with the number of windows each forward pass finished.
    """
    context, stride = window_settings(model, context, stride)
    windows = sliding_windows(len(ids), context, stride)
    ids = [int(t) for t in ids]
    requests = [(ids[begin:first], ids[first:end]) for begin, first, end in windows]
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    total_tokens = sum(score.tokens for score in scores)
    mean = sum(score.nll for score in scores) / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(windows), context, stride)


def register(subparsers) -> None:
    """Add `openelm-mlx perplexity`."""
    p = subparsers.add_parser(
        "perplexity", help="perplexity of a text (strided sliding window)",
        description="Token-level perplexity of a text with the strided sliding window (Hugging Face's method for "
                    "fixed-length models): each window scores only the tokens the previous one did not. The text "
                    "is encoded with BOS; every text token is scored. Scoring is in float32 whatever --dtype.")
    add_model_options(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file; '-' reads stdin")
    p.add_argument("--context", type=int, metavar="N", help="tokens per window (default: the model's context, 2048)")
    p.add_argument("--stride", type=int, metavar="S", help="tokens between window starts (default: half the context)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=cmd_perplexity)


def read_text(path: str) -> str:
    """The text of FILE ('-': stdin), as a one-line error when it cannot be read."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the text {path}: {e}") from None


def cmd_perplexity(args: argparse.Namespace) -> int:
    """`openelm-mlx perplexity`: the result to stdout, the progress bar to stderr."""
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    text = read_text(args.text)
    model, tokenizer = load_from_args(args)
    ids = tokenizer.encode(text)
    context, stride = window_settings(model, args.context, args.stride)
    windows = len(sliding_windows(len(ids), context, stride))
    with tqdm(total=windows, unit="window", desc="perplexity", file=sys.stderr, disable=None) as bar:
        result = perplexity(model, ids, context=context, stride=stride, batch_size=args.batch_size,
                            progress=bar.update)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"perplexity {result.perplexity:.4f}  mean NLL {result.mean_nll:.4f} nats/token  "
              f"{result.tokens:,} tokens  ({result.windows} windows of {result.context}, stride {result.stride})")
    return 0
