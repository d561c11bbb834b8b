"""The `openelm-mlx` command: text on stdout, statistics on stderr, stdin prompts, and one-line errors
with exit code 2 (no traceback) for everything a user can get wrong."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from helpers import text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import cli_args, commands, config, synthetic
from openelm_mlx.cli import main
from openelm_mlx.prompt_format import RAW, ZEPHYR, Message, conversation_ids

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, spm_model):
    """(checkpoint with its tokenizer.model, same without one, one with a 16-token context)."""
    root = tmp_path_factory.mktemp("cli")
    config = tiny_config(tied=False)
    state = text_only_state(config, spm_model)
    with_tok = write_hf_checkpoint(root / "with_tok", config, state, tokenizer=spm_model)
    without = write_hf_checkpoint(root / "no_tok", config, state)
    short = write_hf_checkpoint(root / "short", tiny_config(tied=False, max_context_length=16), state,
                                tokenizer=spm_model)
    return with_tok, without, short


@pytest.fixture(scope="module")
def expected(dirs):
    model, tok = om.load(dirs[0], dtype="float32")

    def run(prompt=PROMPT, **options):
        return om.generate(model, tok, prompt, om.GenerationOptions(**options))

    return run


def base_args(model_dir, *extra):
    return ["generate", "--model", str(model_dir), "--dtype", "float32", *extra]


def run_main(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("openelm-mlx generate: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------- success


def test_text_to_stdout_statistics_to_stderr(capsys, dirs, expected):
    code, out, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "8"))
    want = expected(max_tokens=8)
    assert code == 0
    assert out == want.text + "\n"
    assert f"prompt: {want.stats.prompt_tokens} tokens" in err
    assert "generation: 8 tokens" in err and "finish reason: length" in err
    assert "peak memory:" in err and "tokens/s" in err
    assert want.text not in err


def test_quiet_prints_no_statistics(capsys, dirs, expected):
    code, out, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "5", "--quiet"))
    assert (code, out, err) == (0, expected(max_tokens=5).text + "\n", "")


def test_prompt_from_stdin(capsys, monkeypatch, dirs, expected):
    code, out, _ = run_main(capsys, base_args(dirs[0], "--prompt", "-", "--max-tokens", "6", "--quiet"),
                            stdin="Hello world", monkeypatch=monkeypatch)
    assert code == 0
    assert out == expected("Hello world", max_tokens=6).text + "\n"


def test_sampling_and_stop_flags_reach_the_generator(capsys, dirs, expected):
    args = ["--prompt", PROMPT, "--max-tokens", "12", "--temp", "0.9", "--top-k", "8", "--top-p", "0.95",
            "--min-p", "0.01", "--repetition-penalty", "1.3", "--repetition-context-size", "8", "--seed", "5",
            "--quiet"]
    code, out, _ = run_main(capsys, base_args(dirs[0], *args))
    want = expected(max_tokens=12, temperature=0.9, top_k=8, top_p=0.95, min_p=0.01, repetition_penalty=1.3,
                    repetition_context_size=8, seed=5)
    assert code == 0 and out == want.text + "\n"
    stop = want.text[3:5]
    code, out, err = run_main(capsys, base_args(dirs[0], *args[:-1], "--stop", "\u2603", "--stop", stop))
    assert code == 0 and out == want.text[:want.text.find(stop)] + "\n"
    assert "finish reason: stop" in err


def test_sliding_window_flag(capsys, dirs):
    """--sliding-window on a 16-token context. The CLI does not expose prefill_step, and its default
    (512) does not fit this tiny context: that must be a one-line error, not a traceback."""
    code, out, err = run_main(capsys, base_args(dirs[2], "--prompt", PROMPT, "--max-tokens", "30"))
    assert code == 0 and "finish reason: length" in err
    n_plain = int(err.split("generation: ")[1].split(" tokens")[0])
    assert n_plain < 30  # stopped at the context
    code, out, err = run_main(capsys, base_args(dirs[2], "--prompt", PROMPT, "--max-tokens", "30",
                                                "--sliding-window"))
    assert code == 2
    assert_one_line_error(err, "prefill_step", "16-token context")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-p", "1.5", "top_p"),
    ("--min-p", "1", "min_p"),
    ("--max-tokens", "-3", "max_tokens"),
    ("--top-k", "-1", "top_k"),
    ("--repetition-penalty", "0", "repetition_penalty"),
    ("--stop", "", "stop"),
])
def test_invalid_option_is_one_line_exit_2(capsys, dirs, flag, value, needle):
    code, out, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, flag, value))
    assert code == 2 and out == ""
    assert_one_line_error(err, needle)


def test_options_are_checked_before_the_model_is_loaded(capsys, tmp_path):
    code, _, err = run_main(capsys, base_args(tmp_path / "missing", "--prompt", PROMPT, "--top-p", "2"))
    assert code == 2
    assert_one_line_error(err, "top_p")


def test_malformed_number_is_an_argparse_error(capsys, dirs):
    code, out, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "many"))
    assert code == 2 and out == ""
    assert "--max-tokens" in err and "invalid int value" in err and "Traceback" not in err


def test_missing_required_prompt(capsys, dirs):
    code, _, err = run_main(capsys, ["generate", "--model", str(dirs[0])])
    assert code == 2 and "--prompt" in err


def test_missing_tokenizer_hints_at_llama2(capsys, dirs):
    code, out, err = run_main(capsys, base_args(dirs[1], "--prompt", PROMPT))
    assert code == 2 and out == ""
    assert_one_line_error(err, "tokenizer.model", "Llama-2", "--tokenizer")


def test_explicit_tokenizer_for_a_checkpoint_without_one(capsys, dirs, spm_model, expected):
    code, out, _ = run_main(capsys, base_args(dirs[1], "--tokenizer", str(spm_model), "--prompt", PROMPT,
                                              "--max-tokens", "4", "--quiet"))
    assert code == 0 and out == expected(max_tokens=4).text + "\n"


def test_tokenizer_path_that_does_not_exist(capsys, dirs, tmp_path):
    code, _, err = run_main(capsys, base_args(dirs[1], "--tokenizer", str(tmp_path / "nope.model"),
                                              "--prompt", PROMPT))
    assert code == 2
    assert_one_line_error(err, "nope.model")


@pytest.mark.parametrize("path", ["/nonexistent/openelm-model", "./no-such-model-dir"])
def test_nonexistent_model_path(capsys, path):
    code, out, err = run_main(capsys, base_args(path, "--prompt", PROMPT))
    assert code == 2 and out == ""
    assert_one_line_error(err, "no-such" if "no-such" in path else "nonexistent")


def test_prompt_longer_than_the_context(capsys, dirs):
    code, _, err = run_main(capsys, base_args(dirs[2], "--prompt", "word " * 40))
    assert code == 2
    assert_one_line_error(err, "context is 16 tokens")


# ---------------------------------------------------------------------------- real processes


def _env():
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTHONSTARTUP", None)
    return env


def test_subprocess_module_reads_stdin(dirs, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *base_args(dirs[0], "--prompt", "-", "--max-tokens", "6")],
        input="Hello world", capture_output=True, text=True, encoding="utf-8", env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected("Hello world", max_tokens=6).text + "\n"
    assert "generation: 6 tokens" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_error_exit_code(dirs):
    script = Path(sys.executable).parent / "openelm-mlx"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "openelm_mlx.cli"]
    proc = subprocess.run([*command, *base_args(dirs[1], "--prompt", PROMPT)], capture_output=True, text=True,
                          encoding="utf-8", env=_env(), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "Llama-2")
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=_env(), timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"openelm-mlx {om.__version__}"


# ---------------------------------------------------------------------------- chat templates in generate


@pytest.fixture(scope="module")
def instruct(tmp_path_factory, spm_model):
    """An Instruct-named checkpoint (the same weights as dirs[0]) and its loaded model."""
    config_json = tiny_config(tied=False)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("cli") / "OpenELM-tiny-Instruct", config_json,
                               text_only_state(config_json, spm_model), tokenizer=spm_model)
    return path, om.load(path, dtype="float32")


def test_generate_applies_an_instruct_models_chat_template(capsys, instruct):
    """As mlx_lm.generate does: the prompt becomes the user turn of the default template (zephyr here)."""
    path, (model, tok) = instruct

    def want(messages, template=ZEPHYR):
        ids = conversation_ids(tok, template, messages)
        return om.generate(model, tok, ids, om.GenerationOptions(max_tokens=6)).text + "\n"

    user = Message("user", "Hello world")
    argv = base_args(path, "--prompt", "Hello world", "--max-tokens", "6", "--quiet")
    assert run_main(capsys, argv)[:2] == (0, want([user]))
    assert run_main(capsys, argv + ["--system-prompt", "Be brief."])[:2] == (
        0, want([Message("system", "Be brief."), user]))
    raw = om.generate(model, tok, "Hello world", om.GenerationOptions(max_tokens=6)).text + "\n"
    assert run_main(capsys, argv + ["--ignore-chat-template"])[:2] == (0, raw)
    assert run_main(capsys, argv + ["--raw"])[:2] == (0, raw)
    assert run_main(capsys, argv + ["--chat-template", "raw", "--system", "Story."])[:2] == (
        0, want([Message("system", "Story."), user], RAW))
    code, _, err = run_main(capsys, argv + ["--raw", "--chat-template", "zephyr"])
    assert code == 2 and "not allowed with" in err


def test_generate_keeps_a_base_models_prompt_raw(capsys, dirs, expected):
    code, out, _ = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "5", "--quiet",
                                              "--chat-template", "zephyr"))
    assert code == 0 and out != expected(max_tokens=5).text + "\n"  # an explicit template is applied
    code, out, _ = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "5", "--quiet"))
    assert (code, out) == (0, expected(max_tokens=5).text + "\n")


# ---------------------------------------------------------------------------- stopping, pipes


@pytest.mark.parametrize("quiet", [False, True])
def test_a_completion_cut_by_the_full_context_says_so(capsys, monkeypatch, dirs, quiet):
    responses = [om.GenerationResponse("Once", 5), om.GenerationResponse(" more", 6, finish_reason="length",
                                                                       context_full=True, generation_tokens=2)]
    monkeypatch.setattr(commands, "stream_generate", lambda *a, **k: iter(responses))
    code, out, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT, *(["--quiet"] if quiet else [])))
    assert code == 0 and out == "Once more\n"
    assert "[stopped: the 2048-token context is full]" in err.splitlines()
    responses[-1] = om.GenerationResponse(" more", 6, finish_reason="length", generation_tokens=2)
    code, _, err = run_main(capsys, base_args(dirs[0], "--prompt", PROMPT))
    assert code == 0 and "context is full" not in err


def test_a_closed_stdout_pipe_ends_quietly(dirs):
    """`openelm-mlx generate ... | head -c 0`: the reader is gone before the first token."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "openelm_mlx.cli",
                               *base_args(dirs[0], "--prompt", PROMPT, "--max-tokens", "50")],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=_env(), timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, no "Exception ignored"


