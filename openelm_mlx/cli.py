"""The `openelm-mlx` command. Subcommands: generate, convert, bench, chat, serve."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from . import __version__
from .convert.cli import register as register_convert
from .errors import OpenELMError
from .generation import GenerationOptions

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling flags shared by every subcommand that generates text."""
    d = _DEFAULTS
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="most tokens to generate (default %(default)s)")
    parser.add_argument("--temperature", "--temp", type=float, default=d["temperature"], help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=d["top_k"], help="sample from the k likeliest tokens; 0 is off")
    parser.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass; 1 is off")
    parser.add_argument("--min-p", type=float, default=d["min_p"], help="drop tokens below min-p x the top probability; 0 is off")
    parser.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"], help="1 is off; Apple's cards use 1.2")
    parser.add_argument("--repetition-context-size", type=int, default=d["repetition_context_size"],
                        help="how many recent tokens the penalty looks at (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; never printed)")
    parser.add_argument("--sliding-window", action="store_true",
                        help="keep generating past the 2048-token context by dropping the oldest tokens")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory, Hugging Face repo id, or synthetic:SIZE (random weights of a real "
                             "architecture: 270M, 450M, 1_1B, 3B)")
    parser.add_argument("--tokenizer", help="tokenizer.model (the Llama-2 SentencePiece model) if the model has none")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: bfloat16 on GPUs; on the CPU float32 with an optimized BLAS or "
                             "quantized weights, else bfloat16)")
    parser.add_argument("--force-float16", action="store_true", help="allow float16 even where it overflows (3B)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openelm-mlx", description="Run Apple's OpenELM models with MLX.")
    parser.add_argument("--version", action="version", version=f"openelm-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Stream a completion to stdout; statistics go to stderr.")
    _add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="prompt text; '-' reads it from stdin")
    gen.add_argument("--quiet", action="store_true", help="print no statistics")
    _add_sampling_options(gen)
    gen.set_defaults(run=cmd_generate)
    from . import chat, server  # their subcommands live with them
    from .bench.cli import register as register_bench

    register_convert(sub)
    register_bench(sub)
    chat.register(sub)
    server.register(sub)
    return parser


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, stop=tuple(args.stop),
        sliding_window=args.sliding_window,
    )


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for --model, including synthetic:SIZE."""
    from .config import ModelArgs
    from .loading import DTYPES, check_float16, default_dtype, load
    from .synthetic import PREFIX, synthetic_model
    from .tokenizer import Tokenizer, find_tokenizer

    if args.model.startswith(PREFIX):
        tokenizer = Tokenizer(find_tokenizer(None, args.tokenizer))  # fail fast, before the build
        size, dtype = args.model[len(PREFIX):], DTYPES[args.dtype or default_dtype()]
        check_float16(ModelArgs.from_preset(size), dtype, args.force_float16)
        model = synthetic_model(size, dtype=dtype)
        print(f"[synthetic model: random weights of the real {size} architecture; "
              "its text is gibberish]", file=sys.stderr)
        return model, tokenizer
    return load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, force_float16=args.force_float16)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import stream_generate

    options = options_from_args(args)  # validate before the slow load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_from_args(args)
    last = None
    for last in stream_generate(model, tokenizer, prompt, options):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet and last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s, time to first token "
              f"{last.ttft_s * 1000:.0f} ms\ngeneration: {last.generation_tokens} tokens, "
              f"{last.generation_tps:.1f} tokens/s, finish reason: {last.finish_reason}\n"
              f"peak memory: {last.peak_memory_bytes / 1e9:.3f} GB", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OpenELMError as e:
        print(f"openelm-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
