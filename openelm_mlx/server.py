"""`openelm-mlx serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn, one Engine owning the model).

The HTTP side (http_app.py: an asyncio event loop in a background thread) authenticates, reads and
validates requests, then hands a Job to the engine through a bounded queue (full: 503) and relays its
tokens to the client. The engine alone touches MLX, in the thread that loaded the model: it decodes up
to --max-batch requests together (engine.py), each starting from the longest prefix it shares with a
cached one (a PrefixStore, an LRU of prefixes), so a request that continues a recent conversation
prefills only the rest, however many conversations interleave.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from .cli_args import (add_draft_options, add_kv_cache_options, add_model_options, add_server_sampling_options,
                       drafter_from_args, load_from_args, server_defaults_from_args)
from .engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, DEFAULT_QUEUE_SIZE, Engine
from .errors import OpenELMError
from .generation import GenerationOptions, new_cache
from .jobs import Job, JobRecord
from .openai_api import ServedModel
from .prompt_files import load_cache_dir, save_store
from .prompt_format import add_template_options, template_from_args
from .prompt_store import DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_PROMPT_CACHE_ENTRIES, PrefixStore

__all__ = ["Job", "JobRecord", "Engine", "register", "cmd_serve", "check_listen_address"]

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8080
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def register(subparsers) -> None:
    """Add the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="GET /v1/models and /health, POST /v1/completions and /v1/chat/completions (streaming or "
                    "not). Sampling settings come with each request; the flags below set the defaults.")
    add_model_options(parser)
    add_template_options(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but GET /health")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help="requests that may wait for a place in the batch; more get 503 (default %(default)s)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help=f"requests decoded together (continuous batching; default {DEFAULT_MAX_BATCH}, or 1 with "
                             "speculative decoding, which verifies one sequence at a time)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                        help="prompt tokens fed per round, the waiting prompts packed into one pass; running requests' "
                             "next tokens wait for it (default %(default)s)")
    parser.add_argument("--model-id", help="the model's name in the API (default: the --model argument)")
    parser.add_argument("--prompt-cache-bytes", type=byte_count, default=DEFAULT_PROMPT_CACHE_BYTES, metavar="BYTES",
                        help="memory for cached conversation prefixes, e.g. 512M or 2G (default 1G); the least "
                             "recently used go first")
    parser.add_argument("--prompt-cache-entries", type=int, default=DEFAULT_PROMPT_CACHE_ENTRIES, metavar="N",
                        help="most cached prefixes (default %(default)s)")
    parser.add_argument("--prompt-cache-dir", metavar="DIR",
                        help="load the prompt cache files in DIR at start (from cache-prompt or an earlier serve) "
                             "and save the cached prefixes there on shutdown")
    add_kv_cache_options(parser)
    parser.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="let web pages from these origins call the API (CORS), e.g. http://localhost:3000; "
                             "'*' allows any. Default: none (browsers refuse cross-origin calls)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="server log detail on stderr; info logs every request (default %(default)s)")
    add_draft_options(parser)
    add_server_sampling_options(parser)
    parser.set_defaults(run=cmd_serve)


def check_listen_address(host: str, port: int) -> None:
    """Refuse a port out of range or a host that does not resolve, naming the flag to fix."""
    if not 0 <= port <= 65535:
        raise OpenELMError(f"--port must be between 0 and 65535 (0 picks a free one), got {port}")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:  # UnicodeError: not a valid name at all ('a..b')
        reason = getattr(e, "strerror", None) or e
        raise OpenELMError(f"cannot resolve --host {host!r}: {reason}: give an IP address such as {DEFAULT_HOST} "
                           "or 0.0.0.0, or a host name that resolves") from None


def serve_max_batch(args: argparse.Namespace) -> int:
    """--max-batch, checked (and --prefill-chunk): its default is 1 with speculative decoding (which
    cannot batch), else DEFAULT_MAX_BATCH; speculative decoding with --max-batch above 1 is refused."""
    if args.prefill_chunk < 1:
        raise OpenELMError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    drafting = args.draft_model is not None or args.prompt_lookup is not None
    if args.max_batch is None:
        return 1 if drafting else DEFAULT_MAX_BATCH
    if args.max_batch < 1:
        raise OpenELMError(f"--max-batch must be at least 1, got {args.max_batch}")
    if drafting and args.max_batch > 1:
        raise OpenELMError("speculative decoding (--draft-model/--prompt-lookup) verifies one sequence at a time "
                           f"and cannot batch: drop --max-batch {args.max_batch} (it then defaults to 1) or the "
                           "draft option")
    return args.max_batch


