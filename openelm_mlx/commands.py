"""The `openelm-mlx` parser with every subcommand, and the `generate` command.

Imports mlx (through the subcommands): `openelm_mlx.cli.main` imports this module only after it has put
the BLAS in place.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .bench.cli import register as register_bench
from .chat import register as register_chat
from .cli_args import (add_draft_options, add_model_options, add_sampling_options, context_full_notice,
                       drafter_from_args, load_from_args, options_from_args, speculation_summary)
from .convert.cli import register as register_convert
from .eval_command import register as register_eval
from .generation import stream_generate
from .perplexity import register as register_perplexity
from .prompt_format import (RAW, Message, add_system_prompt_option, add_template_options, conversation_ids,
                            template_from_args)
from .server import register as register_serve


def build_parser() -> argparse.ArgumentParser:
    """The whole `openelm-mlx` command line."""
    parser = argparse.ArgumentParser(prog="openelm-mlx", description="Run Apple's OpenELM models with MLX.")
    parser.add_argument("--version", action="version", version=f"openelm-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_generate(sub)
    register_convert(sub)
    register_bench(sub)
    register_chat(sub)
    register_serve(sub)
    register_perplexity(sub)
    register_eval(sub)
    return parser


def _register_generate(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="generate text from a prompt",
        description="Stream a completion to stdout; statistics go to stderr. An Instruct model's prompt becomes "
                    "the user's turn of its chat template (as mlx_lm.generate does); --ignore-chat-template "
                    "sends it as it is. Base models always get the prompt as it is.")
    add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="prompt text; '-' reads it from stdin")
    add_template_options(gen)
    add_system_prompt_option(gen)
    gen.add_argument("--quiet", action="store_true", help="print no statistics")
    add_sampling_options(gen)
    add_draft_options(gen)
    gen.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """`openelm-mlx generate`: the completion to stdout, statistics to stderr."""
    options = options_from_args(args)  # validate before the slow load
    template = template_from_args(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_from_args(args)
    draft = drafter_from_args(args, model, tokenizer)
    if template is RAW and not args.system:
        prompt = text  # plain text, exactly as given
    else:
        system = [Message("system", args.system)] if args.system else []
        prompt = conversation_ids(tokenizer, template, system + [Message("user", text)])
    last = None
    for last in stream_generate(model, tokenizer, prompt, options, draft=draft):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and last.context_full:
        print(context_full_notice(model.args.max_context_length), file=sys.stderr)
    if not args.quiet and last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s, time to first token "
              f"{last.ttft_s * 1000:.0f} ms\ngeneration: {last.generation_tokens} tokens, "
              f"{last.generation_tps:.1f} tokens/s, finish reason: {last.finish_reason}\n"
              f"peak memory: {last.peak_memory_bytes / 1e9:.3f} GB", file=sys.stderr)
        if draft is not None:
            print(speculation_summary(last), file=sys.stderr)
    return 0
