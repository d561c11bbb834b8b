"""The tokenizer files of an output directory: tokenizer.model for our runtime, and tokenizer.json plus
tokenizer_config.json with which Hugging Face's Llama tokenizer (and so mlx-lm) encode as the runtime does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import sentencepiece as spm

from openelm_mlx.prompt_format import ROLES, ChatTemplate
from openelm_mlx.tokenizer import TOKENIZER_FILE

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILE = "tokenizer.json"


def write_tokenizer(directory: Path, tokenizer: Path, *, max_context_length: int,
                    chat_template: Optional[ChatTemplate] = None) -> None:
    """tokenizer.model plus tokenizer.json and tokenizer_config.json, for Hugging Face / mlx-lm, that encode as
    our runtime (SentencePiece) does.

    BOS is added, EOS is not. `legacy: true` makes Hugging Face's Llama tokenizer give the text after a
    special token SentencePiece's dummy-prefix space, as the runtime does (the `▁`, id 29871, after each
    `</s>` of a chat; spec section 6). `chat_template`: rendered as a Jinja `chat_template`, so
    `apply_chat_template` (mlx-lm's chat path) gives the ids `conversation_ids` gives.
    """
    shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    (directory / TOKENIZER_JSON_FILE).write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False))
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
        "clean_up_tokenization_spaces": False, "model_max_length": max_context_length,
    }
    if chat_template is not None:
        config["chat_template"] = jinja_chat_template(chat_template)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def jinja_chat_template(template: ChatTemplate) -> str:
    """`template` as the Jinja chat template Hugging Face's `apply_chat_template` renders: BOS, each
    message in its role's format, then the assistant's opening when a generation prompt is asked for.

    Template text goes in as Jinja string literals (JSON-escaped), never as raw text, because Hugging Face
    renders with trim_blocks, which would drop a newline that follows a tag.
    """
    def literal(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"

    branches = "".join(
        "{% " + ("if" if n == 0 else "elif") + " message['role'] == " + json.dumps(role) + " %}"
        + literal(template.parts(role)[0]) + "{{ message['content'] }}" + literal(template.parts(role)[1])
        for n, role in enumerate(ROLES))
    unknown = "{{ raise_exception(" + json.dumps("chat roles must be " + " or ".join(ROLES)) + ") }}"
    return ("{{ bos_token }}{% for message in messages %}" + branches
            + "{% else %}" + unknown + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(template.parts("assistant")[0]) + "{% endif %}")


def tokenizer_json(model: Path) -> Dict:
    """The SentencePiece BPE model (OpenELM's is Llama-2's) as a Hugging Face `tokenizers` file, laid out as
    transformers' own Llama conversion writes it, except that the merges are ranked by SentencePiece's scores.

    transformers ranks them by piece id, which puts the `▁▁` merge (id 259, score -1e9) first: it then
    encodes "a  b" as a ▁▁ b where SentencePiece (and so the runtime) gives a ▁ ▁b.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    specials = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    bos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.unk_id())
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(pair) for pair in score_ranked_merges(sp)]},
    }


def score_ranked_merges(sp: spm.SentencePieceProcessor) -> List[Tuple[str, str]]:
    """Every pair of pieces that joins into another piece, the pair making the highest-scored piece first:
    the order in which SentencePiece's BPE applies them (ties: longer left part first, as transformers does)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, index in vocab.items():
        if not sp.is_unused(index) and not sp.is_control(index) and not sp.is_unknown(index) and not sp.is_byte(index):
            merges += sorted(((piece[:k], piece[k:], sp.get_score(index)) for k in range(1, len(piece))
                              if piece[:k] in vocab and piece[k:] in vocab), key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