# ---------------------------------------------------------------------------- synthetic models


@pytest.fixture
def tiny_preset(monkeypatch):
    """A 'TINY' preset next to the released sizes, so synthetic:tiny builds in milliseconds."""
    monkeypatch.setitem(config.PRESETS, "TINY", tiny_config(tied=False))
    return config.ModelArgs.from_dict(tiny_config(tied=False))


def test_load_builds_a_synthetic_model_in_python(capsys, tiny_preset, spm_model):
    model, tok = om.load("synthetic:tiny", dtype="float32", tokenizer=spm_model)
    assert model.args == tiny_preset and tok.path == spm_model
    want = synthetic.random_weights(tiny_preset, dtype=mx.float32)
    got = dict(tree_flatten(model.parameters()))
    assert set(got) == set(want) and all(bool((got[k] == want[k]).all()) for k in want)
    assert capsys.readouterr().err == ""  # the notice is the command line's, not the library's
    with pytest.raises(om.TokenizerNotFoundError):
        om.load("synthetic:tiny")
    with pytest.raises(om.ConfigError, match="unknown preset"):
        om.load("synthetic:7B", tokenizer=spm_model)


def test_the_command_line_loads_synthetic_models_through_load(capsys, monkeypatch, tiny_preset, spm_model):
    calls = []
    monkeypatch.setattr(cli_args, "load", lambda *a, **k: calls.append(a) or om.load(*a, **k))
    code, out, err = run_main(capsys, ["generate", "--model", "synthetic:tiny", "--tokenizer", str(spm_model),
                                       "--dtype", "float32", "--prompt", PROMPT, "--max-tokens", "4", "--quiet"])
    model, tok = om.load("synthetic:tiny", dtype="float32", tokenizer=spm_model)
    assert code == 0 and out == om.generate(model, tok, PROMPT, om.GenerationOptions(max_tokens=4)).text + "\n"
    assert calls == [("synthetic:tiny",)]
    assert "[synthetic model: random weights of the real tiny architecture; its text is gibberish]" in err
