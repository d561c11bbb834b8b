"""OpenELM's tokenizer (the Llama-2 SentencePiece model) and an exact streaming detokenizer.

mlx-lm's SPMStreamingDetokenizer is the model for the streaming part, but importing any mlx_lm
module runs mlx_lm/__init__.py, which imports transformers (and torch where installed): seconds
of start-up and a torch import the runtime must not have. So the ~30 lines live here, and the
tests check them against mlx-lm's.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import sentencepiece as spm

from .errors import LoadError, TokenizerNotFoundError

TOKENIZER_FILE = "tokenizer.model"
_SPACE = "\u2581".encode("utf-8")  # SentencePiece's word-start marker


class Tokenizer:
    """SentencePiece with OpenELM's conventions: BOS prepended, EOS ends generation."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise LoadError(f"{path} is not a readable SentencePiece model: {e}") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        # Bytes of each piece: <0xNN> pieces are raw bytes (byte fallback), others UTF-8 text.
        self._piece_bytes = [self._bytes_of(i) for i in range(self.vocab_size)]

    def _bytes_of(self, token: int) -> bytes:
        if self.sp.is_byte(token):
            return bytes([int(self.sp.id_to_piece(token)[3:5], 16)])
        if self.sp.is_control(token) or self.sp.is_unknown(token):
            return b""
        return self.sp.id_to_piece(token).encode("utf-8")

    def encode(self, text: str, *, add_bos: bool = True) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_bytes(self, token: int) -> bytes:
        return self._piece_bytes[token] if 0 <= token < self.vocab_size else b""

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns tokens into text one at a time, in linear time.

    Holds back bytes that do not yet form complete UTF-8 (byte-fallback characters span several
    tokens) and drops the dummy-prefix space of the first word, so the concatenated segments
    equal `tokenizer.decode(all_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.text = ""
        self.tokens: List[int] = []
        self._pending = b""

    def add_token(self, token: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.tokens.append(token)
        self._pending += self._tokenizer.piece_bytes(token)
        return self._flush(final=False)

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD, as decode() does)."""
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        text = self._pending.replace(_SPACE, b" ").decode("utf-8", "replace")
        if not final and text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        if not self.text and text.startswith(" "):
            text = text[1:]  # SentencePiece's dummy prefix
        self._pending = b""
        self.text += text
        return text


def find_tokenizer(model_dir: Optional[Path], explicit: Optional[str | Path]) -> Path:
    """The tokenizer file to use: `explicit` (a file or a directory holding one) or the model's own."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise LoadError(f"tokenizer not found: {path} does not exist")
        return path
    if model_dir is not None and (model_dir / TOKENIZER_FILE).is_file():
        return model_dir / TOKENIZER_FILE
    where = f" in {model_dir}" if model_dir is not None else ""
    raise TokenizerNotFoundError(
        f"no {TOKENIZER_FILE} found{where}. OpenELM uses the Llama-2 SentencePiece tokenizer "
        "(tokenizer.model, 32000 pieces), which Apple's OpenELM repos do not ship. Get it from "
        "meta-llama/Llama-2-7b-hf (gated: accept the license, then `huggingface-cli login`) and pass "
        "it with --tokenizer PATH (Python: load(..., tokenizer=PATH)), or copy it into the model directory."
    )