# The packages of the `serve` extra: a missing one is an install step, not a bug.
SERVE_PACKAGES = ("starlette", "uvicorn", "pydantic", "anyio", "h11")


def http_layer():
    """The http_app module; one line naming the extra to install when its packages are missing."""
    try:
        from . import http_app
    except ImportError as e:
        if (e.name or "").split(".")[0] not in SERVE_PACKAGES:
            raise
        raise OpenELMError(f"serve needs the 'serve' extra ({e.name} is not installed): "
                           "pip install 'openelm-mlx[serve]'") from None
    return http_app


def __getattr__(name: str):
    """`from openelm_mlx.server import OpenAIServer` keeps working: the HTTP server lives in http_app.py,
    imported only when asked for, so the CLI runs without the serve extra."""
    if name == "OpenAIServer":
        return http_layer().OpenAIServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_serve(args: argparse.Namespace) -> int:
    """`openelm-mlx serve`: load the model, then serve until Ctrl-C; the worker runs in this thread."""
    if args.queue_size < 1:
        raise OpenELMError(f"--queue-size must be at least 1, got {args.queue_size}")
    if args.prompt_cache_entries < 0:
        raise OpenELMError(f"--prompt-cache-entries must be at least 0 (0 turns the cache off), got "
                           f"{args.prompt_cache_entries}")
    if args.prompt_cache_dir and Path(args.prompt_cache_dir).exists() and not Path(args.prompt_cache_dir).is_dir():
        raise OpenELMError(f"--prompt-cache-dir {args.prompt_cache_dir} is not a directory")
    max_batch = serve_max_batch(args)
    check_listen_address(args.host, args.port)  # before the slow load
    template = template_from_args(args)
    defaults = server_defaults_from_args(args)  # validated before the slow load
    GenerationOptions(num_draft_tokens=args.num_draft_tokens)
    http_app = http_layer()
    model, tokenizer = load_from_args(args)
    draft = drafter_from_args(args, model, tokenizer)
    served = ServedModel(args.model_id or args.model, tokenizer, template, model.args.max_context_length,
                         defaults=defaults, drafts=draft is not None)
    kv = GenerationOptions(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    new_cache(model, kv)  # refuses a --kv-group-size that does not divide the model's head_dim, before serving
    store = PrefixStore(model, max_bytes=args.prompt_cache_bytes, max_entries=args.prompt_cache_entries)
    if args.prompt_cache_dir:
        for refused in load_cache_dir(args.prompt_cache_dir, store, kv):
            print(f"openelm-mlx serve: warning: skipped {refused}", file=sys.stderr)
    worker = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=args.prefill_chunk,
                    queue_size=args.queue_size, draft=draft, num_draft_tokens=args.num_draft_tokens,
                    store=store, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    try:
        server = http_app.OpenAIServer(worker, served, host=args.host, port=args.port, api_key=args.api_key,
                                       allowed_origins=args.allowed_origins, log_level=args.log_level)
    except OSError as e:
        flag = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise OpenELMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}: pick another {flag}") from None
    # The socket already listens: print first, so this is the first line whatever uvicorn logs.
    print(f"serving {served.model_id} (prompt format: {template.name}) on http://{args.host}:{server.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    server.start(with_worker=False)
    try:
        server.worker.run()  # the model stays in the thread that loaded it
    finally:
        server.close()
        if args.prompt_cache_dir:
            saved = save_store(store, args.prompt_cache_dir)
            print(f"saved {len(saved)} cached prefixes to {args.prompt_cache_dir}", file=sys.stderr)
    return 0


def byte_count(text: str) -> int:
    """A size in bytes, with an optional K, M or G suffix (powers of 1024), for argparse."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1048576, 512M or 2G, got {text!r}")
    return int(number) * scale
