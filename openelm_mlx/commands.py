"""The `openelm-mlx` parser with every subcommand, and the `generate` command.

Imports mlx (through the subcommands): `openelm_mlx.cli.main` imports this module only after it has put
the BLAS in place.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from . import __version__
from .bench.cli import register as register_bench
from .chat import register as register_chat
from .cli_args import (add_constraint_options, add_draft_options, add_kv_cache_options, add_model_options,
                       add_sampling_options, constraint_from_args, context_full_notice, drafter_from_args,
                       load_from_args, options_from_args, speculation_summary)
from .convert.cli import register as register_convert
from .errors import ContextLengthError, OpenELMError
from .eval_command import register as register_eval
from .generation import GenerationOptions, new_cache
from .perplexity import register as register_perplexity
from .prompt_files import SUFFIX, cached_prefix, check_writable, save_prompt_cache
from .prompt_format import (RAW, Message, add_system_prompt_option, add_template_options, conversation_ids,
                            template_from_args)
from .server import register as register_serve
from .streaming import stream_generate


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
    _register_cache_prompt(sub)
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
    add_kv_cache_options(gen)
    gen.add_argument("--prompt-cache", metavar="FILE",
                     help="start from a KV cache written by openelm-mlx cache-prompt (the prompt must begin with "
                          "its text); only the rest of the prompt is prefilled")
    add_draft_options(gen)
    add_constraint_options(gen)
    gen.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """`openelm-mlx generate`: the completion to stdout, statistics to stderr."""
    # Validate before the slow load.
    options = replace(options_from_args(args), constraint=constraint_from_args(args))
    template = template_from_args(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_from_args(args)
    draft = drafter_from_args(args, model, tokenizer)
    if template is RAW and not args.system:
        prompt = text  # plain text, exactly as given
    else:
        system = [Message("system", args.system)] if args.system else []
        prompt = conversation_ids(tokenizer, template, system + [Message("user", text)])
    cache, cached_ids = None, []
    if args.prompt_cache:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        cache, held = cached_prefix(args.prompt_cache, model, ids, options)
        prompt, cached_ids = ids[held:], ids[:held]
    last = None
    for last in stream_generate(model, tokenizer, prompt, options, cache=cache, context_ids=cached_ids,
                                draft=draft):
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
        if args.prompt_cache:
            print(f"prompt cache: {len(cached_ids)} tokens from {args.prompt_cache}", file=sys.stderr)
    return 0


def _register_cache_prompt(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache-prompt", help="prefill a prompt and save its KV cache to a file",
        description="Prefill the text of --prompt-file (encoded as it is, with BOS, no chat template) and write "
                    "its KV cache to --out, for generate --prompt-cache and serve --prompt-cache-dir. The file "
                    "only fits the model, dtype and --kv-bits that wrote it.")
    add_model_options(parser)
    parser.add_argument("--prompt-file", required=True, help="the text to cache; '-' reads stdin")
    parser.add_argument("--out", required=True, metavar="CACHE",
                        help=f"the file to write (its name ends in {SUFFIX})")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_kv_cache_options(parser)
    parser.set_defaults(run=cmd_cache_prompt)


def cmd_cache_prompt(args: argparse.Namespace) -> int:
    """`openelm-mlx cache-prompt`: prefill the prompt file and save its cache."""
    out = Path(args.out)
    check_writable(out, force=args.force)  # before the slow load
    options = GenerationOptions(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise OpenELMError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise OpenELMError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    model, tokenizer = load_from_args(args)
    ids = tokenizer.encode(text)
    context = model.args.max_context_length
    if len(ids) >= context:
        raise ContextLengthError(f"the prompt file is {len(ids)} tokens; a cached prompt must leave room in the "
                                 f"{context}-token context: shorten it")
    cache = new_cache(model, options)
    for _ in stream_generate(model, tokenizer, ids, replace(options, max_tokens=0), cache=cache):
        pass  # max_tokens 0: prefill only
    save_prompt_cache(out, model, ids, cache, force=args.force)
    stored = sum(part.nbytes for layer in cache for part in layer.state)  # without spare capacity
    print(f"cached {len(ids)} tokens ({stored / 1e6:.2f} MB of keys and values) in {out}", file=sys.stderr)
    return 0

