"""Shared by the chat and server tests: a tiny float32 checkpoint with its tokenizer, and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import text_only_state, tiny_config, write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_chat_checkpoint(directory: Path, tokenizer: Path, *, context: int = 2048) -> Path:
    """A tiny untied model whose greedy text is readable pieces (never EOS), float32 for exact greedy runs."""
    config = tiny_config(tied=False, max_context_length=context)
    return write_hf_checkpoint(directory, config, text_only_state(config, tokenizer), tokenizer=tokenizer)


def cli_command(*args: str) -> list:
    return [sys.executable, "-m", "openelm_mlx.cli", *args]


def cli_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=REPO)
