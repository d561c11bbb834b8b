"""Command-line arguments (and messages) shared by the subcommands that load a model: generate, chat, serve.

Each subcommand module imports this one; nothing here imports a subcommand, so the command modules
form no circle. The prompt-format flags (--chat-template, --raw) live with the prompt format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

from .cache import KV_BITS, KV_GROUP_SIZES
from .constraints import Constraint
from .drafting import ADAPTIVE, PROMPT_LOOKUP_NGRAM, DraftModel, Drafter, PromptLookup, auto_draft_source
from .generation import GenerationOptions, GenerationResponse
from .loading import load
from .model import Model
from .errors import ConstraintError
from .synthetic import PREFIX as SYNTHETIC_PREFIX
from .tokenizer import Tokenizer

# The one source of the sampling defaults: GenerationOptions.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --dtype, --force-float16."""
    parser.add_argument("--model", required=True,
                        help="model directory, Hugging Face repo id, or synthetic:SIZE (random weights of a real "
                             "architecture: 270M, 450M, 1_1B, 3B)")
    parser.add_argument("--tokenizer", help="tokenizer.model (the Llama-2 SentencePiece model) if the model has none")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: bfloat16 on GPUs; on the CPU float32 with an optimized BLAS or "
                             "quantized weights, else bfloat16)")
    parser.add_argument("--force-float16", action="store_true", help="allow float16 even where it overflows (3B)")


def _add_core_sampling_options(parser) -> None:
    """--max-tokens, --temperature/--temp, --top-k, --top-p, --min-p, --repetition-penalty: generate's
    settings and serve's request defaults."""
    d = _DEFAULTS
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="most tokens to generate (default %(default)s)")
    parser.add_argument("--temperature", "--temp", type=float, default=d["temperature"], help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=d["top_k"], help="sample from the k likeliest tokens; 0 is off")
    parser.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass; 1 is off")
    parser.add_argument("--min-p", type=float, default=d["min_p"], help="drop tokens below min-p x the top probability; 0 is off")
    parser.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"], help="1 is off; Apple's cards use 1.2")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling flags shared by every subcommand that generates text."""
    d = _DEFAULTS
    _add_core_sampling_options(parser)
    parser.add_argument("--repetition-context-size", type=int, default=d["repetition_context_size"],
                        help="how many recent tokens the penalty looks at (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; never printed)")
    parser.add_argument("--sliding-window", action="store_true",
                        help="keep generating past the 2048-token context by dropping the oldest tokens")


def add_kv_cache_options(parser: argparse.ArgumentParser) -> None:
    """--kv-bits and --kv-group-size: the quantized KV cache."""
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, default=_DEFAULTS["kv_bits"],
                        help="store the KV cache's keys and values in this many bits (default: unquantized)")
    parser.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=_DEFAULTS["kv_group_size"],
                        help="elements of a head sharing one scale and bias with --kv-bits (default %(default)s)")


def add_draft_options(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding: --draft-model or --prompt-lookup, and --num-draft-tokens."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--draft-model", metavar="PATH|REPO|auto",
                       help="speculative decoding with a smaller OpenELM as the draft; auto: the 270M of the same "
                            "variant (apple/OpenELM-* targets). Output as without it")
    which.add_argument("--prompt-lookup", nargs="?", type=int, const=PROMPT_LOOKUP_NGRAM, metavar="N",
                       help=f"speculative decoding that drafts by matching the last N tokens (default "
                            f"{PROMPT_LOOKUP_NGRAM}) in the prompt and the text so far")
    parser.add_argument("--num-draft-tokens", type=draft_length_arg, default=_DEFAULTS["num_draft_tokens"],
                        metavar="K|auto", help=DRAFT_LENGTH_HELP.format(default=_DEFAULTS["num_draft_tokens"]))


# --num-draft-tokens' help, shared with `bench`.
DRAFT_LENGTH_HELP = (f"tokens drafted per verify pass, or {ADAPTIVE}: one more after a fully accepted round, one "
                     "fewer after a rejection (default {default})")


def draft_length_arg(text: str) -> Union[int, str]:
    """--num-draft-tokens: ADAPTIVE or an integer (GenerationOptions checks that it is positive)."""
    if text == ADAPTIVE:
        return ADAPTIVE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {ADAPTIVE}, got {text!r}") from None


