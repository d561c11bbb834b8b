"""The `openelm-mlx` command: text on stdout, statistics on stderr, stdin prompts, and one-line errors
with exit code 2 (no traceback) for everything a user can get wrong."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx.cli import main

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
