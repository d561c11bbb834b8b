"""`openelm-mlx serve`: an OpenAI-compatible HTTP server (stdlib http.server, one Engine owning the model).

Request threads (ThreadingHTTPServer) authenticate, read and validate requests, then hand a Job to
the engine through a bounded queue (full: 503) and relay its tokens to the client. The engine alone
touches MLX: it decodes up to --max-batch requests together (engine.py), each starting from the
longest prefix it shares with a cached one (a PrefixStore, an LRU of prefixes), so a request that
continues a recent conversation prefills only the rest, however many conversations interleave.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import json
import queue
import selectors
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, TextIO

from .cli_args import add_draft_options, add_kv_cache_options, add_model_options, drafter_from_args, load_from_args
from .engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, DEFAULT_QUEUE_SIZE, DONE, Engine, Job
from .errors import OpenELMError
from .generation import GenerationOptions, new_cache
from .openai_api import (CHAT, COMPLETION, APIError, ServedModel, chunk_body, models_body, new_id,
                         now, parse_request, response_body, usage_body)
from .prompt_files import load_cache_dir, save_store
from .prompt_store import DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_PROMPT_CACHE_ENTRIES, PrefixStore
from .prompt_format import add_template_options, template_from_args

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Connections the kernel holds for accept(): socketserver's default of 5 resets a burst of clients
# before they can even be answered 503. A burst beyond this still queues in the kernel's SYN backlog.
LISTEN_BACKLOG = 128
SOCKET_TIMEOUT_S = 60  # a client that stops sending its request is dropped after this
CLIENT_CHECK_S = 0.25  # how often a waiting request checks that its client is still there
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP side: routes, auth, body limits. `start()` runs it (and optionally the worker) in threads."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, worker: Engine, served: ServedModel, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 log: Optional[TextIO] = None):
        super().__init__((host, port), Handler)
        self.worker, self.served, self.api_key = worker, served, api_key
        self.max_body_bytes, self.log = max_body_bytes, log
        self.created = now()
        self._service_threads = []
        self._closed = False

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up or stalls is routine, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self, *, with_worker: bool) -> "OpenAIServer":
        """Serve HTTP in a background thread; with_worker: the worker too (else call worker.run())."""
        targets = [self.serve_forever] + ([self.worker.run] if with_worker else [])
        self._service_threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for thread in self._service_threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop serving, close the socket, stop a worker started by `start` and wait for the threads.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.shutdown()
        self.server_close()
        if len(self._service_threads) > 1:
            self.worker.stop()
        for thread in self._service_threads:
            thread.join()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server: OpenAIServer

    def do_GET(self) -> None:
        self._handle(lambda: self._send_json(200, models_body(self.server.served.model_id, self.server.created)),
                     "/v1/models")

    def do_POST(self) -> None:
        self._handle(self._completion, *ROUTES)

    def _handle(self, action, *paths: str) -> None:
        try:
            if not self._authorized():
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            if self.path.split("?")[0] not in paths:
                raise APIError(404, f"no route {self.command} {self.path}", code="not_found")
            action()
        except APIError as e:
            self._send_json(e.status, e.body())

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also takes '²' or '٣', which int() refuses or reads differently.
        if length is None or not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise APIError(411 if length is None else 400, "a valid Content-Length header is required")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise APIError(413, f"the request body is {length} bytes; the limit is {self.server.max_body_bytes}")
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True
            raise APIError(400, "the request body is shorter than its Content-Length")
        return body

    def _completion(self) -> None:
        kind = ROUTES[self.path.split("?")[0]]
        request = parse_request(kind, self._read_body(), self.server.served)
        job = Job(request)
        self.server.worker.submit(job)
        try:
            if request.stream:
                self._stream(job)
            else:
                self._respond(job)
        except OSError:  # the client went away (BrokenPipe, ConnectionReset, timeout): stop its generation
            job.cancelled.set()
            self.close_connection = True

    def _events(self, job: Job):
        """The job's responses as the worker produces them. Meanwhile (queued, or generating a reply that is
        sent whole) the connection is watched: a client that hung up raises ConnectionResetError."""
        while True:
            try:
                event = job.events.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                event = None
            if event is None or not job.request.stream:
                if self._client_gone():
                    raise ConnectionResetError("the client closed the connection")
            if event is DONE:
                return
            if isinstance(event, APIError):
                raise event
            if event is not None:
                yield event

    def _client_gone(self) -> bool:
        """Whether the client closed its end (readable with nothing to read); a request pipelined behind
        this one does not count."""
        with selectors.DefaultSelector() as selector:  # not select(): it fails on descriptors past 1023
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(timeout=0):
                return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _respond(self, job: Job) -> None:
        kind, served = job.request.kind, self.server.served
        texts, last = [], None
        for last in self._events(job):
            texts.append(last.text)
        usage = usage_body(len(job.request.prompt_ids), last.generation_tokens, job.reuse.cached_tokens)
        self._send_json(200, response_body(kind, new_id(kind), now(), served.model_id, "".join(texts),
                                           last.finish_reason, usage))

    def _stream(self, job: Job) -> None:
        kind, model_id = job.request.kind, self.server.served.model_id
        response_id, created = new_id(kind), now()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = True
        chunk = lambda **kw: chunk_body(kind, response_id, created, model_id, **kw)  # noqa: E731
        if kind == CHAT:
            self._send_event(chunk(role=True, text=""))
        last = None
        try:
            for last in self._events(job):
                if last.text or last.finish_reason:
                    self._send_event(chunk(text=last.text, finish_reason=last.finish_reason))
        except APIError as e:
            self._send_event(e.body())
        if job.request.include_usage and last is not None:
            self._send_event(chunk(usage=usage_body(len(job.request.prompt_ids), last.generation_tokens,
                                                    job.reuse.cached_tokens)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send_event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (malformed request line, unknown method) in OpenAI's shape too."""
        self.close_connection = True
        self._send_json(code, APIError(code, message or explain or "bad request",
                                       type="invalid_request_error" if code < 500 else "server_error").body())

    def log_message(self, format: str, *args) -> None:
        if self.server.log is not None:
            self.server.log.write(f"{self.address_string()} - {format % args}\n")
            self.server.log.flush()


def register(subparsers) -> None:
    """Add the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="GET /v1/models, POST /v1/completions and /v1/chat/completions (streaming or not). Sampling "
                    "settings come with each request; defaults are generate's.")
    add_model_options(parser)
    add_template_options(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help="requests that may wait for a place in the batch; more get 503 (default %(default)s)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help=f"requests decoded together (continuous batching; default {DEFAULT_MAX_BATCH}, or 1 with "
                             "speculative decoding, which verifies one sequence at a time)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                        help="prompt tokens fed per round while other requests decode (default %(default)s)")
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
    add_draft_options(parser)
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
    GenerationOptions(num_draft_tokens=args.num_draft_tokens)  # validates it before the slow load
    model, tokenizer = load_from_args(args)
    draft = drafter_from_args(args, model, tokenizer)
    served = ServedModel(args.model_id or args.model, tokenizer, template, model.args.max_context_length)
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
        server = OpenAIServer(worker, served, host=args.host,
                              port=args.port, api_key=args.api_key, log=sys.stderr)
    except OSError as e:
        flag = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise OpenELMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}: pick another {flag}") from None
    server.start(with_worker=False)
    print(f"serving {served.model_id} (prompt format: {template.name}) on http://{args.host}:{server.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
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
