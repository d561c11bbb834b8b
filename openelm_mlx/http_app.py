"""The HTTP side of `openelm-mlx serve`: a Starlette app run by uvicorn in a background thread.

HTTP parsing, chunked bodies and malformed requests are uvicorn's (h11); routing, CORS and responses
Starlette's; request bodies are validated by openai_requests (pydantic). Each request becomes a Job
submitted to the worker (the one thread that touches MLX); the worker puts the job's tokens on its
events queue, and an EventBridge wakes the event loop for each of them (call_soon_threadsafe), so no
thread waits per request and the loop never blocks. A client that hangs up (an http.disconnect from
uvicorn) cancels its job, whether it is streaming, waiting for a whole reply, or still queued.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import queue
import socket
import threading
from typing import AsyncIterator, Iterable, List, Optional, Sequence

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .generation import GenerationResponse
from .jobs import JOB_DONE, Job
from .openai_api import (CHAT, COMPLETION, APIError, ServedModel, chunk_body, logprobs_body, models_body, new_id, now,
                         response_body, usage_body)
from .openai_requests import parse_request

DEFAULT_MAX_BODY_BYTES = 1 << 20
# Connections the kernel holds for accept(): a small backlog resets a burst of clients before they can
# even be answered 503 (the standard library's 5 reset about 40 of 64). Beyond this, SYN backlog.
LISTEN_BACKLOG = 1024
SHUTDOWN_GRACE_S = 2  # on close, how long open streams may finish before their tasks are cancelled
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
PUBLIC_PATHS = ("/health",)  # answered without the API key: a liveness probe carries none
MALFORMED_HTTP = ("malformed HTTP request: send an HTTP/1.1 request line, valid headers and, with a body, a "
                  "Content-Length of ASCII digits or a chunked Transfer-Encoding")


class EventBridge(queue.Queue):
    """A job's events queue that also wakes an asyncio loop: the worker thread puts as on any
    queue.Queue (the Job contract), the loop awaits `next()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._ready = asyncio.Event()

    def _put(self, item) -> None:  # called by put() under the queue's lock, in the worker's thread
        super()._put(item)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop has closed: the server is gone, nobody waits
            pass

    async def next(self):
        """The next event, waiting without blocking the loop."""
        while True:
            try:
                return self.get_nowait()
            except queue.Empty:
                pass
            self._ready.clear()
            if self.empty():  # a put between get_nowait and clear has set no flag yet: look again first
                await self._ready.wait()


async def job_events(job: Job) -> AsyncIterator[GenerationResponse]:
    """The job's responses as the worker produces them; an APIError from the worker is raised."""
    while (event := await job.events.next()) is not JOB_DONE:
        if isinstance(event, APIError):
            raise event
        yield event


async def cancel_on_disconnect(receive: Receive, job: Job) -> None:
    """Wait for the client to hang up (the body has been read: the next message is http.disconnect),
    then cancel its job."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def error_response(error: APIError, *, close: bool = False) -> JSONResponse:
    """OpenAI's error body; `close`: the connection ends after it (an unread body must not be taken for
    the next request)."""
    return JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"} if close else None)


class APIKeyMiddleware:
    """401 for any request without 'Authorization: Bearer KEY' (compared in constant time), but PUBLIC_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream:
    """A server-sent event stream of a job (an ASGI response); a client that leaves cancels the job."""

    HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"connection", b"close")]  # the end of the stream is the end of the connection

    def __init__(self, job: Job, events: AsyncIterator[bytes]):
        self.job, self.events = job, events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.job))
        finished = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except OSError:  # uvicorn: the client is gone
            pass
        finally:
            watcher.cancel()
            if not finished:  # disconnected, or this task was cancelled (shutdown)
                self.job.cancelled.set()
            await self.events.aclose()


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class OpenAIApp:
    """The routes: GET /v1/models, GET /health, POST /v1/completions and /v1/chat/completions."""

    def __init__(self, worker, served: ServedModel, max_body_bytes: int):
        self.worker, self.served, self.max_body_bytes = worker, served, max_body_bytes
        self.created = now()

    def routes(self) -> List[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]), Route("/health", self.health, methods=["GET"]),
                *(Route(path, self.completion, methods=["POST"]) for path in ROUTES)]

    async def models(self, request: Request) -> Response:
        return JSONResponse(models_body(self.served.model_id, self.created))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def completion(self, request: Request):
        kind = ROUTES[request.url.path]
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody to answer
        parsed = parse_request(kind, body, self.served)
        job = Job(parsed, events=EventBridge(asyncio.get_running_loop()))
        self.worker.submit(job)
        if parsed.stream:
            return EventStream(job, self._stream(job))
        return await self._whole_reply(job, request.receive)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past the limit: at once by its Content-Length, or, chunked, as soon
        as it grows past it."""
        length = request.headers.get("content-length")  # uvicorn has checked it is digits
        if length is not None and int(length) > self.max_body_bytes:
            raise APIError(413, f"the request body is {length} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _whole_reply(self, job: Job, receive: Receive) -> Response:
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, job))
        steps: List[GenerationResponse] = []
        try:
            async for response in job_events(job):
                steps.append(response)
        finally:
            watcher.cancel()
        if job.cancelled.is_set() or not steps:
            return Response(status_code=499)  # the client has gone: uvicorn sends nothing
        request, last = job.request, steps[-1]
        usage = usage_body(len(request.prompt_ids), last.generation_tokens, job.reuse.cached_tokens)
        return JSONResponse(response_body(request.kind, new_id(request.kind), now(), self.served.model_id,
                                          "".join(s.text for s in steps), last.finish_reason, usage,
                                          logprobs_body(request.kind, self.served.tokenizer, steps)))

    async def _stream(self, job: Job) -> AsyncIterator[bytes]:
        request, tokenizer = job.request, self.served.tokenizer
        kind, response_id, created = request.kind, new_id(request.kind), now()

        def chunk(**fields) -> bytes:
            return sse(chunk_body(kind, response_id, created, self.served.model_id, **fields))

        if kind == CHAT:
            yield chunk(role=True, text="")
        last, unsent = None, []  # unsent: steps whose logprobs no chunk has carried yet (text held back)
        try:
            async for last in job_events(job):
                unsent.append(last)
                if last.text or last.finish_reason:
                    yield chunk(text=last.text, finish_reason=last.finish_reason,
                                logprobs=logprobs_body(kind, tokenizer, unsent))
                    unsent = []
        except APIError as e:
            yield sse(e.body())
        if request.include_usage and last is not None:
            yield chunk(usage=usage_body(len(request.prompt_ids), last.generation_tokens, job.reuse.cached_tokens))
        yield b"data: [DONE]\n\n"


def build_app(worker, served: ServedModel, *, api_key: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app: CORS (only with allowed_origins), then the API key check, then the routes."""
    middleware = []
    if allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    if api_key is not None:
        middleware.append(Middleware(APIKeyMiddleware, api_key=api_key))

    async def api_error(request: Request, error: APIError) -> Response:
        return error_response(error, close=error.status == 413)

    async def http_error(request: Request, error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = (f"no route {request.method} {request.url.path}" if error.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if error.status_code == 405
                   else error.detail)
        return error_response(APIError(error.status_code, message, code=code))

    async def server_error(request: Request, error: Exception) -> Response:
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    app = OpenAIApp(worker, served, max_body_bytes)
    return Starlette(routes=app.routes(), middleware=middleware,
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})


MALFORMED_LINGER_S = 1.0  # how long a connection answered 400 for malformed HTTP stays open to drain


class H11WithJSONErrors(H11Protocol):
    """uvicorn's h11 protocol, but a request that is not valid HTTP/1.1 (request line, headers, a
    Content-Length that is not digits) gets OpenAI's JSON error body, as every other error does."""

    def send_400_response(self, msg: str) -> None:
        if getattr(self, "_answered_malformed", False):  # more bytes of the same bad request
            return
        self._answered_malformed = True
        body = json.dumps(APIError(400, MALFORMED_HTTP).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        # Close a moment later, reading meanwhile: closing with request bytes still unread makes the kernel
        # reset the connection, which can destroy the 400 before the client reads it.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(MALFORMED_LINGER_S, self.transport.close)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, as the host resolves); raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _stderr_logging() -> dict:
    """uvicorn's logging setup with the access log on stderr too: stdout stays free."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return config


class OpenAIServer:
    """The server: binds at once (so a taken port fails here), `start()` serves in background threads."""

    def __init__(self, worker, served: ServedModel, *, host: str = "127.0.0.1", port: int = 8080,
                 api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 allowed_origins: Iterable[str] = (), log_level: str = "warning"):
        self.worker, self.served = worker, served
        self.socket = listen(host, port)
        app = build_app(worker, served, api_key=api_key, max_body_bytes=max_body_bytes,
                        allowed_origins=tuple(allowed_origins))
        config = uvicorn.Config(app, http=H11WithJSONErrors, ws="none", lifespan="off", log_level=log_level,
                                log_config=_stderr_logging(), access_log=log_level in ("info", "debug"),
                                backlog=LISTEN_BACKLOG, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                                server_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._service_threads: List[threading.Thread] = []
        self._closed = False

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def start(self, *, with_worker: bool) -> "OpenAIServer":
        """Serve HTTP in a background thread; with_worker: the worker too (else call worker.run())."""
        targets = [self._serve] + ([self.worker.run] if with_worker else [])
        self._service_threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for thread in self._service_threads:
            thread.start()
        return self

    def _serve(self) -> None:
        asyncio.run(self._uvicorn.serve(sockets=[self.socket]))

    def close(self) -> None:
        """Stop serving (open streams get SHUTDOWN_GRACE_S), close the socket, stop a worker started by
        `start` and wait for the threads. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._uvicorn.should_exit = True
        if len(self._service_threads) > 1:
            self.worker.stop()
        for thread in self._service_threads:
            thread.join()
        self.socket.close()
