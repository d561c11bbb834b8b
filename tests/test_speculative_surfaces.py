"""Speculative decoding through its surfaces: `openelm-mlx generate` and `chat` flags, chat turns that
reuse both caches, `--draft-model auto`, and the one-line errors."""

from __future__ import annotations

import http.client
import io
import json
import sys

import pytest

from helpers import noisy_copy, random_state_dict, text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.chat import ChatSession
from openelm_mlx.cli import main
from openelm_mlx.drafting import DraftModel, PromptLookup, auto_draft_source
from openelm_mlx.errors import InvalidOptionError, LoadError
from openelm_mlx.openai_api import ServedModel
from openelm_mlx.prompt_format import ZEPHYR, Message, conversation_ids
from openelm_mlx.engine import Engine
from openelm_mlx.server import OpenAIServer

PROMPT = "The quick brown fox jumps over the quick brown fox"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, spm_model):
    """Target, a draft (the target plus noise) and a draft with another vocabulary, with tokenizers."""
    root = tmp_path_factory.mktemp("spec-cli")
    config = tiny_config(tied=False)
    state = text_only_state(config, spm_model)
    noisy = noisy_copy(state)
    other = tiny_config(vocab_size=400)
    return {
        "target": write_hf_checkpoint(root / "target", config, state, tokenizer=spm_model),
        "draft": write_hf_checkpoint(root / "draft", config, noisy),  # no tokenizer: the target's is used
        "other": write_hf_checkpoint(root / "other", other, random_state_dict(other), tokenizer=spm_model),
    }


@pytest.fixture(scope="module")
def lm(dirs):
    return om.load(dirs["target"], dtype="float32")


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def generate_args(dirs, *extra):
    return ["generate", "--model", str(dirs["target"]), "--dtype", "float32", "--prompt", PROMPT,
            "--max-tokens", "20", *extra]


@pytest.mark.parametrize("flags", [["--draft-model", "draft"], ["--prompt-lookup"], ["--prompt-lookup", "2"]])
@pytest.mark.parametrize("k", ["3", "auto"])
def test_generate_with_a_drafter_prints_the_plain_text_and_the_acceptance(dirs, lm, capsys, flags, k):
    flags = [str(dirs[f]) if f in dirs else f for f in flags]
    code, out, err = run_cli(capsys, *generate_args(dirs, *flags, "--num-draft-tokens", k))
    assert code == 0, err
    want = om.generate(*lm, PROMPT, GenerationOptions(max_tokens=20)).text
    assert out == want + "\n"
    assert "speculative: " in err and "drafts accepted" in err and "tokens per target pass" in err


def test_generate_without_a_drafter_prints_no_speculation_line(dirs, capsys):
    code, _, err = run_cli(capsys, *generate_args(dirs))
    assert code == 0 and "speculative" not in err


