"""OpenELM's tokenizer (the Llama-2 SentencePiece model) and an exact streaming detokenizer.

mlx-lm's SPMStreamingDetokenizer is the model for the streaming part, but importing any mlx_lm
module runs mlx_lm/__init__.py, which imports transformers (and torch where installed): seconds
of start-up and a torch import the runtime must not have. So the detokenizer lives here, follows
SentencePiece's own decode rules more closely than mlx-lm's (leading spaces, invalid bytes), and
the tests check it against both decode() and mlx-lm's.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import List, Optional, Tuple

import sentencepiece as spm

from .errors import LoadError, TokenizerNotFoundError

TOKENIZER_FILE = "tokenizer.model"
_SPACE = "\u2581"  # SentencePiece's word-start marker
# SentencePiece's decode() turns each byte of invalid UTF-8 into its own U+FFFD ("replace" would
# give one per maximal invalid subsequence).
_ERRORS = "openelm-mlx-sentencepiece"
codecs.register_error(_ERRORS, lambda e: ("\ufffd", e.start + 1))


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
        # Bytes of each piece as decode() renders it: <0xNN> pieces are raw bytes (byte fallback),
        # controls nothing, <unk> its surface, others UTF-8 text with the word-start marker as a space.
        self._piece_bytes = [self._bytes_of(i) for i in range(self.vocab_size)]
        self._is_byte = [self.sp.is_byte(i) for i in range(self.vocab_size)]
        self._word_start = [self._is_text(i) and self.sp.id_to_piece(i).startswith(_SPACE)
                            for i in range(self.vocab_size)]
        self.strips_first_space, self.strips_later_spaces = self._leading_space_rule()

    def _is_text(self, token: int) -> bool:
        return not (self.sp.is_byte(token) or self.sp.is_control(token) or self.sp.is_unknown(token))

    def _bytes_of(self, token: int) -> bytes:
        if self.sp.is_byte(token):
            return bytes([int(self.sp.id_to_piece(token)[3:5], 16)])
        if self.sp.is_control(token):
            return b""
        if self.sp.is_unknown(token):
            return self.sp.decode([token]).encode("utf-8")
        return self.sp.id_to_piece(token).replace(_SPACE, " ").encode("utf-8")

    def _leading_space_rule(self) -> Tuple[bool, bool]:
        """How decode() drops leading spaces, read off decode() itself: (whether the first piece's
        word-start space is dropped (the dummy prefix), whether later pieces' are too while the text
        is still empty). The second holds with remove_extra_whitespaces, which Llama-2's model lacks:
        there [▁, ▁hello] decodes to " hello"."""
        starts = [i for i in range(self.vocab_size) if self._word_start[i]]
        if not starts:
            return False, False
        first = self.sp.decode([starts[0]]).encode("utf-8") != self._piece_bytes[starts[0]]
        lone = next((i for i in starts if self.sp.id_to_piece(i) == _SPACE), None)
        return first, first and lone is not None and self.sp.decode([lone, lone]) == ""

    def encode(self, text: str, *, add_bos: bool = True) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_bytes(self, token: int) -> bytes:
        return self._piece_bytes[token] if 0 <= token < self.vocab_size else b""

    def is_byte(self, token: int) -> bool:
        """Whether the piece is a byte-fallback piece <0xNN>."""
        return 0 <= token < self.vocab_size and self._is_byte[token]

    def starts_word(self, token: int) -> bool:
        """Whether the piece begins with the word-start marker (decode() may drop it at the start)."""
        return 0 <= token < self.vocab_size and self._word_start[token]

    def detokenizer(self, *, continues_text: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, continues_text=continues_text)


class StreamingDetokenizer:
    """Turns tokens into text one at a time, in linear time.

    Byte-fallback characters span several tokens: an incremental UTF-8 decoder holds back only a
    valid incomplete prefix of a character (at most 3 bytes); a byte that can never complete one is
    emitted at once as U+FFFD, as decode() renders it. Leading spaces decode() drops (the dummy
    prefix of the first word) are dropped too, so the segments join to `tokenizer.decode(all_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, continues_text: bool = False):
        """continues_text: the tokens follow text already shown (a completion after its prompt), so the
        first word keeps its space, as in decode(prompt + tokens); by default they start a text."""
        self._tokenizer = tokenizer
        self.tokens: List[int] = []
        self._segments: List[str] = []
        self._bytes = codecs.getincrementaldecoder("utf-8")(_ERRORS)
        # No text yet: a word-start space would be dropped.
        self._at_start = tokenizer.strips_first_space and not continues_text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._segments) > 1:
            self._segments = ["".join(self._segments)]
        return self._segments[0] if self._segments else ""

    @property
    def held_back(self) -> bytes:
        """The bytes waiting for the rest of their character (a valid UTF-8 prefix, at most 3 bytes)."""
        return self._bytes.getstate()[0]

    def add_token(self, token: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.tokens.append(token)
        tokenizer = self._tokenizer
        piece = tokenizer.piece_bytes(token)
        if tokenizer.is_byte(token):
            self._at_start = False
            return self._emit(self._bytes.decode(piece))
        # Any other piece (a control one too) ends a run of bytes: what is incomplete becomes U+FFFD.
        text = self._bytes.decode(b"", final=True)
        if self._at_start and tokenizer.starts_word(token):
            piece = piece[1:]  # SentencePiece's dummy prefix
            self._at_start = tokenizer.strips_later_spaces
        if piece:
            self._at_start = False
        return self._emit(text + piece.decode("utf-8"))  # a text piece is whole characters

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character becomes U+FFFD, as decode() does)."""
        return self._emit(self._bytes.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if text:
            self._segments.append(text)
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
