"""`openelm-mlx bench`: measure prefill/decode speed, memory and bandwidth; optionally against mlx-lm."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

from ..config import PRESETS
from ..cli_args import DRAFT_LENGTH_HELP, draft_length_arg
from ..drafting import PROMPT_LOOKUP_NGRAM
from ..errors import InvalidOptionError
from .runner import PAPER_GEN_TOKENS, PAPER_PROMPT, BenchSettings

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BenchSettings)}
DEFAULT_SIZE = "270M"
SYNTHETIC_DRAFT_PREFIX = "synthetic:"  # --draft-model synthetic:SIZE
DEFAULT_GROUP_SIZE = 64  # mlx-lm's and Apple's MLX port's
DTYPE_CHOICES = ["default", "bfloat16", "float16", "float32"]
BITS_CHOICES = [0, 2, 3, 4, 5, 6, 8]


def register(subparsers) -> None:
    """Add the `bench` subcommand to the `openelm-mlx` parser."""
    d = _DEFAULTS
    p = subparsers.add_parser(
        "bench", help="measure speed, memory and bandwidth (optionally against mlx-lm)",
        description="Time prefill and greedy decode after an uncounted warm-up. Without --model it builds a "
                    "synthetic (random-weight, bfloat16) model of the real architecture: it runs offline, and "
                    "speed does not depend on weight values. Repeat --size/--dtype/--bits for several "
                    "configurations.")
    p.add_argument("--model", help="model directory or Hugging Face repo id (default: synthetic --size)")
    p.add_argument("--size", action="append", choices=list(PRESETS), help=f"synthetic model size (default {DEFAULT_SIZE}; repeatable)")
    p.add_argument("--dtype", action="append", choices=DTYPE_CHOICES,
                   help="compute dtype for every implementation; 'default' lets each choose (ours: per backend; "
                        "mlx-lm: the checkpoint's). Repeatable; default: default")
    p.add_argument("--bits", action="append", type=int, choices=BITS_CHOICES,
                   help="quantize the checkpoint to N bits for every implementation; 0 keeps it unquantized "
                        "(default 0; repeatable)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=[32, 64, 128],
                   help="quantization group size (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=d["prompt_tokens"], help="prompt length (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, help=f"tokens to generate (default {d['gen_tokens']}; "
                                                  f"{PAPER_GEN_TOKENS} with --paper)")
    p.add_argument("--trials", type=int, default=d["trials"], help="measured trials (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="uncounted warm-up trials (default %(default)s)")
    p.add_argument("--vs-mlx-lm", action="store_true",
                   help="also run mlx-lm's OpenELM model and generate_step loop on the same weights, trials interleaved")
    p.add_argument("--paper", action="store_true",
                   help="Apple's MLX benchmark method: CoreNet's 36-token Treasure Island prompt, "
                        f"{PAPER_GEN_TOKENS} greedy tokens (needs the tokenizer)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--draft-model", metavar="PATH|REPO|synthetic:SIZE",
                       help="also decode speculatively with this draft model (synthetic:SIZE: random weights, "
                            "for the verify cost only) and report the speedup, acceptance rate, tokens per target "
                            "pass and verify-pass cost; with --vs-mlx-lm, mlx-lm's speculative decoding too")
    which.add_argument("--prompt-lookup", nargs="?", type=int, const=PROMPT_LOOKUP_NGRAM, metavar="N",
                       help=f"also decode speculatively with prompt lookup (n-grams up to N, default "
                            f"{PROMPT_LOOKUP_NGRAM}); mlx-lm has none")
    p.add_argument("--num-draft-tokens", type=draft_length_arg, metavar="K|auto",
                   help=DRAFT_LENGTH_HELP.format(default=d["num_draft_tokens"]))
    p.add_argument("--tokenizer", help="tokenizer.model for --paper when the model has none")
    p.add_argument("--force-float16", action="store_true", help="allow float16 even where it overflows (3B)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the records as a JSON array")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="bar chart of tokens/s (needs matplotlib)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ModelArgs
    from ..loading import DTYPES, check_float16
    from . import report
    from .checkpoint import directory_checkpoint, quantized, synthetic_checkpoint
    from .runner import measure
    from .system import system_info

    if args.model and args.size:
        raise InvalidOptionError("give --model or --size, not both (--size picks a synthetic model)")
    gen_tokens = args.gen_tokens
    if gen_tokens is None:
        gen_tokens = PAPER_GEN_TOKENS if args.paper else _DEFAULTS["gen_tokens"]
    speculative = args.draft_model is not None or args.prompt_lookup is not None
    if args.num_draft_tokens is not None and not speculative:
        raise InvalidOptionError("--num-draft-tokens needs --draft-model or --prompt-lookup")
    settings = BenchSettings(prompt_tokens=args.prompt_tokens, gen_tokens=gen_tokens, trials=args.trials,
                             warmup=args.warmup, vs_mlx_lm=args.vs_mlx_lm, prompt_lookup=args.prompt_lookup,
                             num_draft_tokens=_DEFAULTS["num_draft_tokens"] if args.num_draft_tokens is None
                             else args.num_draft_tokens)
    for path in (args.json, args.plot):
        if path is not None and not path.parent.is_dir():
            raise InvalidOptionError(f"cannot write {path}: no such directory {path.parent}")
    if args.plot:
        report.check_plot_available()
    prompt = _paper_prompt(args) if args.paper else None
    dtypes = [None if d == "default" else d for d in dict.fromkeys(args.dtype or ["default"])]
    bits_list = list(dict.fromkeys(args.bits or [0]))

    def progress(message: str) -> None:
        print(f"[{message}]", file=sys.stderr, flush=True)

    draft_base = _draft_checkpoint(args.draft_model, progress) if args.draft_model else None
    system = system_info()
    groups = []
    for size in ([None] if args.model else (args.size or [DEFAULT_SIZE])):
        if args.model:
            progress(f"loading {args.model}")
            base = directory_checkpoint(args.model)
        else:
            progress(f"building synthetic {size} (random bfloat16 weights of the real architecture)")
            base = synthetic_checkpoint(ModelArgs.from_preset(size), f"synthetic {size}")
        for dtype in dtypes:
            if dtype is not None:
                check_float16(base.args, DTYPES[dtype], args.force_float16)
        for bits in bits_list:
            checkpoint = quantized(base, bits=bits, group_size=args.group_size) if bits else base
            draft = quantized(draft_base, bits=bits, group_size=args.group_size) if bits and draft_base else draft_base
            for dtype in dtypes:
                progress(f"measuring {checkpoint.name}, bits {bits or '-'}, dtype {dtype or 'default'}")
                groups.append(measure(checkpoint, settings, dtype=dtype, prompt=prompt, draft=draft,
                                      progress=progress))
        del base
    rows = report.records(groups, system)
    print(report.table(rows, system))
    if args.json:
        report.write_json(rows, args.json)
    if args.plot:
        report.write_plot(rows, args.plot)
    return 0


def _draft_checkpoint(source: str, progress):
    """The draft model's checkpoint: a directory or repo, or synthetic:SIZE (random weights, seed 1 so it
    differs from a synthetic target of the same size)."""
    from ..config import ModelArgs
    from .checkpoint import directory_checkpoint, synthetic_checkpoint

    if not source.startswith(SYNTHETIC_DRAFT_PREFIX):
        progress(f"loading draft {source}")
        return directory_checkpoint(source)
    size = source[len(SYNTHETIC_DRAFT_PREFIX):]
    if size not in PRESETS:
        raise InvalidOptionError(f"--draft-model {source}: unknown size {size!r}; use synthetic:SIZE with SIZE one of "
                                 + ", ".join(PRESETS))
    progress(f"building synthetic draft {size} (random bfloat16 weights)")
    return synthetic_checkpoint(ModelArgs.from_preset(size), f"synthetic {size}", seed=1)


def _paper_prompt(args: argparse.Namespace) -> List[int]:
    """CoreNet's timing prompt, BOS first, with the real tokenizer (36 tokens with Llama-2's)."""
    from ..tokenizer import Tokenizer, find_tokenizer

    model_dir: Optional[Path] = Path(args.model).expanduser() if args.model else None
    if model_dir is not None and not model_dir.is_dir():
        model_dir = None  # a hub repo id: its tokenizer, if any, is not downloaded yet
    return Tokenizer(find_tokenizer(model_dir, args.tokenizer)).encode(PAPER_PROMPT)
