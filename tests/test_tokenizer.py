"""The tokenizer: BOS, encode/decode, and the streaming detokenizer against SentencePiece and mlx-lm."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm

from conftest import MULTILINGUAL
from helpers import LLAMA2_TOKENIZER
from openelm_mlx.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"

# Strings worth streaming: byte fallback (Korean, emoji with modifiers, CJK, accents), leading and
# repeated spaces, newlines, text that starts with a byte-fallback character, digits.
STREAM_TEXTS = [
    MULTILINGUAL,
    "Hello world",
    "  leading spaces and  double  spaces ",
    " one leading space",
    "\nstarts with a newline\n\nand has blank lines\n",
    "🙂👍🏽🎉",
    "안녕하세요",
    "é at the start, then ascii",
    "日本語のテキスト",
    "tabs\tand\ttrailing newline\n",
    "digits 12345 and 2048",
    "mixed: naïve café — 세계! 🙂 end",
]


@pytest.fixture(scope="module")
def tok(spm_model):
    return Tokenizer(spm_model)


@pytest.fixture(scope="module")
def sp(spm_model):
    return spm.SentencePieceProcessor(model_file=str(spm_model))


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    """A tiny tokenizer normalised like Llama-2's: identity (newlines kept), extra whitespace kept.

    (The session fixture uses SentencePiece's defaults, nmt_nfkc + remove_extra_whitespaces, which
    turn newlines into spaces and squeeze runs of spaces, so those cases need this one.)
    """
    import io

    from conftest import TRAINING_TEXT

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 20), model_writer=model, vocab_size=320,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    )
    path = tmp_path_factory.mktemp("spm_llama_like") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


@pytest.fixture(scope="module")
def llama():
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"Llama-2 tokenizer not present at {LLAMA2_TOKENIZER}")
    return Tokenizer(LLAMA2_TOKENIZER)


def stream(tokenizer: Tokenizer, ids):
    """Feed ids one at a time; return the list of segments (finalize's last)."""
    detok = tokenizer.detokenizer()
    segments = [detok.add_token(i) for i in ids]
    segments.append(detok.finalize())
    assert detok.text == "".join(segments)
    assert detok.tokens == list(ids)
    return segments


class SPMAdapter:
    """The slice of a Hugging Face tokenizer that mlx-lm's SPMStreamingDetokenizer uses."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp

    def __len__(self):
        return self.sp.get_piece_size()

    def convert_ids_to_tokens(self, ids):
        return [self.sp.id_to_piece(i) for i in ids]


def mlx_lm_stream(sp: spm.SentencePieceProcessor, ids) -> str:
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    detok = SPMStreamingDetokenizer(SPMAdapter(sp))
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    return detok.text


# ---------------------------------------------------------------------------- encode / decode


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == 320


def test_encode_prepends_bos(tok, sp):
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert ids[1:] == sp.encode(text)
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert 1 not in ids[1:]


def test_encode_empty_is_just_bos(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []


def test_decode_inverts_encode(tok, sp):
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        # The fixture normalises whitespace (remove_extra_whitespaces), so compare with SentencePiece's
        # own round trip; for text without extra whitespace that is the text itself.
        assert tok.decode(ids) == sp.decode(ids[1:])
    for text in [MULTILINGUAL, "Hello world", "안녕하세요", "🙂👍🏽🎉", "digits 12345 and 2048"]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_inverts_encode_with_whitespace(llama_like):
    for text in STREAM_TEXTS:
        assert llama_like.decode(llama_like.encode(text)) == text


def test_byte_fallback_is_used(tok, sp):
    ids = tok.encode("안녕")
    assert any(sp.is_byte(i) for i in ids), "Korean should go through byte fallback in the tiny vocab"


def test_unreadable_model_is_a_load_error(tmp_path):
    from openelm_mlx.errors import LoadError

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(LoadError, match="SentencePiece"):
        Tokenizer(bad)


# ---------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_equals_decode(tok, sp, text):
    ids = sp.encode(text)
    segments = stream(tok, ids)
    assert "".join(segments) == sp.decode(ids)
    for seg in segments:
        assert REPLACEMENT not in seg, f"incomplete UTF-8 leaked into segment {seg!r}"


def test_streaming_holds_back_incomplete_characters(tok, sp):
    ids = sp.encode("🙂")
    byte_ids = [i for i in ids if sp.is_byte(i)]
    assert len(byte_ids) == 4  # one emoji = 4 byte tokens
    detok = tok.detokenizer()
    out = [detok.add_token(i) for i in ids]
    assert out[-1] == "🙂" and "".join(out[:-1]) == ""
    assert detok.finalize() == ""


def test_streaming_segments_are_incremental(tok, sp):
    """Every segment is new text: the prefix so far is always a prefix of the final text."""
    ids = sp.encode(MULTILINGUAL)
    final = sp.decode(ids)
    detok = tok.detokenizer()
    so_far = ""
    for i in ids:
        so_far += detok.add_token(i)
        assert final.startswith(so_far)
    so_far += detok.finalize()
    assert so_far == final


def test_streaming_ignores_control_tokens(tok, sp):
    ids = sp.encode("Hello world")
    assert "".join(stream(tok, [1] + ids)) == sp.decode([1] + ids) == "Hello world"


def test_finalize_flushes_an_incomplete_character_like_decode(tok, sp):
    ids = sp.encode("🙂")[:-1]  # cut the emoji's last byte
    segments = stream(tok, ids)
    assert "".join(segments) == sp.decode(ids)
    assert segments[-1].endswith(REPLACEMENT)  # only finalize may produce U+FFFD
    assert all(REPLACEMENT not in s for s in segments[:-1])


def test_streaming_arbitrary_ids_equals_decode(tok, sp):
    """Model output is arbitrary: random ids (bytes, word-start pieces, controls, unk, lone spaces)."""
    rng = random.Random(0)
    space = sp.piece_to_id("\u2581")
    pool = list(range(tok.vocab_size))
    special = [0, 1, 2, space, space, space] + [i for i in pool if sp.is_byte(i)][:20]
    for trial in range(300):
        n = rng.randint(1, 12)
        ids = [rng.choice(special) if rng.random() < 0.4 else rng.choice(pool) for _ in range(n)]
        assert "".join(stream(tok, ids)) == sp.decode(ids), ids


LLAMA2_TEXTS = ["안녕하세요 세계! 🙂👍🏽", MULTILINGUAL, "🙂", "  indented\n    code", " leading space", "a  b",
                "   .. versionadded:: 3.4\n"]


@pytest.mark.parametrize("which,text", [("llama_like", t) for t in STREAM_TEXTS] + [("llama", t) for t in LLAMA2_TEXTS])
def test_streaming_equals_decode_keeping_whitespace(request, which, text):
    """With whitespace kept as Llama-2 keeps it (leading/repeated spaces, newlines survive encoding),
    the streamed segments still equal decode(), and equal the text itself."""
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.sp.encode(text)
    segments = stream(tokenizer, ids)
    assert "".join(segments) == tokenizer.sp.decode(ids) == text
    assert all(REPLACEMENT not in seg for seg in segments)


def test_streaming_leading_lone_spaces(llama_like):
    """With extra whitespace kept, decode() drops only the first piece's dummy-prefix space:
    [\u2581, \u2581] is " ", not "" (the first streaming version dropped every leading space)."""
    sp = llama_like.sp
    space = sp.piece_to_id("\u2581")
    assert sp.id_to_piece(space) == "\u2581"
    the = sp.encode("the")  # starts with a word-start piece
    for ids in ([space, space], [space] + the, [space, space] + the, [1, space] + the):
        assert "".join(stream(llama_like, ids)) == sp.decode(ids), ids
    assert sp.decode([space, space]) == " "


def test_continuation_keeps_the_first_words_space(llama_like):
    """A completion continues its prompt: streamed with continues_text, its segments equal what
    decode(prompt + completion) adds to decode(prompt), first word-start space included."""
    sp = llama_like.sp
    prompt = sp.encode("Once upon a")
    rng = random.Random(5)
    space = sp.piece_to_id("\u2581")
    cases = [sp.encode("time there"), [space] + sp.encode("time"), [space, space]]
    cases += [[rng.choice([space, rng.randrange(llama_like.vocab_size)]) for _ in range(rng.randint(1, 8))]
              for _ in range(200)]
    for ids in cases:
        detok = llama_like.detokenizer(continues_text=True)
        text = "".join([detok.add_token(i) for i in ids] + [detok.finalize()])
        assert sp.decode(prompt) + text == sp.decode(prompt + ids), ids
    assert "".join(stream(llama_like, sp.encode("time"))) == "time"  # a text of its own drops it


def test_streaming_arbitrary_ids_keeping_whitespace(llama_like):
    sp = llama_like.sp
    rng = random.Random(2)
    space = sp.piece_to_id("\u2581")
    special = [0, 1, 2, space, space] + [3 + b for b in (0x20, 0x41, 0xE2, 0x96, 0x81, 0xF0, 0x9F, 0xC3, 0xA9)]
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.5 else rng.randrange(llama_like.vocab_size)
               for _ in range(rng.randint(1, 10))]
        assert "".join(stream(llama_like, ids)) == sp.decode(ids), ids


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_agrees_with_mlx_lm(tok, sp, text):
    ids = sp.encode(text)
    assert "".join(stream(tok, ids)) == mlx_lm_stream(sp, ids) == sp.decode(ids)


@pytest.mark.parametrize("text", [t for t in STREAM_TEXTS if not t.startswith(" ")])
def test_agrees_with_mlx_lm_keeping_whitespace(llama_like, text):
    """mlx-lm strips every leading space while its text is empty, so inputs starting with a lone
    space piece differ (there this runtime follows SentencePiece's decode(), tested above)."""
    ids = llama_like.sp.encode(text)
    assert "".join(stream(llama_like, ids)) == mlx_lm_stream(llama_like.sp, ids)


# ---------------------------------------------------------------------------- the real Llama-2 tokenizer


def test_llama2_known_ids(llama):
    assert llama.vocab_size == 32000
    assert (llama.bos_id, llama.eos_id) == (1, 2)
    assert llama.encode("Hello world") == [1, 15043, 3186]
    assert llama.encode("Once upon a time") == [1, 9038, 2501, 263, 931]
    assert llama.encode("\n", add_bos=False)[-1] == 13


def test_llama2_streaming_arbitrary_ids(llama):
    """Lone word-start pieces in front (Llama-2 keeps extra whitespace), byte tokens, controls."""
    sp = llama.sp
    space, hello, two_spaces = sp.piece_to_id("\u2581"), sp.piece_to_id("\u2581hello"), sp.piece_to_id("\u2581\u2581")
    cases = [[space, hello], [space, space], [space, space, hello], [two_spaces, hello], [1, space, hello],
             [35, hello], [0, hello], [3 + 0xE2, 3 + 0x96, 3 + 0x81], [3 + 0xE2, 3 + 0x96, hello]]
    rng = random.Random(1)
    for _ in range(200):
        cases.append([rng.choice([space, two_spaces, 0, 1, 2, rng.randrange(3, 259), rng.randrange(32000)])
                      for _ in range(rng.randint(1, 8))])
    for ids in cases:
        assert "".join(stream(llama, ids)) == sp.decode(ids), ids


# ---------------------------------------------------------------------------- invalid UTF-8 from byte tokens


def byte_id(tokenizer: Tokenizer, value: int) -> int:
    return tokenizer.sp.piece_to_id(f"<0x{value:02X}>")


def test_bytes_that_never_complete_a_character_stream_at_once(tok):
    """Six <0x80> tokens: each is a stray continuation byte, emitted at once as decode() renders it
    (one U+FFFD per byte) instead of held back for ever."""
    stray = byte_id(tok, 0x80)
    detok = tok.detokenizer()
    assert [detok.add_token(stray) for _ in range(6)] == [REPLACEMENT] * 6
    assert detok.held_back == b"" and detok.finalize() == ""
    assert detok.text == tok.decode([stray] * 6) == REPLACEMENT * 6


@pytest.mark.parametrize("which", ["tok", "llama"])
def test_held_back_bytes_are_a_valid_prefix_of_at_most_three(request, which):
    tokenizer = request.getfixturevalue(which)
    rng = random.Random(3)
    ids = [byte_id(tokenizer, rng.randrange(256)) for _ in range(5000)]
    ids += [byte_id(tokenizer, b) for b in "🙂".encode()[:3]]  # ends on the longest valid prefix
    detok = tokenizer.detokenizer()
    longest = 0
    for i in ids:
        detok.add_token(i)
        held = detok.held_back
        longest = max(longest, len(held))
        assert len(held) <= 3 and held.decode("utf-8", "ignore") == "", held  # incomplete, nothing decodable
    assert longest == 3
    detok.finalize()
    assert detok.text == tokenizer.decode(ids)


def random_byte_chunk(rng: random.Random) -> bytes:
    """Bytes that byte-fallback tokens can carry: valid characters of every length, truncated ones,
    stray continuation bytes, leads that can never start a character, overlong and surrogate forms."""
    kind = rng.randrange(7)
    if kind == 0:  # a whole character of 1-4 bytes
        low, high = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)])
        return chr(rng.randint(low, high)).encode()
    if kind == 1:  # a truncated character
        whole = chr(rng.randint(0x80, 0x10FFFF) if rng.random() < 0.9 else 0x1F642).encode("utf-8", "surrogatepass")
        return whole[:rng.randrange(1, len(whole))] if len(whole) > 1 else whole
    if kind == 2:  # stray continuation bytes
        return bytes(rng.randint(0x80, 0xBF) for _ in range(rng.randint(1, 4)))
    if kind == 3:  # leads that are never valid, alone or with continuations after them
        return bytes([rng.choice([0xC0, 0xC1, 0xF5, 0xF8, 0xFC, 0xFE, 0xFF])]) + bytes(
            rng.randint(0x80, 0xBF) for _ in range(rng.randint(0, 3)))
    if kind == 4:  # overlong, surrogate, beyond U+10FFFF
        return rng.choice([b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                           b"\xf4\x90\x80\x80", b"\xe0\x9f\xbf"])
    if kind == 5:  # a lead followed by something that is not a continuation
        return bytes([rng.choice([0xC3, 0xE2, 0xF0]), rng.choice([0x41, 0xC3, 0xE2, 0x20])])
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))


