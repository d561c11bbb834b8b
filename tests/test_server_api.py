"""The API surface added on the ASGI server: GET /health, CORS, logprobs, OpenAI's penalties and
logit_bias, the sampling defaults `serve` takes from its flags, and what cannot combine. Values are
checked against generate() and a direct recomputation of the log-softmax."""

from __future__ import annotations

import http.client
import json

import mlx.core as mx
import numpy as np
import pytest

from serving import tiny_chat_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.commands import build_parser
from openelm_mlx.engine import Engine
from openelm_mlx.openai_api import ServedModel
from openelm_mlx.prompt_format import ZEPHYR

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
from openelm_mlx.http_app import OpenAIServer  # noqa: E402

MODEL_ID = "tiny-openelm"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, spm_model):
    return om.load(tiny_chat_checkpoint(tmp_path_factory.mktemp("api") / "tiny", spm_model), dtype="float32")


def start_server(lm, **kw) -> OpenAIServer:
    model, tok = lm
    served = ServedModel(MODEL_ID, tok, ZEPHYR, model.args.max_context_length, defaults=kw.pop("defaults",
                         GenerationOptions()), drafts=kw.pop("drafts", False))
    return OpenAIServer(Engine(model, tok), served, host="127.0.0.1", port=0, **kw).start(with_worker=True)


@pytest.fixture(scope="module")
def server(lm):
    server = start_server(lm)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


