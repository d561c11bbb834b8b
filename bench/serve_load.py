"""`python -m openelm_mlx.bench.serve_load`: the servers under load, with real HTTP streaming clients.

Starts `openelm-mlx serve` and `mlx_lm.server` on the same weights (a directory both load: a
converted checkpoint, written to a temporary directory), one after the other, each on 127.0.0.1. For
each concurrency N it runs N client threads that each stream `--requests-per-client` completions of
fixed prompts and lengths (greedy, EOS banned by logit_bias so every request generates exactly
`--gen-tokens`), and reports per server and N: aggregate generated tokens/s (all tokens / wall time of
the level), its ratio to N = 1, time to first token p50/p95 (request sent to first streamed text),
inter-token latency p50/p95 (gaps between streamed text events, pooled), and errors (non-200
answers, error events, streams without [DONE], connection failures). Both servers get the same BLAS
(this package's optimized one where installed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import mlx.core as mx

from ..config import ModelArgs
from ..convert.converter import ConvertOptions, convert
from ..convert.hf_tokenizer import write_tokenizer
from ..convert.writer import write_json, write_weights
from ..synthetic import PREFIX as SYNTHETIC_PREFIX, random_weights
from ..tokenizer import Tokenizer

LEVELS = (1, 2, 4, 8, 16)
EOS_ID = "2"  # Llama-2's </s>: banned so every request generates exactly gen_tokens
READY_TIMEOUT_S = 600  # loading a model (and importing transformers for mlx-lm) on a busy CPU
REQUEST_TIMEOUT_S = 600
OURS, MLX_LM = "openelm-mlx", "mlx_lm.server"
# mlx_lm.server with this package's BLAS placed first, so both servers multiply with the same library.
MLX_LM_LAUNCH = ("import sys; from openelm_mlx.blas import use_optimized_blas; use_optimized_blas(); "
                 "from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()")
FILLER = ("The quick brown fox jumps over the lazy dog while the old clock on the wall ticks away the hours of "
          "a long and quiet afternoon in the small town by the river. ")


@dataclass
class RequestResult:
    """One streamed request as its client saw it."""

    started: float
    ended: float
    tokens: int = 0
    ttft_s: Optional[float] = None
    gaps_s: List[float] = field(default_factory=list)  # between successive streamed text events
    error: Optional[str] = None


@dataclass
class LevelResult:
    """One server at one concurrency."""

    server: str
    concurrency: int
    requests: int
    errors: int
    error_messages: List[str]
    generated_tokens: int
    wall_s: float
    aggregate_tok_s: float
    ratio_to_1: Optional[float]
    ttft_p50_ms: Optional[float]
    ttft_p95_ms: Optional[float]
    itl_p50_ms: Optional[float]
    itl_p95_ms: Optional[float]


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_completion(port: int, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> RequestResult:
    """POST a streamed /v1/completions and time its events."""
    result = RequestResult(started=time.perf_counter(), ended=0.0)
    last = None
    done = False
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200].decode(errors='replace')}"
            return result
        pieces = 0
        for line in response:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result.error = f"error event: {event['error']}"
                return result
            if event.get("usage"):
                result.tokens = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - result.started
                else:
                    result.gaps_s.append(now - last)
                last = now
                pieces += 1
        result.tokens = result.tokens or pieces  # a server that sends no usage: one token per event
        if not done:
            result.error = "the stream ended without data: [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.ended = time.perf_counter()
        with contextlib.suppress(Exception):
            conn.close()
    return result


def run_level(port: int, bodies_per_client: Sequence[Sequence[dict]]) -> List[RequestResult]:
    """Client i sends bodies_per_client[i] one after another; all clients start together."""
    barrier = threading.Barrier(len(bodies_per_client))
    results: List[List[RequestResult]] = [[] for _ in bodies_per_client]

    def client(i: int) -> None:
        barrier.wait()
        for body in bodies_per_client[i]:
            results[i].append(stream_completion(port, body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies_per_client))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for rs in results for r in rs]


def summarize(server: str, concurrency: int, results: List[RequestResult],
              baseline_tok_s: Optional[float]) -> LevelResult:
    """The level's figures from its requests (only successful ones count toward tokens and latencies)."""
    ok = [r for r in results if r.error is None]
    wall = max(r.ended for r in results) - min(r.started for r in results)
    tokens = sum(r.tokens for r in ok)
    rate = tokens / wall if wall > 0 else 0.0
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]

    def ms(value: Optional[float]) -> Optional[float]:
        return None if value is None else round(value * 1000, 1)

    return LevelResult(server, concurrency, len(results), len(results) - len(ok),
                       sorted({r.error for r in results if r.error})[:5], tokens, round(wall, 3), round(rate, 3),
                       round(rate / baseline_tok_s, 2) if baseline_tok_s else None,
                       ms(percentile(ttfts, 50)), ms(percentile(ttfts, 95)),
                       ms(percentile(gaps, 50)), ms(percentile(gaps, 95)))