@pytest.mark.parametrize("which", ["tok", "llama"])
def test_streaming_random_bytes_pieces_and_controls_equals_decode(request, which):
    """A few thousand sequences of byte tokens (valid, truncated and invalid UTF-8), ordinary pieces
    and control tokens: every streamed prefix is a prefix of decode(), and the whole is decode()
    (the stream is never rewritten, so nothing shown too early)."""
    tokenizer = request.getfixturevalue(which)
    sp = tokenizer.sp
    rng = random.Random(11)
    pieces = [i for i in range(tokenizer.vocab_size) if not (sp.is_byte(i) or sp.is_control(i))]
    controls = [i for i in range(tokenizer.vocab_size) if sp.is_control(i)] + [sp.unk_id()]
    for _ in range(3000):
        ids = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.6:
                ids += [byte_id(tokenizer, b) for b in random_byte_chunk(rng)]
            elif roll < 0.85:
                ids.append(rng.choice(pieces))
            else:
                ids.append(rng.choice(controls))
        # Some continue a prompt: then they add what decode(prompt + ids) adds to decode(prompt).
        prompt = sp.encode("Once upon a") if rng.random() < 0.2 else []
        shown = sp.decode(prompt)
        expected = sp.decode(prompt + ids)
        detok = tokenizer.detokenizer(continues_text=bool(prompt))
        so_far = shown
        for i in ids:
            so_far += detok.add_token(i)
            assert expected.startswith(so_far), ids
        assert so_far + detok.finalize() == expected, ids