def request(server, method, path, body=None, headers=None):
    """(status, headers dict with lower-case names, the JSON body parsed (else its text), or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    headers = {k.lower(): v for k, v in response.getheaders()}
    if not payload:
        return response.status, headers, None
    is_json = headers.get("content-type", "").startswith("application/json")
    return response.status, headers, json.loads(payload) if is_json else payload.decode()


def continuation_tokens(lm, prompt, **options):
    return om.generate(lm[0], lm[1], lm[1].encode(prompt), GenerationOptions(**options)).tokens


def reference_logprobs(lm, ids, generated, top):
    """(logprob of each generated token, its `top` likeliest ids) from full forwards, no penalties."""
    chosen, tops = [], []
    for n, token in enumerate(generated):
        logits = np.array(lm[0](mx.array([list(ids) + generated[:n]]))[0, -1].astype(mx.float32), dtype=np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        chosen.append(logp[token])
        tops.append(list(np.argsort(-logp)[:top]))
    return chosen, tops


# ---------------------------------------------------------------------------- health and CORS


def test_health_needs_no_api_key(lm):
    server = start_server(lm, api_key="k")
    try:
        status, _, body = request(server, "GET", "/health")
        assert status == 200 and body == {"status": "ok"}
        assert request(server, "GET", "/v1/models")[0] == 401
    finally:
        server.close()


PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type,authorization"}


def test_cors_is_off_by_default(server):
    status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert status == 405 and "access-control-allow-origin" not in headers
    status, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_allows_only_the_allowed_origins(lm):
    server = start_server(lm, allowed_origins=["http://localhost:3000"], api_key="k")
    try:
        status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        evil = {**PREFLIGHT, "Origin": "http://evil.example"}
        status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", headers=evil)
        assert status == 400 and "access-control-allow-origin" not in headers
        status, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": "http://localhost:3000",
                                                                           "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        server.close()


# ---------------------------------------------------------------------------- logprobs


def test_chat_logprobs_are_the_models_log_softmax(client, lm):
    messages = [{"role": "user", "content": "Hello world"}]
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, logprobs=True,
                                              top_logprobs=3)
    content = response.choices[0].logprobs.content
    ids = om.prompt_format.conversation_ids(lm[1], ZEPHYR, [om.prompt_format.Message("user", "Hello world")])
    generated = om.generate(lm[0], lm[1], ids, GenerationOptions(max_tokens=6)).tokens
    chosen, tops = reference_logprobs(lm, ids, generated, 3)
    assert len(content) == 6
    assert [c.logprob for c in content] == pytest.approx(chosen, abs=1e-4)
    for entry, token, top in zip(content, generated, tops):
        assert entry.token == lm[1].piece_bytes(token).decode()
        assert bytes(entry.bytes) == lm[1].piece_bytes(token)
        assert [t.token for t in entry.top_logprobs] == [lm[1].piece_bytes(t).decode() for t in top]
    assert "".join(c.token for c in content).strip() == response.choices[0].message.content.strip()


def test_completion_logprobs_streamed_and_whole_agree(client, lm):
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, logprobs=2)
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, logprobs=2, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    logprobs = whole.choices[0].logprobs
    # The second request starts from the first one's cached prefix: its logits may differ in the last
    # bits (docs/serve.md#continuous-batching), not its tokens.
    streamed_tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == logprobs.tokens and len(streamed) == 8
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=1e-5)
    ids = lm[1].encode(PROMPT)
    chosen, tops = reference_logprobs(lm, ids, continuation_tokens(lm, PROMPT, max_tokens=8), 2)
    assert logprobs.token_logprobs == pytest.approx(chosen, abs=1e-4)
    assert [list(t) for t in logprobs.top_logprobs] == [[lm[1].piece_bytes(i).decode() for i in top] for top in tops]


def test_no_logprobs_unless_asked(client):
    response = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3)
    assert response.choices[0].logprobs is None


# ---------------------------------------------------------------------------- penalties and logit_bias


def test_penalties_and_logit_bias_reach_the_sampler(client, lm):
    """A request's presence/frequency penalties and logit_bias give generate()'s tokens with the same options."""
    settings = dict(presence_penalty=1.0, frequency_penalty=0.5)
    plain = continuation_tokens(lm, PROMPT, max_tokens=12)
    response = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, logprobs=0, **settings,
                                         logit_bias={str(plain[0]): -100})
    want = continuation_tokens(lm, PROMPT, max_tokens=12, logit_bias={plain[0]: -100}, **settings)
    got = response.choices[0].logprobs.tokens
    assert got == [lm[1].piece_bytes(t).decode() for t in want]
    assert want != plain and plain[0] not in want


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": True}, "echo"),
])
def test_bad_completion_fields_are_400(server, body, param):
    status, _, answer = request(server, "POST", "/v1/completions", {"prompt": PROMPT, **body})
    assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),
])
def test_bad_chat_logprobs_fields_are_400(server, body, param):
    status, _, answer = request(server, "POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "Hi"}], **body})
    assert status == 400 and answer["error"]["param"] == param, answer


def test_a_drafting_server_refuses_what_speculation_cannot_do(lm):
    """With --draft-model/--prompt-lookup, logprobs or the OpenAI penalties need "speculative": false."""
    server = start_server(lm, drafts=True)
    try:
        for extra in ({"logprobs": 1}, {"presence_penalty": 0.5}, {"logit_bias": {"5": 1}}):
            status, _, answer = request(server, "POST", "/v1/completions", {"prompt": PROMPT, **extra})
            assert status == 400 and "speculative" in answer["error"]["message"], answer
        status, _, answer = request(server, "POST", "/v1/completions",
                                    {"prompt": PROMPT, "logprobs": 1, "max_tokens": 2, "speculative": False})
        assert status == 200 and len(answer["choices"][0]["logprobs"]["token_logprobs"]) == 2
    finally:
        server.close()


# ---------------------------------------------------------------------------- defaults and usage


def test_server_defaults_apply_where_the_request_is_silent(lm):
    defaults = GenerationOptions(max_tokens=7, temperature=0.8, top_k=5, repetition_penalty=1.3)
    server = start_server(lm, defaults=defaults)
    try:
        status, _, answer = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "seed": 4})
        assert status == 200 and answer["usage"]["completion_tokens"] == 7
        sampled = answer["choices"][0]["text"]
        want = om.generate(lm[0], lm[1], lm[1].encode(PROMPT), GenerationOptions(
            max_tokens=7, temperature=0.8, top_k=5, repetition_penalty=1.3, seed=4)).tokens
        assert sampled == lm[1].decode(lm[1].encode(PROMPT) + want)[len(PROMPT):]
        status, _, answer = request(server, "POST", "/v1/completions",
                                    {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "repetition_penalty": 1})
        assert answer["usage"]["completion_tokens"] == 3  # the request's own fields win
        assert answer["choices"][0]["text"] == lm[1].decode(
            lm[1].encode(PROMPT) + continuation_tokens(lm, PROMPT, max_tokens=3))[len(PROMPT):]
    finally:
        server.close()


def test_serve_flags_share_generates_defaults():
    parser = build_parser()
    serve = parser.parse_args(["serve", "--model", "m"])
    generate = parser.parse_args(["generate", "--model", "m", "--prompt", "p"])
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        assert getattr(serve, name) == getattr(generate, name)
    args = parser.parse_args(["serve", "--model", "m", "--temp", "0.7", "--max-tokens", "9", "--log-level", "debug",
                              "--allowed-origins", "http://a", "http://b"])
    assert (args.temperature, args.max_tokens, args.log_level) == (0.7, 9, "debug")
    assert args.allowed_origins == ["http://a", "http://b"]


def test_include_usage_on_a_completion_stream(client):
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])


def test_serve_without_the_serve_extra_is_one_line(monkeypatch, capsys, tmp_path):
    """The packages of the extra missing: `serve` names the extra to install, before loading anything."""
    import sys

    import openelm_mlx
    from openelm_mlx.cli import main

    monkeypatch.delitem(sys.modules, "openelm_mlx.http_app")
    monkeypatch.delattr(openelm_mlx, "http_app", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "--model", str(tmp_path / "not-loaded")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'openelm-mlx[serve]'" in err[0], err
