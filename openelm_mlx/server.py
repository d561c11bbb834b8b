"""`openelm-mlx serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn, one worker owning the model).

The HTTP side (http_app.py: an asyncio event loop in a background thread) authenticates, reads and
validates requests, then hands a Job to the worker through a bounded queue (full: 503) and relays its
tokens to the client. The worker alone touches MLX, in the thread that loaded the model: it runs one
generation at a time on a PromptCache, so a request that shares a prefix with the previous one (the
same conversation, one turn longer) prefills only the rest.
"""

from __future__ import annotations

import argparse
import collections
import errno
import queue
import socket
import sys
import threading
from dataclasses import replace
from typing import Deque, Optional

import mlx.core as mx

from .cli_args import (add_draft_options, add_model_options, add_server_sampling_options, drafter_from_args,
                       load_from_args, server_defaults_from_args)
from .drafting import Drafter
from .errors import OpenELMError
from .generation import GenerationOptions, GenerationResponse
from .jobs import JOB_DONE as _DONE, Job, JobRecord
from .model import Model
from .openai_api import COMPLETION, APIError, ParsedRequest, ServedModel
from .prompt_cache import PromptCache
from .prompt_format import add_template_options, template_from_args
from .tokenizer import Tokenizer

__all__ = ["Job", "JobRecord", "Worker", "register", "cmd_serve", "check_listen_address"]

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 16  # requests waiting behind the running one; more get 503
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
WORKER_POLL_S = 0.5  # how often an idle worker wakes (so the main thread sees Ctrl-C)


class Worker:
    """Owns the model: runs queued jobs one at a time, in the thread that calls `run`."""

    def __init__(self, model: Model, tokenizer: Tokenizer, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 draft: Optional[Drafter] = None, num_draft_tokens: Optional[int] = None):
        """`draft`: speculative decoding for every request that does not opt out ("speculative": false),
        drafting `num_draft_tokens` per pass (None: GenerationOptions' default)."""
        self.tokenizer = tokenizer
        self.draft = draft
        self.num_draft_tokens = num_draft_tokens
        self.prompt_cache = PromptCache(model)
        self.jobs: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self.records: Deque[JobRecord] = collections.deque(maxlen=1000)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; retry later",
                           type="server_error", code="queue_full") from None

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        """Serve jobs until `stop`."""
        try:
            while (job := self._next_job()) is not None:
                self._run_job(job)
        finally:
            mx.synchronize()
            if threading.current_thread() is not threading.main_thread():
                mx.clear_streams()  # a thread that used MLX must release its streams before it ends

    def _next_job(self) -> Optional[Job]:
        # Waits in short slices: Ctrl-C may be delivered to another thread, and the main thread only
        # notices it between waits (a lock wait without a timeout is not interrupted then).
        while True:
            try:
                return self.jobs.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                continue

    def _run_job(self, job: Job) -> None:
        finish, last = "cancelled", None
        try:
            if job.cancelled.is_set():
                return
            draft = self.draft if job.request.speculative else None
            options = job.request.options
            if draft is not None and self.num_draft_tokens is not None:
                options = replace(options, num_draft_tokens=self.num_draft_tokens)
            responses = self.prompt_cache.generate(self.tokenizer, job.request.prompt_ids, options, job.reuse,
                                                   continues_text=self._continues_text(job.request), draft=draft)
            try:
                for response in responses:
                    last = response
                    job.events.put(response)
                    finish = response.finish_reason or finish
                    if job.cancelled.is_set() and not response.finish_reason:
                        break
            finally:
                responses.close()
        except Exception as e:  # an unexpected failure ends this request, not the server
            finish = "error"
            job.events.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
        finally:
            job.events.put(_DONE)
            last = last or GenerationResponse(text="", token=-1)
            self.records.append(JobRecord(last.generation_tokens, finish, job.reuse.cached_tokens,
                                          last.drafted_tokens, last.accepted_tokens))

    def _continues_text(self, request: ParsedRequest) -> bool:
        """Whether a completion's first word keeps its space. decode() drops it at the start of a text,
        but a completion continues its prompt: prompt + completion must read as decode(prompt +
        completion ids), e.g. "Once upon a time" + " there"."""
        return request.kind == COMPLETION and self.tokenizer.decode(request.prompt_ids) != ""


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
                        help="requests that may wait behind the running one; more get 503 (default %(default)s)")
    parser.add_argument("--model-id", help="the model's name in the API (default: the --model argument)")
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
    check_listen_address(args.host, args.port)  # before the slow load
    template = template_from_args(args)
    defaults = server_defaults_from_args(args)  # validated before the slow load
    GenerationOptions(num_draft_tokens=args.num_draft_tokens)
    http_app = http_layer()
    model, tokenizer = load_from_args(args)
    draft = drafter_from_args(args, model, tokenizer)
    served = ServedModel(args.model_id or args.model, tokenizer, template, model.args.max_context_length,
                         defaults=defaults, drafts=draft is not None)
    worker = Worker(model, tokenizer, queue_size=args.queue_size, draft=draft, num_draft_tokens=args.num_draft_tokens)
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
    return 0
