"""Structured output: answers validate against their JSON schemas (the jsonschema package, independent of
llguidance), regexes (Python's re), choices and grammars, greedy and sampled; the mask never leaves no
token; speculative decoding keeps constrained greedy output; the tokenizer bridge; bad constraints."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from helpers import DOCS_TARGET, LLAMA2_TOKENIZER, noisy_copy, random_state_dict, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import Constraint, ConstraintError, GenerationOptions
from openelm_mlx.cli import main
from openelm_mlx.constraints import lltokenizer
from openelm_mlx.drafting import DraftModel, PromptLookup
from openelm_mlx.errors import InvalidOptionError

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "country": {"enum": ["US", "KR", "DE"]}},
            "required": ["country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["new", "old", "hot"]}, "minItems": 1, "maxItems": 3},
        "paid": {"type": "boolean"},
    },
    "required": ["id", "name", "address", "tags"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": NESTED,
    "array-bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                     "minItems": 2, "maxItems": 4},
    "string-pattern": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                       "required": ["sku"], "additionalProperties": False},
    "number-bounds": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["score"], "additionalProperties": False},
    "enum-and-const": {"type": "object", "properties": {"kind": {"const": "order"}, "level": {"enum": [1, 2, 3]}},
                       "required": ["kind", "level"], "additionalProperties": False},
}
SAMPLED = dict(temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def lm(tmp_path_factory, spm_model):
    """A tiny random model (not trained on JSON) with the byte-fallback tokenizer."""
    config = tiny_config()
    path = write_hf_checkpoint(tmp_path_factory.mktemp("constrained") / "tiny", config, random_state_dict(config),
                               tokenizer=spm_model)
    return om.load(path, dtype="float32")


def run(lm, prompt, constraint, max_tokens=300, **options):
    return om.generate(lm[0], lm[1], prompt, GenerationOptions(max_tokens=max_tokens, constraint=constraint, **options))


@pytest.mark.parametrize("name", SCHEMAS)
def test_answers_validate_against_their_schema_greedy_and_sampled(lm, name):
    schema = SCHEMAS[name]
    constraint = Constraint.json_schema(schema)
    for options in [{}] + [dict(SAMPLED, seed=seed) for seed in range(3)]:
        result = run(lm, "Here is the data:", constraint, **options)
        if name == "number-bounds" and result.finish_reason == "length":
            # JSON numbers have no length limit: a random model can write digits until max_tokens, but
            # never one outside the bounds.
            assert re.fullmatch(r'\{"score": (0\.[0-9]*|1\.0*)', result.text), result.text
            continue
        assert result.finish_reason == "stop", (options, result.text)
        jsonschema.validate(json.loads(result.text), schema)


def test_unconstrained_tiny_model_gives_no_json(lm):
    """What the constraint buys: the same model and prompt, free, is not JSON."""
    result = run(lm, "Here is the data:", None, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_any_json_object(lm):
    for seed in range(3):
        result = run(lm, "JSON:", Constraint.any_json(), max_tokens=400, seed=seed, **SAMPLED)
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)
        else:  # a random model may write one long string; what it wrote is still a JSON prefix
            assert result.finish_reason == "length" and result.text.startswith("{")


def test_max_tokens_mid_object_is_length_not_stop(lm):
    result = run(lm, "Here is the data:", Constraint.json_schema(NESTED), max_tokens=5)
    assert result.finish_reason == "length" and len(result.tokens) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_regex_choice_and_grammar(lm):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    choices = ["yes", "no", "maybe later"]
    grammar = 'start: sum\nsum: NUMBER (("+" | "-") NUMBER)* "="\nNUMBER: /[1-9][0-9]{0,2}/\n'
    for options in [{}] + [dict(SAMPLED, seed=seed) for seed in range(3)]:
        assert re.fullmatch(date, run(lm, "Date:", Constraint.regex(date), **options).text)
        assert run(lm, "Answer:", Constraint.choice(choices), **options).text in choices
        result = run(lm, "Sum:", Constraint.grammar(grammar), max_tokens=60, **options)
        if result.finish_reason == "stop":
            assert re.fullmatch(r"[1-9][0-9]{0,2}([+-][1-9][0-9]{0,2})*=", result.text), result.text
        else:
            assert re.fullmatch(r"[1-9][0-9]{0,2}([+-][1-9][0-9]{0,2})*[+-]?[0-9]*", result.text), result.text


def test_korean_values_stay_valid_utf8_and_json(lm):
    """Korean goes through byte-fallback pieces in this tokenizer: multi-token characters."""
    schema = {"type": "object", "properties": {"city": {"enum": ["서울", "부산", "대전"]},
                                               "note": {"type": "string", "maxLength": 4}},
              "required": ["city", "note"], "additionalProperties": False}
    for options in [{}] + [dict(SAMPLED, seed=seed) for seed in range(3)]:
        result = run(lm, "도시:", Constraint.json_schema(schema), **options)
        assert result.finish_reason == "stop" and "\ufffd" not in result.text
        value = json.loads(result.text.encode("utf-8").decode("utf-8"))
        jsonschema.validate(value, schema)
        assert lm[1].decode(result.tokens) == result.text


@pytest.mark.parametrize("constraint", [Constraint.json_schema(NESTED), Constraint.regex(r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)"),
                                        Constraint.grammar('start: "(" start ")" | "x"')],
                         ids=["schema", "regex", "grammar"])
def test_mask_never_excludes_every_token_and_eos_only_when_complete(lm, constraint):
    tokenizer = lm[1]
    width = lm[0].args.vocab_size
    rng = random.Random(0)
    for _ in range(5):  # random walks through what the mask allows
        state, tokens = constraint.start(tokenizer), []
        for _ in range(200):
            allowed = state.allowed(width)
            assert allowed.any()
            assert allowed[tokenizer.eos_id] == state.is_complete
            if state.is_finished:
                break
            choices = [int(t) for t in np.flatnonzero(allowed) if t != tokenizer.eos_id]
            token = rng.choice(choices)
            state.advance(token)
            tokens.append(token)
        if state.is_finished and constraint.kind == "json_schema":
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), NESTED)


@pytest.mark.slow
def test_speculative_constrained_greedy_equals_plain_constrained(lm, tmp_path):
    model, tokenizer = lm
    config = tiny_config()
    draft_path = write_hf_checkpoint(tmp_path / "draft", config, noisy_copy(random_state_dict(config)),
                                     tokenizer=lm[1].path)
    draft, _ = om.load(draft_path, dtype="float32")
    constraint = Constraint.json_schema(NESTED)
    options = GenerationOptions(max_tokens=200, constraint=constraint)
    plain = om.generate(model, tokenizer, "Here is the data:", options)
    for drafter in (DraftModel(draft), PromptLookup(2)):
        speculative = om.generate(model, tokenizer, "Here is the data:", options, draft=drafter)
        assert speculative.tokens == plain.tokens and speculative.finish_reason == plain.finish_reason
        assert speculative.stats.accepted_tokens > 0  # the drafts were used, not just refused
    for seed in range(2):
        sampled = om.generate(model, tokenizer, "Here is the data:",
                              GenerationOptions(max_tokens=200, constraint=constraint, seed=seed, **SAMPLED),
                              draft=DraftModel(draft))
        assert sampled.finish_reason == "stop"
        jsonschema.validate(json.loads(sampled.text), NESTED)


def test_batch_rows_each_keep_their_constraint(lm):
    constraint = Constraint.json_schema(SCHEMAS["enum-and-const"])
    prompts = ["Here is the data:", "A much longer prompt, with more words in it:"]
    results = om.batch_generate(lm[0], lm[1], prompts, GenerationOptions(max_tokens=100, constraint=constraint))
    for prompt, result in zip(prompts, results):
        assert result.tokens == run(lm, prompt, constraint, max_tokens=100).tokens
        jsonschema.validate(json.loads(result.text), SCHEMAS["enum-and-const"])


def test_repetition_penalty_and_top_k_keep_the_guarantee(lm):
    constraint = Constraint.json_schema(NESTED)
    for seed in range(2):
        result = run(lm, "Data:", constraint, seed=seed, temperature=0.7, top_k=5, min_p=0.05,
                     repetition_penalty=1.3)
        jsonschema.validate(json.loads(result.text), NESTED)


@pytest.mark.parametrize("tokenizer_source", ["tiny", "llama2"])
def test_tokenizer_bridge_spells_what_decode_spells(spm_model, tokenizer_source):
    if tokenizer_source == "llama2" and not LLAMA2_TOKENIZER.is_file():
        pytest.skip("the Llama-2 tokenizer is not in shared data")
    tokenizer = om.Tokenizer(spm_model if tokenizer_source == "tiny" else LLAMA2_TOKENIZER)
    bridge = lltokenizer(tokenizer)
    assert bridge.vocab_size == tokenizer.vocab_size and bridge.eos_token == tokenizer.eos_id
    assert bridge.is_special_token(tokenizer.eos_id) and bridge.is_special_token(tokenizer.bos_id)
    for text in ['{"a": [1, 2]}', "안녕하세요 세계", "naïve café\n\tok", " two  spaces"]:
        ids = tokenizer.encode(text, add_bos=False)
        assert bridge.decode_bytes(ids) == b"".join(tokenizer.piece_bytes(i) for i in ids)
        assert bridge.tokenize_str(text) and bridge.decode_str(bridge.tokenize_str(text)) == text


@pytest.mark.parametrize("build, reason", [
    (lambda: Constraint.json_schema({"type": "wat"}), "Invalid type"),
    (lambda: Constraint.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (lambda: Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema([1]), "must be an object"),
    (lambda: Constraint.regex("a(b"), "unclosed group"),
    (lambda: Constraint.grammar("start: missing_rule"), "missing_rule"),
    (lambda: Constraint.choice([]), "at least one option"),
])
def test_bad_constraints_say_why(build, reason):
    with pytest.raises(ConstraintError, match=re.escape(reason)) as info:
        build()
    assert "\n" not in str(info.value)


def test_constraint_options_that_cannot_combine():
    with pytest.raises(InvalidOptionError, match="stop strings cannot be combined"):
        GenerationOptions(constraint=Constraint.any_json(), stop=("}",))
    with pytest.raises(InvalidOptionError, match="constraint must be"):
        GenerationOptions(constraint='{"type": "object"}')


@pytest.mark.slow
def test_cli_constraint_flags(lm, tmp_path, capsys, spm_model):
    model_dir = tmp_path / "cli"
    config = tiny_config()
    write_hf_checkpoint(model_dir, config, random_state_dict(config), tokenizer=spm_model)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(NESTED))
    grammar_file = tmp_path / "g.lark"
    grammar_file.write_text('start: "a"+ "b"\n')
    base = ["generate", "--model", str(model_dir), "--dtype", "float32", "--prompt", "Data:", "--quiet",
            "--max-tokens", "300"]
    for flags, check in [
        (["--json-schema", str(schema_file)], lambda out: jsonschema.validate(json.loads(out), NESTED) is None),
        (["--json-schema", json.dumps(SCHEMAS["enum-and-const"])],
         lambda out: jsonschema.validate(json.loads(out), SCHEMAS["enum-and-const"]) is None),
        (["--json-object", "--temperature", "1", "--seed", "1", "--max-tokens", "1000"],
         lambda out: isinstance(json.loads(out), dict)),
        (["--regex", "[0-9]{3}-[0-9]{4}"], lambda out: re.fullmatch("[0-9]{3}-[0-9]{4}", out)),
        (["--choice", "red", "--choice", "green"], lambda out: out in ("red", "green")),
        (["--grammar", str(grammar_file)], lambda out: re.fullmatch("a+b", out)),
    ]:
        assert main(base + flags) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n") and check(out[:-1]), (flags, out)
    for flags, message in [
        (["--json-schema", '{"type": "wat"}'], "invalid JSON schema: Invalid type: wat"),
        (["--json-schema", "{nope"], "--json-schema: it is not valid JSON"),
        (["--json-schema", str(tmp_path / "missing.json")], "is neither a file nor a JSON object"),
        (["--json-schema", json.dumps({"type": "object", "description": "x" * 300})[:-1]], "it is not valid JSON"),
        (["--grammar", str(tmp_path / "missing.lark")], "is not a file"),
        (["--regex", "x", "--stop", "y"], "stop strings cannot be combined with a constraint"),
    ]:
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.skipif(not (DOCS_TARGET.is_dir() and LLAMA2_TOKENIZER.is_file()), reason="shared data is absent")
def test_docs_target_answers_validate():
    """A model trained on prose, not JSON: the constraint alone makes the answer valid."""
    model, tokenizer = om.load(DOCS_TARGET, tokenizer=LLAMA2_TOKENIZER, dtype="float32")
    schema = SCHEMAS["enum-and-const"] | {"properties": {**SCHEMAS["enum-and-const"]["properties"],
                                                          "title": {"type": "string", "maxLength": 24}},
                                          "required": ["kind", "level", "title"]}
    constraint = Constraint.json_schema(schema)
    for options in [{}, dict(SAMPLED, seed=0)]:
        result = om.generate(model, tokenizer, "A JSON record:",
                             GenerationOptions(max_tokens=80, constraint=constraint, **options))
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    answer = om.generate(model, tokenizer, "Is a tuple mutable? Answer:",
                         GenerationOptions(max_tokens=8, constraint=Constraint.choice(["yes", "no"])))
    assert answer.text in ("yes", "no") and answer.finish_reason == "stop"
