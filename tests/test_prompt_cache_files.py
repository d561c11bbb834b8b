"""Prompt cache files: generation from a loaded cache equals a fresh run (greedy, token for token); files
of another model, dtype or KV quantization, and corrupt or truncated ones, are refused with one line;
cache-prompt and generate --prompt-cache on the command line; a directory of files for the server."""

from __future__ import annotations

import io
import sys
from dataclasses import replace

import mlx.core as mx
import pytest

from helpers import noisy_copy, text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.cli import main
from openelm_mlx.generation import new_cache
from openelm_mlx.prompt_files import (PromptCacheFileError, cached_prefix, load_cache_dir, load_prompt_cache,
                                      save_prompt_cache, save_store)
from openelm_mlx.prompt_store import PrefixStore

PREFIX = "Once upon a time there was a model that ran on a Mac with MLX."
SUFFIX_TEXT = " Hello world! Python is a programming language."
OPTIONS = GenerationOptions(max_tokens=8)
Q8 = GenerationOptions(max_tokens=8, kv_bits=8, kv_group_size=32)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, spm_model):
    """(a tiny model, the same architecture with other weights), head_dim 32 so the cache can be quantized."""
    root = tmp_path_factory.mktemp("files")
    config = tiny_config(tied=False, head_dim=32)
    state = text_only_state(config, spm_model)
    return (write_hf_checkpoint(root / "a", config, state, tokenizer=spm_model),
            write_hf_checkpoint(root / "b", config, noisy_copy(state, scale=0.01), tokenizer=spm_model))


@pytest.fixture(scope="module")
def lm(dirs):
    return om.load(dirs[0], dtype="float32")


def write_cache(lm, path, text=PREFIX, options=OPTIONS):
    ids = lm[1].encode(text)
    cache = new_cache(lm[0], options)
    list(om.stream_generate(lm[0], lm[1], ids, replace(options, max_tokens=0), cache=cache))
    save_prompt_cache(path, lm[0], ids, cache)
    return ids


@pytest.mark.parametrize("options", [OPTIONS, Q8], ids=["plain", "8-bit"])
@pytest.mark.parametrize("suffix", [SUFFIX_TEXT, ""], ids=["longer", "same"])
def test_generation_from_a_loaded_cache_equals_a_fresh_run(lm, tmp_path, options, suffix):
    model, tok = lm
    cached_ids = write_cache(lm, tmp_path / "p.safetensors", options=options)
    prompt = tok.encode(PREFIX + suffix)
    assert prompt[:len(cached_ids)] == cached_ids
    cache, held = cached_prefix(tmp_path / "p.safetensors", model, prompt, options)
    assert held == min(len(cached_ids), len(prompt) - 1)
    tokens = om.generate(model, tok, prompt[held:], options, cache=cache, context_ids=prompt[:held]).tokens
    assert tokens == om.generate(model, tok, prompt, options).tokens


def test_a_loaded_cache_takes_the_sliding_window_it_is_asked_for(lm, tmp_path):
    write_cache(lm, tmp_path / "p.safetensors")
    _, cache = load_prompt_cache(tmp_path / "p.safetensors", lm[0], GenerationOptions(sliding_window=True))
    assert cache[0].max_size == lm[0].args.max_context_length


def assert_refused(path, model, options, *needles):
    with pytest.raises(PromptCacheFileError) as info:
        load_prompt_cache(path, model, options)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_another_model_is_refused(lm, dirs, tmp_path):
    write_cache(lm, tmp_path / "p.safetensors")
    other = om.load(dirs[1], dtype="float32")[0]
    assert_refused(tmp_path / "p.safetensors", other, OPTIONS, "another model")


def test_another_dtype_is_refused(lm, dirs, tmp_path):
    write_cache(lm, tmp_path / "p.safetensors")
    bf16 = om.load(dirs[0], dtype="bfloat16")[0]
    assert_refused(tmp_path / "p.safetensors", bf16, OPTIONS, "float32 model", "--dtype float32")


def test_another_kv_quantization_is_refused(lm, tmp_path):
    write_cache(lm, tmp_path / "q.safetensors", options=Q8)
    assert_refused(tmp_path / "q.safetensors", lm[0], OPTIONS, "8-bit", "--kv-bits 8 --kv-group-size 32")
    write_cache(lm, tmp_path / "p.safetensors")
    assert_refused(tmp_path / "p.safetensors", lm[0], Q8, "unquantized")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a cache", "empty", "missing"])
def test_a_corrupt_file_is_refused(lm, tmp_path, damage):
    path = tmp_path / "p.safetensors"
    write_cache(lm, path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flipped byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0x40]) + data[-99:])
    elif damage == "not a cache":
        mx.save_safetensors(str(path), {"x": mx.zeros((2,))})
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    needle = {"truncated": "truncated or corrupt", "flipped byte": "checksum", "not a cache": "cache-prompt",
              "empty": "truncated or corrupt", "missing": "no prompt cache file"}[damage]
    assert_refused(path, lm[0], OPTIONS, needle)


def test_a_prompt_that_does_not_start_with_the_cached_ids(lm, tmp_path):
    cached = write_cache(lm, tmp_path / "p.safetensors")
    prompt = lm[1].encode("Hello world")
    at = next(i for i, (a, b) in enumerate(zip(cached, prompt)) if a != b)
    with pytest.raises(PromptCacheFileError, match=f"the 54 tokens cached in .* differ from token {at} on"):
        cached_prefix(tmp_path / "p.safetensors", lm[0], prompt, OPTIONS)
    assert len(cached) == 54
    with pytest.raises(PromptCacheFileError, match=r"\(the prompt is only 10 tokens\)"):
        cached_prefix(tmp_path / "p.safetensors", lm[0], cached[:10], OPTIONS)