def prompts(tokenizer_path: Path, count: int, prompt_tokens: int) -> List[str]:
    """`count` distinct prompts of about `prompt_tokens` tokens each (BOS included), fixed text."""
    tokenizer = Tokenizer(tokenizer_path)
    texts = []
    for i in range(count):
        ids = tokenizer.encode(f"Story {i}: " + FILLER * (prompt_tokens // 20 + 2))[:prompt_tokens]
        texts.append(tokenizer.decode(ids))
    return texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: List[str], port: int, log_path: Path) -> Iterator[None]:
    """Start a server process, wait until GET /v1/models answers, stop it (SIGINT, then kill) at the end."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                   "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {READY_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(2)  # SIGINT: both servers stop on Ctrl-C
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_command(server: str, model_dir: Path, port: int, dtype: str, queue_size: int,
                   extra: Sequence[str]) -> List[str]:
    if server == OURS:
        return [sys.executable, "-m", "openelm_mlx.cli", "serve", "--model", str(model_dir), "--port", str(port),
                "--dtype", dtype, "--queue-size", str(queue_size), "--log-level", "warning", *extra]
    return [sys.executable, "-c", MLX_LM_LAUNCH, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]


def prepare_weights(model: str, tokenizer: Path, out: Path, dtype: str) -> Path:
    """A directory both servers load, with Hugging Face tokenizer files for mlx-lm: a synthetic:SIZE model
    written directly, or a checkpoint converted (openelm-mlx convert)."""
    if model.startswith(SYNTHETIC_PREFIX):
        args = ModelArgs.from_preset(model[len(SYNTHETIC_PREFIX):])
        out.mkdir(parents=True)
        write_weights(out, random_weights(args, dtype=getattr(mx, dtype)), max_shard_bytes=1 << 40)
        write_json(out / "config.json", args.to_dict())
        write_tokenizer(out, tokenizer, max_context_length=args.max_context_length)
        return out
    convert(ConvertOptions(source=model, out=out, tokenizer=tokenizer, dtype=dtype), log=lambda _: None)
    return out


def bench_server(server: str, model_dir: Path, levels: Sequence[int], texts: Sequence[str], requests_per_client: int,
                 gen_tokens: int, dtype: str, extra: Sequence[str], log_dir: Path,
                 progress=print) -> List[LevelResult]:
    """All levels against one server started for them; one uncounted warm-up request first."""
    port = free_port()
    command = server_command(server, model_dir, port, dtype, 2 * max(levels) * requests_per_client, extra)
    results: List[LevelResult] = []
    with running_server(command, port, log_dir / f"{server}.log"):
        def body(n: int) -> dict:
            return {"prompt": texts[n % len(texts)], "max_tokens": gen_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {EOS_ID: -100}}

        stream_completion(port, body(0))  # warm-up: compiles, allocates
        baseline = None
        for n in levels:
            progress(f"[{server}: {n} concurrent client(s) x {requests_per_client} request(s)]")
            bodies = [[body(i * requests_per_client + r) for r in range(requests_per_client)] for i in range(n)]
            level = summarize(server, n, run_level(port, bodies), baseline)
            if n == levels[0]:
                baseline = level.aggregate_tok_s or None
                level.ratio_to_1 = 1.0 if baseline else None
            results.append(level)
    return results


def format_table(results: Sequence[LevelResult]) -> str:
    header = ["server", "N", "requests", "errors", "tok/s", "x N=1", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms",
              "ITL p95 ms"]
    rows = [[r.server, r.concurrency, r.requests, r.errors, f"{r.aggregate_tok_s:.2f}",
             "-" if r.ratio_to_1 is None else f"{r.ratio_to_1:.2f}",
             *("-" if v is None else f"{v:.0f}" for v in (r.ttft_p50_ms, r.ttft_p95_ms, r.itl_p50_ms, r.itl_p95_ms))]
            for r in results]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.serve_load", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic:270M",
                        help="an OpenELM checkpoint directory or repo (converted for both servers) or synthetic:SIZE "
                             "(default %(default)s)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the Llama-2 tokenizer.model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the weights' dtype (both servers compute in it; default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS),
                        help="concurrent clients per level; the first is the ratio's baseline (default 1 2 4 8 16)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="streamed requests each client sends "
                                                                           "one after another (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default %(default)s)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens each request generates (default %(default)s)")
    parser.add_argument("--no-mlx-lm", action="store_true", help="measure openelm-mlx serve only")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for openelm-mlx serve, e.g. --serve-arg=--max-batch=8 (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the settings and results as JSON")
    args = parser.parse_args(argv)
    for name in ("requests_per_client", "prompt_tokens", "gen_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(n < 1 for n in args.concurrency):
        parser.error("--concurrency levels must be at least 1")
    if not args.tokenizer.is_file():
        parser.error(f"no such tokenizer file: {args.tokenizer}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    servers = [OURS] + ([] if args.no_mlx_lm else [MLX_LM])
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        print(f"[preparing {args.model} ({args.dtype}) for {' and '.join(servers)}]", file=sys.stderr, flush=True)
        model_dir = prepare_weights(args.model, args.tokenizer, Path(tmp) / "model", args.dtype)
        texts = prompts(args.tokenizer, max(args.concurrency) * args.requests_per_client, args.prompt_tokens)
        results: List[LevelResult] = []
        for server in servers:
            results += bench_server(server, model_dir, args.concurrency, texts, args.requests_per_client,
                                    args.gen_tokens, args.dtype, args.serve_arg, Path(tmp),
                                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(results))
    print("tok/s: generated tokens of all requests / the level's wall time; TTFT: request sent to first streamed "
          "text; ITL: gaps between streamed text events")
    if args.json:
        settings: Dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "results": [asdict(r) for r in results]}, indent=2))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
