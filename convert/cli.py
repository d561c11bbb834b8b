"""`openelm-mlx convert` (and `python -m openelm_mlx.convert`): arguments to ConvertOptions."""

from __future__ import annotations

import argparse
from pathlib import Path

from openelm_mlx.errors import ConfigError
from openelm_mlx.loading import DEFAULT_DTYPE, DTYPES

from .converter import DEFAULT_BITS, DEFAULT_GROUP_SIZE, ConvertOptions, convert
from .quantize import BITS, GROUP_SIZES
from .recipe import RECIPES
from .writer import DEFAULT_SHARD_GB

DESCRIPTION = (
    "Convert an OpenELM checkpoint to MLX (the format mlx-lm and mlx-community use). SOURCE: a directory "
    "(Apple's HF safetensors, pytorch_model.bin, a CoreNet .pt with its YAML, or an MLX directory), one such "
    "file, or a Hugging Face repo id. PyTorch files are read without torch and without running pickled code. "
    "mlx-lm's spellings work too: --hf-path, --mlx-path, -q/--quantize, --q-bits, --q-group-size."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # SOURCE and OUT may also be given as mlx-lm's --hf-path and --mlx-path (not both spellings at once).
    parser.add_argument("source", metavar="SOURCE", nargs="?",
                        help="checkpoint directory, file, or Hugging Face repo id")
    parser.add_argument("out", metavar="OUT", nargs="?", type=Path,
                        help="output directory (must not exist unless --force)")
    parser.add_argument("--hf-path", metavar="SOURCE", help="SOURCE, as mlx-lm spells it")
    parser.add_argument("--mlx-path", metavar="OUT", type=Path, help="OUT, as mlx-lm spells it")
    parser.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE,
                        help="dtype of unquantized tensors and of scales (default %(default)s)")
    parser.add_argument("--bits", "--q-bits", type=int, choices=BITS,
                        help="quantize Linear layers and the tied embedding")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help=f"quantize at {DEFAULT_BITS} bits unless --bits says otherwise (mlx-lm's spelling)")
    parser.add_argument("--group-size", "--q-group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="weights per quantization group (default %(default)s)")
    parser.add_argument("--recipe", choices=RECIPES, default="uniform",
                        help="uniform: every module at --bits; mixed: the size of uniform --bits, with bits moved "
                             "to the modules whose error moves the output most (measured)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model to ship with the output (and to measure with)")
    parser.add_argument("--config", type=Path,
                        help="config.json, or a CoreNet training YAML, when it is not beside the weights")
    parser.add_argument("--calibration-file", type=Path,
                        help="a text file: the mixed recipe measures on it and the quality report adds it")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip the quality report (it holds the unquantized model in float32 in memory)")
    parser.add_argument("--keep-vocab-padding", action="store_true",
                        help="keep CoreNet's padded vocabulary rows past 32000")
    parser.add_argument("--max-shard-size", type=float, default=DEFAULT_SHARD_GB, metavar="GB",
                        help="split model.safetensors above this size (default %(default)s GB)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is an earlier output of this converter or an empty directory")
    parser.add_argument("--force-float16", action="store_true", help="allow float16 even where it overflows (3B)")


def register(subparsers) -> None:
    """Add the `convert` subcommand to the openelm-mlx parser."""
    parser = subparsers.add_parser("convert", help="convert a checkpoint to MLX (and quantize it)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """The conversion settings the parsed arguments ask for, whichever spelling (ours or mlx-lm's) gave them."""
    source = _one_of(args.source, args.hf_path, "SOURCE", "--hf-path")
    out = _one_of(args.out, args.mlx_path, "OUT", "--mlx-path")
    bits = args.bits if args.bits is not None else (DEFAULT_BITS if args.quantize else None)
    return ConvertOptions(
        source=source, out=out, dtype=args.dtype, bits=bits, group_size=args.group_size,
        recipe=args.recipe, tokenizer=args.tokenizer, config=args.config, calibration_file=args.calibration_file,
        force=args.force, force_float16=args.force_float16, keep_vocab_padding=args.keep_vocab_padding,
        report=args.report, max_shard_gb=args.max_shard_size,
    )


def _one_of(positional, option, positional_name: str, option_name: str):
    if positional is not None and option is not None:
        raise ConfigError(f"{positional_name} was given twice (as {positional_name} and as {option_name}): "
                          "give it once")
    if positional is None and option is None:
        raise ConfigError(f"{positional_name} is missing: give it as an argument (or as {option_name})")
    return positional if positional is not None else option


def run(args: argparse.Namespace) -> int:
    convert(options_from_args(args))
    return 0

