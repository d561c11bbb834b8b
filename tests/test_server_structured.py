"""`openelm-mlx serve` with response_format, driven by the official openai client: json_object and
json_schema on chat completions and completions, streamed and not; bad formats are 400s that say why, and
the server keeps serving."""

from __future__ import annotations

import json

import pytest

from serving import tiny_chat_checkpoint
import openelm_mlx as om
from openelm_mlx import Constraint, GenerationOptions
from openelm_mlx.engine import Engine
from openelm_mlx.openai_api import APIError, ServedModel, parse_response_format
from openelm_mlx.prompt_format import ZEPHYR, Message, conversation_ids

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytest.importorskip("starlette")
from openelm_mlx.http_app import OpenAIServer  # noqa: E402

MODEL_ID = "tiny-openelm"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"enum": ["서울", "Paris"]}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, spm_model):
    return om.load(tiny_chat_checkpoint(tmp_path_factory.mktemp("serve-structured") / "tiny", spm_model),
                   dtype="float32")


@pytest.fixture(scope="module")
def server(lm):
    model, tokenizer = lm
    served = ServedModel(MODEL_ID, tokenizer, ZEPHYR, model.args.max_context_length)
    server = OpenAIServer(Engine(model, tokenizer), served, host="127.0.0.1", port=0).start(with_worker=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Describe a person."}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_json_schema_validates(client, stream):
    for request in [{}, {"temperature": 1.0, "seed": 3}]:
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=120, stream=True,
                                                         response_format=JSON_SCHEMA_FORMAT, **request))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["stop"]
        else:
            reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=120,
                                                   response_format=JSON_SCHEMA_FORMAT, **request)
            text = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_chat_json_schema_equals_the_library(client, lm):
    """The server's greedy answer is the library's constrained greedy answer for the same prompt."""
    ids = conversation_ids(lm[1], ZEPHYR, [Message("user", MESSAGES[0]["content"])])
    expected = om.generate(lm[0], lm[1], ids, GenerationOptions(max_tokens=120,
                                                                 constraint=Constraint.json_schema(SCHEMA)))
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=120,
                                           response_format=JSON_SCHEMA_FORMAT)
    assert reply.choices[0].message.content == expected.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_object_on_chat_and_completions(client, stream):
    fmt = {"type": "json_object"}
    chat = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=400, stream=stream,
                                          response_format=fmt, temperature=0.8, seed=1)
    completion = client.completions.create(model=MODEL_ID, prompt="A JSON object:", max_tokens=400, stream=stream,
                                           temperature=0.8, seed=2, extra_body={"response_format": fmt})
    if stream:
        chat_chunks, completion_chunks = list(chat), list(completion)
        texts = ["".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices),
                 "".join(c.choices[0].text for c in completion_chunks if c.choices)]
        finishes = [[c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                    for chunks in (chat_chunks, completion_chunks)]
    else:
        texts = [chat.choices[0].message.content, completion.choices[0].text]
        finishes = [[chat.choices[0].finish_reason], [completion.choices[0].finish_reason]]
    for text, finish in zip(texts, finishes):
        if finish == ["stop"]:
            assert isinstance(json.loads(text), dict)
        else:  # a random model may run one string to max_tokens: then it says so
            assert finish == ["length"] and text.startswith("{")


def test_completions_json_schema(client):
    reply = client.completions.create(model=MODEL_ID, prompt="Person:", max_tokens=120,
                                      extra_body={"response_format": JSON_SCHEMA_FORMAT})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


def test_max_tokens_mid_object_is_length(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4,
                                           response_format=JSON_SCHEMA_FORMAT)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("response_format, reason", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}, "Invalid type: wat"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}},
     "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "the JSON Schema under 'schema'"),
    ({"type": "json_schema"}, "the JSON Schema under 'schema'"),
    ({"type": "xml"}, "not supported"),
    ("json", "must be an object"),
])
def test_bad_response_format_is_400_and_the_server_goes_on(client, response_format, reason):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8,
                                       extra_body={"response_format": response_format})
    assert reason in info.value.body["message"] and info.value.body["param"].startswith("response_format")
    normal = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4)
    assert normal.choices[0].finish_reason == "length"


def test_stop_with_response_format_is_400(client):
    with pytest.raises(openai.BadRequestError, match="stop strings cannot be combined"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, stop=["}"],
                                       response_format={"type": "json_object"})


def test_parse_response_format():
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == "json_object"
    assert parse_response_format(JSON_SCHEMA_FORMAT).kind == "json_schema"
    with pytest.raises(APIError) as info:
        parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}})
    assert info.value.status == 400 and "Invalid type" in info.value.message