def test_writing_is_atomic_and_never_overwrites_unasked(lm, tmp_path):
    path = tmp_path / "p.safetensors"
    write_cache(lm, path)
    with pytest.raises(PromptCacheFileError, match="already exists: pass --force"):
        write_cache(lm, path)
    with pytest.raises(PromptCacheFileError, match="must end in .safetensors"):
        write_cache(lm, tmp_path / "p.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind


def test_a_directory_round_trip_for_the_server(lm, tmp_path):
    model, tok = lm
    store = PrefixStore(model)
    conversations = [tok.encode(PREFIX), tok.encode("def fibonacci(n): return n")]
    for ids in conversations:
        cache, held = store.lookup(ids, OPTIONS)
        list(om.stream_generate(model, tok, ids[held:], GenerationOptions(max_tokens=0), cache=cache))
        store.insert(ids, cache)
    assert len(save_store(store, tmp_path)) == 2
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    reloaded = PrefixStore(model)
    refused = load_cache_dir(tmp_path, reloaded, OPTIONS)
    assert len(refused) == 1 and "junk.safetensors" in refused[0]
    assert sorted(e.tokens for e in reloaded) == sorted(tuple(ids) for ids in conversations)
    for ids in conversations:
        assert reloaded.lookup(ids + [40], OPTIONS)[1] == len(ids)


# ---------------------------------------------------------------------------- command line


def run_main(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def test_cache_prompt_then_generate_from_it(capsys, dirs, tmp_path):
    prompt_file, out = tmp_path / "prefix.txt", tmp_path / "prefix.safetensors"
    prompt_file.write_text(PREFIX)
    model = ["--model", str(dirs[0]), "--dtype", "float32"]
    code, _, err = run_main(capsys, ["cache-prompt", *model, "--prompt-file", str(prompt_file), "--out", str(out)])
    assert code == 0 and out.exists() and "cached" in err, err
    generate = ["generate", *model, "--prompt", PREFIX + SUFFIX_TEXT, "--max-tokens", "8"]
    code, plain, _ = run_main(capsys, generate)
    code2, cached, err = run_main(capsys, [*generate, "--prompt-cache", str(out)])
    assert code == code2 == 0 and cached == plain
    assert f"prompt cache: {len(om.load(dirs[0], dtype='float32')[1].encode(PREFIX))} tokens" in err


@pytest.mark.parametrize("case", ["exists", "other model", "bad suffix", "group size", "missing file", "not text"])
def test_cache_prompt_errors_are_one_line(capsys, dirs, tmp_path, case):
    prompt_file, out = tmp_path / "prefix.txt", tmp_path / "prefix.safetensors"
    prompt_file.write_text(PREFIX)
    args = ["cache-prompt", "--model", str(dirs[0]), "--dtype", "float32", "--prompt-file", str(prompt_file)]
    assert run_main(capsys, [*args, "--out", str(out)])[0] == 0
    if case == "exists":
        argv, command, needle = [*args, "--out", str(out)], "cache-prompt", "--force"
    elif case == "bad suffix":
        argv, command, needle = [*args, "--out", str(tmp_path / "x.bin")], "cache-prompt", ".safetensors"
    elif case == "missing file":
        argv, command, needle = [*args[:-1], str(tmp_path / "nope.txt"), "--out", str(tmp_path / "m.safetensors")], \
            "cache-prompt", "cannot read --prompt-file"
    elif case == "not text":
        (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
        argv, command, needle = [*args[:-1], str(tmp_path / "binary.txt"), "--out", str(tmp_path / "m.safetensors")], \
            "cache-prompt", "is not UTF-8 text"
    elif case == "group size":
        argv, command, needle = [*args, "--out", str(tmp_path / "q.safetensors"), "--kv-bits", "8"], \
            "cache-prompt", "head_dim (32)"
    else:
        argv = ["generate", "--model", str(dirs[1]), "--dtype", "float32", "--prompt", PREFIX, "--prompt-cache",
                str(out)]
        command, needle = "generate", "another model"
    code, out_text, err = run_main(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2 and out_text == "" and len(lines) == 1, err
    assert lines[0].startswith(f"openelm-mlx {command}: error: ") and needle in lines[0], err


def test_serve_reloads_the_prefixes_it_saved_on_shutdown(capsys, monkeypatch, dirs, tmp_path):
    """serve --prompt-cache-dir: a conversation cached before a restart is served from the cache after it."""
    from openelm_mlx.engine import Engine, Job
    from openelm_mlx.openai_api import COMPLETION, ServedModel
    from openelm_mlx.openai_requests import parse_request
    from openelm_mlx.prompt_format import RAW

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "broken.safetensors").write_bytes(b"not safetensors")
    records = []

    def one_request_then_ctrl_c(worker):
        served = ServedModel("m", worker.tokenizer, RAW, 2048)
        worker.submit(Job(parse_request(COMPLETION, b'{"prompt": "%s", "max_tokens": 4}' % PREFIX.encode(),
                                        served)))
        worker.run_until_idle()
        records.append(worker.records[-1])
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "run", one_request_then_ctrl_c)
    argv = ["serve", "--model", str(dirs[0]), "--dtype", "float32", "--port", "0", "--prompt-cache-dir",
            str(tmp_path / "cache")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "saved 1 cached prefixes" in err and err.count("warning: skipped") == 1 and "broken.safetensors" in err
    assert main(argv) == 130
    first, second = records
    prompt_len = len(om.load(dirs[0], dtype="float32")[1].encode(PREFIX))
    assert first.cached_tokens == 0 and second.cached_tokens == prompt_len - 1