def drafter_from_args(args: argparse.Namespace, model: Model, tokenizer: Tokenizer) -> Optional[Drafter]:
    """The drafter --draft-model / --prompt-lookup ask for (None: plain decoding); a draft model is loaded
    with the target's dtype and tokenizer and checked against the target's vocabulary."""
    if args.prompt_lookup is not None:
        return PromptLookup(args.prompt_lookup)
    if args.draft_model is None:
        return None
    source = auto_draft_source(args.model) if args.draft_model == "auto" else args.draft_model
    draft, _ = load(source, dtype=args.dtype, tokenizer=tokenizer.path, force_float16=args.force_float16)
    drafter = DraftModel(draft)
    drafter.check_target(model)
    return drafter


def speculation_summary(response: GenerationResponse) -> str:
    """One line on a speculative generation: drafted and accepted tokens, tokens per target pass."""
    passes = response.verify_passes + 1  # the prefill pass gives the first token
    return (f"speculative: {response.accepted_tokens}/{response.drafted_tokens} drafts accepted "
            f"({100 * response.acceptance_rate:.0f}%), {response.generation_tokens / passes:.2f} tokens per target pass")


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    """The GenerationOptions the sampling flags ask for (validated by GenerationOptions itself)."""
    return GenerationOptions(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, stop=tuple(args.stop),
        sliding_window=args.sliding_window,
        num_draft_tokens=getattr(args, "num_draft_tokens", _DEFAULTS["num_draft_tokens"]),  # not every command drafts
        kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
    )


def add_server_sampling_options(parser: argparse.ArgumentParser) -> None:
    """serve's sampling defaults: generate's flags, used for each request that does not set the field."""
    _add_core_sampling_options(parser.add_argument_group(
        "request defaults", "sampling settings for requests that do not set them (the request's own win)"))


def server_defaults_from_args(args: argparse.Namespace) -> GenerationOptions:
    """The GenerationOptions that serve's sampling flags make the requests' defaults (validated)."""
    return GenerationOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)


def add_constraint_options(parser: argparse.ArgumentParser) -> None:
    """Structured output: --json-schema, --json-object, --regex, --choice or --grammar (one of them)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--json-schema", metavar="FILE|JSON",
                       help="the output is JSON matching this JSON Schema (a file, or the schema itself)")
    which.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
    which.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression as a whole")
    which.add_argument("--choice", action="append", metavar="TEXT",
                       help="the output is one of these strings (repeat: --choice yes --choice no)")
    which.add_argument("--grammar", metavar="FILE",
                       help="the output follows this context-free grammar (llguidance's Lark syntax, rule 'start')")


def constraint_from_args(args: argparse.Namespace) -> Optional[Constraint]:
    """The Constraint the structured-output flags ask for (None: free text); a bad one raises ConstraintError."""
    if args.json_schema is not None:
        return Constraint.json_schema(_schema_argument(args.json_schema))
    if args.json_object:
        return Constraint.any_json()
    if args.regex is not None:
        return Constraint.regex(args.regex)
    if args.choice:
        return Constraint.choice(args.choice)
    if args.grammar is not None:
        path = Path(args.grammar).expanduser()
        if not path.is_file():
            raise ConstraintError(f"--grammar: {path} is not a file (give a Lark grammar file)")
        return Constraint.grammar(path.read_text(encoding="utf-8"))
    return None


def _schema_argument(value: str):
    """--json-schema's value: the schema as JSON text, else the path of a file holding it."""
    if value.lstrip().startswith("{"):
        text, where = value, "it is not valid JSON"
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConstraintError(f"--json-schema: {value} is neither a file nor a JSON object")
        text, where = path.read_text(encoding="utf-8"), f"{path} is not valid JSON"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConstraintError(f"--json-schema: {where} ({e})") from None


def load_from_args(args: argparse.Namespace) -> Tuple[Model, Tokenizer]:
    """(model, tokenizer) for --model through `openelm_mlx.load`; a synthetic model is labelled on stderr."""
    model, tokenizer = load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, force_float16=args.force_float16)
    if args.model.startswith(SYNTHETIC_PREFIX):
        print(f"[synthetic model: random weights of the real {args.model[len(SYNTHETIC_PREFIX):]} architecture; "
              "its text is gibberish]", file=sys.stderr)
    return model, tokenizer


def context_full_notice(context_length: int) -> str:
    """The line printed when a reply stopped because the context filled up (not at --max-tokens)."""
    return f"[stopped: the {context_length}-token context is full]"
