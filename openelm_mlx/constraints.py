"""Structured output: constraints (JSON Schema, any JSON object, a regex, a choice, a Lark grammar) that the
generated text must match, enforced token by token with llguidance.

llguidance compiles the constraint and, at each step, says which tokens may follow (a bit per token); the
decode loop sets every other logit to -inf before the sampler draws (generation.py), so any sampler setting
keeps the guarantee. EOS is allowed only once the text is complete. What is ours: the bridge from our
SentencePiece vocabulary to llguidance's tokenizer (byte-fallback pieces are raw bytes, the ▁ marker a
space, control pieces special) and turning its masks into MLX arrays. Why llguidance and how much it
costs: docs/structured-output.md.

llguidance is the optional `structured` extra: it is imported when a constraint is first built.
"""

from __future__ import annotations

import json
import weakref
from typing import Any, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .errors import ConstraintError
from .tokenizer import Tokenizer

INSTALL_HINT = "structured output needs llguidance: pip install 'openelm-mlx[structured]'"
# llguidance marks special (control) tokens with a leading 0xFF byte, which never occurs in UTF-8 text.
_SPECIAL_PREFIX = b"\xff"
# llguidance tokenizes the text a constraint forces (e.g. '{"name": "') with our tokenizer and allows
# the first of those tokens, so the tokens must spell exactly that text. SentencePiece prepends a space
# (its dummy prefix): tokenizing after a character that no piece merges with (byte fallback) avoids it.
_NEUTRAL_PREFIX = "\u2603"
# The lltokenizers built so far, one per Tokenizer (building one takes about a second for 32k pieces).
_LLTOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()
# JSON is written with fixed separators and no other whitespace: with llguidance's default (any
# whitespace between tokens) a small model trained on prose fills the answer with spaces and newlines.
# The layout is json.dumps's default; a schema's "x-guidance" key can override it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(INSTALL_HINT) from None
    return llguidance


class Constraint:
    """What the generated text must be, compiled to an llguidance grammar and checked when built (a bad
    schema, regex or grammar raises ConstraintError saying why). Immutable; one Constraint serves any
    number of generations, each with its own `ConstraintState` from `start(tokenizer)`.

    Build with `Constraint.json_schema(schema)`, `Constraint.any_json()`, `Constraint.regex(pattern)`,
    `Constraint.choice(options)` or `Constraint.grammar(lark_text)`, and pass it as
    `GenerationOptions(constraint=...)`.
    """

    def __init__(self, kind: str, grammar: str):
        """Use the class methods; `grammar` is llguidance's grammar text, already validated."""
        self.kind = kind
        self.grammar = grammar

    def __repr__(self) -> str:
        return f"Constraint({self.kind})"

    @classmethod
    def json_schema(cls, schema: Union[dict, str, bool]) -> "Constraint":
        """A JSON value matching `schema` (a dict, or its JSON text). Keywords llguidance cannot enforce
        (e.g. uniqueItems) are refused, never ignored."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        lg = _llguidance()
        try:
            grammar = lg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        return cls._checked("json_schema", grammar, "JSON schema")

    @classmethod
    def any_json(cls) -> "Constraint":
        """Any JSON object (OpenAI's response_format json_object)."""
        grammar = _llguidance().LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        return cls._checked("json_object", grammar, "JSON object")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        """Text that matches `pattern` as a whole (Rust regex syntax: no lookaround, no backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("the regular expression must be a non-empty string")
        return cls._checked("regex", _llguidance().LLMatcher.grammar_from_regex(pattern), "regular expression")

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Constraint":
        """Exactly one of `options` (non-empty strings)."""
        options = list(options)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError("a choice needs at least one option, each a non-empty string")
        # Lark string literals are JSON string literals.
        lark = "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return cls._checked("choice", _llguidance().LLMatcher.grammar_from_lark(lark), "choice")

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        """Text derived from the rule `start` of a context-free grammar in llguidance's Lark syntax."""
        if not isinstance(lark, str) or not lark.strip():
            raise ConstraintError("the grammar is empty")
        return cls._checked("grammar", _llguidance().LLMatcher.grammar_from_lark(lark), "grammar")

    @classmethod
    def _checked(cls, kind: str, grammar: str, what: str) -> "Constraint":
        error = _llguidance().LLMatcher.validate_grammar(grammar, None)
        if error:
            raise ConstraintError(f"invalid {what}: {_first_line(error)}")
        return cls(kind, grammar)

    def start(self, tokenizer: Tokenizer) -> "ConstraintState":
        """A fresh state for one generation with `tokenizer`'s vocabulary."""
        lg = _llguidance()
        matcher = lg.LLMatcher(lltokenizer(tokenizer), self.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the {self.kind} constraint cannot be used: {_first_line(matcher.get_error())}")
        return ConstraintState(matcher, tokenizer.vocab_size, tokenizer.eos_id)


class ConstraintState:
    """One generation's progress through a constraint: which tokens may come next (`allowed`), `advance`
    by the token chosen, `rollback` tokens (rejected speculative drafts), `is_complete` / `is_finished`."""

    def __init__(self, matcher: Any, vocab_size: int, eos_id: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_id = eos_id
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)  # llguidance writes bits here

    @property
    def is_complete(self) -> bool:
        """The text so far satisfies the constraint (EOS may come now)."""
        return self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Complete, and nothing but EOS can follow: the generation can end here."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def allowed(self, width: int) -> np.ndarray:
        """bool [width]: the tokens that may come next (ids past the tokenizer's vocabulary never may).
        Raises ConstraintError if none may, which llguidance rules out unless it failed."""
        row = self._bitmask[0]
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)  # drops the GIL while it works
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:self._vocab_size].astype(bool)
        if not bits.any():
            raise ConstraintError(f"the constraint allows no next token: {self._error()}")
        if width > self._vocab_size:
            bits = np.concatenate([bits, np.zeros(width - self._vocab_size, dtype=bool)])
        return bits[:width]

    def advance(self, token: int) -> None:
        """Take `token` (one the mask allowed). EOS after a finished text changes nothing (a batch row that
        has ended keeps receiving it)."""
        if token == self._eos_id and self.is_finished:
            return
        if not self._matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} does not fit the constraint: {self._error()}")

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the first, the constraint would take now (the state is unchanged)."""
        return self._matcher.validate_tokens([int(t) for t in tokens]) if tokens else 0

    def draft_masks(self, drafts: Sequence[int], width: int) -> np.ndarray:
        """bool [len(drafts) + 1, width]: row j allows what may follow drafts[:j]. Rows after the first
        draft the constraint refuses allow everything: that draft is rejected at its own row (it is
        masked there), so what follows it is never used. The state ends as it began."""
        valid = self.valid_prefix(drafts)
        rows = []
        for j in range(valid + 1):
            rows.append(self.allowed(width))
            if j < valid:
                self.advance(drafts[j])
        self.rollback(valid)
        rows += [np.ones(width, dtype=bool)] * (len(drafts) - valid)
        return np.stack(rows)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` advances."""
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise ConstraintError(f"cannot roll the constraint back by {num_tokens} tokens: {self._error()}")

    def _error(self) -> str:
        return _first_line(self._matcher.get_error()) or "llguidance gave no reason"


