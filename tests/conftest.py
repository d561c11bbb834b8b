"""Shared fixtures: a byte-fallback BPE SentencePiece model trained on the spot, tiny checkpoints."""

from __future__ import annotations

import io
import os

import pytest

# The suite runs on mlx[cpu]'s bundled reference BLAS wherever it runs, so a system OpenBLAS (which
# openelm_mlx would otherwise pick up, and which makes float32 the CPU default) changes no test.
# tests/test_bench.py checks the OpenBLAS path itself, in subprocesses.
os.environ.setdefault("OPENELM_MLX_BLAS", "reference")

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Python is a programming language.
Once upon a time there was a model that ran on a Mac with MLX.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
OpenELM uses layer-wise scaling: every layer has its own number of heads.
Numbers like 12345 and 2048 are split into digits. Hello world!
"""

# Text the tokenizer has never seen: Korean, emoji, accents and CJK go through byte fallback.
MULTILINGUAL = "Hello 안녕하세요 세계! 🙂👍🏽 naïve café — 日本語のテキスト, ok."

TINY_VOCAB = 320


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """Path of a tiny Llama-style tokenizer: BPE, byte fallback, digits split, unk 0 / bos 1 / eos 2."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 20), model_writer=model, vocab_size=TINY_VOCAB,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out
