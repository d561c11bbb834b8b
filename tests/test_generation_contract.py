"""The generation loop's promises seen through its users: the chat session, the HTTP server and the CLI.
A repetition-penalised request gives the same text whether its prompt came from the cache or not, and a
seed out of mx.random.key's range is a one-line error (CLI) or a 400 (server), never a crash."""

from __future__ import annotations

import pytest

# The server tests' tiny checkpoint, model and server fixtures (module-scoped: this module gets its own).
from test_server import USER, assert_error, chat_ids, checkpoint, expected, lm, post, server  # noqa: F401
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.chat import ChatSession
from openelm_mlx.generation import SEED_LIMIT
from openelm_mlx.prompt_format import ZEPHYR

PENALISED = dict(max_tokens=12, repetition_penalty=1.5)


def test_a_chat_turn_with_a_penalty_equals_a_fresh_run(lm):
    """The second turn's prompt is mostly cached; the penalty window (64 ids) reaches into the cached part."""
    options = GenerationOptions(repetition_context_size=64, **PENALISED)
    chat = ChatSession(lm[0], lm[1], ZEPHYR, options)
    for message in ("Hello world", "Once upon a time"):
        chat.ask(message)
        ids = chat.prompt_ids()
        reply = [r.token for r in chat.reply() if r.token >= 0]
        assert reply == om.generate(lm[0], lm[1], ids, options).tokens
    assert chat.stats.cached_tokens > 0


def test_the_server_repeats_a_penalised_request_exactly(server, lm):
    body = {"messages": USER, **PENALISED}
    first, second = (post(server, "/v1/chat/completions", body) for _ in range(2))
    assert first[0] == second[0] == 200
    assert second[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(chat_ids(lm, USER)) - 1
    want = expected(lm, chat_ids(lm, USER), **PENALISED).text
    assert first[1]["choices"][0]["message"]["content"] == second[1]["choices"][0]["message"]["content"] == want


@pytest.mark.parametrize("seed", [-1, 1e20, SEED_LIMIT])
def test_the_server_refuses_a_seed_out_of_range(server, seed):
    body = {"messages": USER, "max_tokens": 4, "temperature": 1.0, "seed": seed}
    assert_error(post(server, "/v1/chat/completions", body), 400, says="seed")
    status, reply = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 4})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"


def test_the_largest_seed_samples_reproducibly(server, lm):
    body = {"messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": SEED_LIMIT - 1}
    first, second = (post(server, "/v1/chat/completions", body) for _ in range(2))
    assert first[0] == second[0] == 200
    text = first[1]["choices"][0]["message"]["content"]
    assert text == second[1]["choices"][0]["message"]["content"]
    assert text == expected(lm, chat_ids(lm, USER), max_tokens=12, temperature=1.0, seed=SEED_LIMIT - 1).text


@pytest.mark.parametrize("seed", ["-1", str(SEED_LIMIT)])
def test_the_cli_refuses_a_seed_out_of_range(checkpoint, capsys, seed):
    from openelm_mlx.cli import main

    assert main(["generate", "--model", str(checkpoint), "--prompt", "Hello", "--seed", seed]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("openelm-mlx generate: error: seed must be an integer"), err