def apply_masks(logits: mx.array, states: Sequence[Optional[ConstraintState]]) -> mx.array:
    """`logits` [B, V] with -inf wherever row b's constraint state forbids the token (None: no constraint).
    The mask is computed on the CPU while MLX may still be computing `logits`."""
    width = logits.shape[-1]
    return mask_rows(logits, np.stack([np.ones(width, dtype=bool) if s is None else s.allowed(width)
                                       for s in states]))


def mask_rows(logits: mx.array, allowed: np.ndarray) -> mx.array:
    """`logits` [N, V] with -inf where `allowed` [N, V] is false."""
    return mx.where(mx.array(allowed), logits, -mx.inf)


def lltokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's tokenizer for `tokenizer` (cached per Tokenizer): each piece's bytes as decode() renders
    them, control pieces (<s>, </s>) and <unk> special, EOS the tokenizer's."""
    cached = _LLTOKENIZERS.get(tokenizer)
    if cached is None:
        lg = _llguidance()
        cached = lg.LLTokenizer(lg.TokenizerWrapper(_VocabularyView(tokenizer)))
        _LLTOKENIZERS[tokenizer] = cached
    return cached


class _VocabularyView:
    """The attributes and the tokenize call that llguidance's TokenizerWrapper reads."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        special = {i for i in range(tokenizer.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self.special_token_ids = sorted(special)
        self.tokens = [_SPECIAL_PREFIX + sp.id_to_piece(i).encode("utf-8") if i in special
                       else tokenizer.piece_bytes(i) for i in range(tokenizer.vocab_size)]
        self._prefix = tokenizer.encode(_NEUTRAL_PREFIX, add_bos=False)
        self._ids_by_bytes = {}
        for i in range(tokenizer.vocab_size):
            if i not in special and self.tokens[i]:
                self._ids_by_bytes.setdefault(self.tokens[i], i)
        self._longest = max(map(len, self._ids_by_bytes), default=1)

    def __call__(self, text: Union[str, bytes]) -> List[int]:
        """Token ids that spell exactly `text`: SentencePiece's own when they do (no dummy-prefix space,
        no normalization change), else the longest pieces from the left (byte pieces where need be)."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._tokenizer.encode(_NEUTRAL_PREFIX + data.decode("utf-8", errors="replace"), add_bos=False)
        n = len(self._prefix)
        if ids[:n] == self._prefix and b"".join(self.tokens[i] for i in ids[n:]) == data:
            return ids[n:]
        return self._longest_pieces(data)

    def _longest_pieces(self, data: bytes) -> List[int]:
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids_by_bytes.get(data[at:at + size])
                if token is not None:
                    ids.append(token)
                    at += size
                    break
            else:  # no piece has this byte (a vocabulary without byte fallback): skip it
                at += 1
        return ids


def _first_line(message: str) -> str:
    """llguidance's message on one line: its first line, plus the "error: ..." detail a regex parse error
    puts further down."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return ""
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {detail}" if detail and lines[0].endswith(":") else lines[0]