@pytest.mark.parametrize("extra, says", [
    (["--draft-model", "other"], "the draft model's vocabulary has 400 tokens but the target's has 320"),
    (["--prompt-lookup", "0"], "n-gram size must be a positive integer"),
    (["--num-draft-tokens", "0", "--prompt-lookup"], "num_draft_tokens must be a positive integer"),
    (["--draft-model", "auto"], "--draft-model auto works for apple/OpenELM-* models"),
    (["--prompt-lookup", "--sliding-window"], "cannot be combined with the sliding window"),
])
def test_bad_draft_options_are_one_line_errors(dirs, capsys, extra, says):
    extra = [str(dirs[e]) if e in dirs else e for e in extra]
    code, _, err = run_cli(capsys, *generate_args(dirs, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err


def test_num_draft_tokens_is_a_number_or_auto(dirs, capsys):
    code, _, err = run_cli(capsys, *generate_args(dirs, "--prompt-lookup", "--num-draft-tokens", "many"))
    assert code == 2 and "--num-draft-tokens: expected a positive integer or auto, got 'many'" in err


def test_draft_model_and_prompt_lookup_exclude_each_other(dirs, capsys):
    code, _, err = run_cli(capsys, *generate_args(dirs, "--draft-model", str(dirs["draft"]), "--prompt-lookup"))
    assert code == 2 and "not allowed with argument" in err


def test_chat_turns_with_a_draft_equal_fresh_plain_runs(dirs, lm):
    """Each reply equals plain greedy decoding of the whole conversation; both caches are reused."""
    draft = DraftModel(om.load(dirs["draft"], dtype="float32", tokenizer=lm[1].path)[0])
    options = GenerationOptions(max_tokens=12, num_draft_tokens=3)
    chat = ChatSession(lm[0], lm[1], ZEPHYR, options, draft=draft)
    for message in ("Hello world", "Once upon a time"):
        chat.ask(message)
        ids = chat.prompt_ids()
        replies = list(chat.reply())
        assert [r.token for r in replies if r.token >= 0] == om.generate(*lm, ids, options).tokens
        assert replies[-1].drafted_tokens > 0
    assert chat.stats.cached_tokens > 0
    assert draft.tokens[:chat.stats.cached_tokens] == chat.prompt_cache.tokens[:chat.stats.cached_tokens]


def test_chat_verbose_prints_the_acceptance(dirs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(dirs["target"]), "--dtype", "float32", "--verbose",
                             "--max-tokens", "8", "--prompt-lookup")
    assert code == 0, err
    assert "[speculative: " in err and "drafts accepted" in err


# ---------------------------------------------------------------------------- --draft-model auto


@pytest.mark.parametrize("target, draft", [("OpenELM-3B-Instruct", "OpenELM-270M-Instruct"),
                                           ("OpenELM-1_1B", "OpenELM-270M")])
def test_auto_finds_the_270m_of_the_same_variant_next_to_the_target(tmp_path, target, draft):
    for name in (target, "OpenELM-270M", "OpenELM-270M-Instruct"):  # both variants are there
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert auto_draft_source(str(tmp_path / target)) == str(tmp_path / draft)


def test_auto_says_how_to_get_a_missing_draft(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LoadError, match=r"needs apple/OpenELM-270M-Instruct, .*huggingface-cli download"):
        auto_draft_source("apple/OpenELM-3B-Instruct")


@pytest.mark.parametrize("target, says", [("apple/OpenELM-270M", "already the smallest"),
                                          ("mlx-community/Llama-3-8B", "works for apple/OpenELM-\\* models")])
def test_auto_refuses_targets_it_has_no_draft_for(target, says):
    with pytest.raises(InvalidOptionError, match=says):
        auto_draft_source(target)


def test_prompt_lookup_is_exported_for_the_python_api():
    assert om.PromptLookup is PromptLookup and om.DraftModel is DraftModel


# ---------------------------------------------------------------------------- serve --draft-model


@pytest.fixture(scope="module")
def draft_server(dirs, lm):
    model, tok = lm
    draft = DraftModel(om.load(dirs["draft"], dtype="float32", tokenizer=tok.path)[0])
    served = ServedModel("tiny", tok, ZEPHYR, model.args.max_context_length)
    server = OpenAIServer(Engine(model, tok, max_batch=1, draft=draft, num_draft_tokens=3), served, host="127.0.0.1",
                          port=0).start(with_worker=True)
    yield server
    server.close()


def post(server, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response.status, payload


def test_the_server_drafts_and_a_greedy_reply_is_unchanged(draft_server, lm):
    messages = [{"role": "user", "content": "Hello world"}]
    want = om.generate(*lm, conversation_ids(lm[1], ZEPHYR, [Message("user", "Hello world")]),
                       GenerationOptions(max_tokens=16)).text
    for speculative in (True, False):
        status, payload = post(draft_server, {"messages": messages, "max_tokens": 16, "speculative": speculative})
        assert status == 200 and json.loads(payload)["choices"][0]["message"]["content"] == want
        record = draft_server.worker.records[-1]
        assert (record.drafted_tokens > 0) is speculative
    status, payload = post(draft_server, {"messages": messages, "max_tokens": 16, "stream": True})
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
              for line in payload.splitlines() if line.startswith("data: {")]
    assert status == 200 and "".join(deltas) == want and draft_server.worker.records[-1].drafted_tokens > 0


def test_the_server_refuses_a_speculative_flag_that_is_not_a_boolean(draft_server):
    status, payload = post(draft_server, {"messages": [{"role": "user", "content": "Hi"}], "speculative": "no"})
    assert status == 400 and "'speculative' must be a boolean" in payload
