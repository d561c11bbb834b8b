"""How a conversation becomes token ids: the Instruct models' Zephyr-style format, raw text, or a user's template.

Apple ships no chat template. The Instruct models were tuned with the alignment-handbook recipe's
Zephyr-style format (spec section 6):

    <|system|>\\n{system}</s>\\n<|user|>\\n{message}</s>\\n<|assistant|>\\n{reply}</s>\\n ...

The tags are plain text; `</s>` in a template is the EOS token (id 2), BOS comes first. SentencePiece
would encode the characters `</s>` as text, so the rendered text is cut at every template `</s>`, each
piece is encoded on its own (with SentencePiece's dummy-prefix space, as Hugging Face's Llama tokenizer
does after a special token) and EOS ids are put between them. Message content is never cut: a `</s>`
typed in a message stays ordinary text, so no message can end a turn or forge another role's turn.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import OpenELMError
from .tokenizer import Tokenizer

EOS_TEXT = "</s>"  # stands for the EOS id wherever it appears in a template
CONTENT = "{content}"
ROLES = ("system", "user", "assistant")


class PromptFormatError(OpenELMError, ValueError):
    """A chat template or a conversation cannot be rendered."""


@dataclass(frozen=True)
class ChatTemplate:
    """One format string per role, each holding `{content}` once; `</s>` means the EOS token.

    The text before the assistant's `{content}` doubles as the generation prompt.
    """

    name: str
    system: str
    user: str
    assistant: str

    def __post_init__(self) -> None:
        for role in ROLES:
            if getattr(self, role).count(CONTENT) != 1:
                raise PromptFormatError(f"the chat template's '{role}' format must contain {CONTENT} exactly once, "
                                        f"got {getattr(self, role)!r}")

    def parts(self, role: str) -> tuple:
        """(text before the content, text after it) for `role`."""
        if role not in ROLES:
            raise PromptFormatError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        before, after = getattr(self, role).split(CONTENT)
        return before, after


ZEPHYR = ChatTemplate("zephyr", system="<|system|>\n{content}</s>\n", user="<|user|>\n{content}</s>\n",
                      assistant="<|assistant|>\n{content}</s>\n")
# For base models: the conversation is plain running text; the model continues it.
RAW = ChatTemplate("raw", system="{content}\n", user="{content}", assistant="{content}")
BUILTIN = {t.name: t for t in (ZEPHYR, RAW)}


@dataclass
class Message:
    """One turn. `tokens`, when known, are the ids the model itself produced for an assistant turn:
    they are used instead of re-encoding `content`, so a chat's history matches its KV cache exactly."""

    role: str
    content: str
    tokens: Optional[List[int]] = None


def load_template(spec: str) -> ChatTemplate:
    """A built-in template by name ('zephyr', 'raw') or a JSON file with 'system', 'user', 'assistant'
    format strings (missing ones are taken from zephyr)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PromptFormatError(f"no chat template {spec!r}: use {' or '.join(BUILTIN)}, or the path of a JSON file "
                                "with 'system', 'user' and 'assistant' format strings")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFormatError(f"{path} is not valid JSON: {e}") from None
    allowed = {f.name for f in fields(ChatTemplate)} - {"name"}
    if not isinstance(data, dict) or set(data) - allowed or not all(isinstance(v, str) for v in data.values()):
        raise PromptFormatError(f"{path} must be a JSON object whose keys are among {sorted(allowed)} "
                                "and whose values are format strings")
    return ChatTemplate(name=str(path), **{role: data.get(role, getattr(ZEPHYR, role)) for role in ROLES})


def default_template_name(model_name: str) -> str:
    """Zephyr for Instruct checkpoints, raw text for base models, told apart by the model's name
    (the repo id or directory name contains 'instruct'). Only the prompt format is chosen this way,
    never the architecture; --chat-template/--raw override it."""
    return ZEPHYR.name if "instruct" in Path(model_name).name.lower() else RAW.name


def encode_text(tokenizer: Tokenizer, text: str) -> List[int]:
    """Ids of template text: each `</s>` becomes the EOS id, the pieces between are encoded separately."""
    return _encode_pieces(tokenizer, text.split(EOS_TEXT))


def _encode_pieces(tokenizer: Tokenizer, pieces: Sequence[str]) -> List[int]:
    """Each piece encoded on its own (no BOS), with an EOS id between neighbours."""
    ids: List[int] = []
    for n, piece in enumerate(pieces):
        if n:
            ids.append(tokenizer.eos_id)
        if piece:
            ids.extend(tokenizer.encode(piece, add_bos=False))
    return ids


class _Pieces:
    """Rendered text waiting to be encoded, as the pieces between EOS markers. Only template text is
    split at `</s>`; content joins the current piece verbatim, so its characters are encoded as text."""

    def __init__(self) -> None:
        self.pieces = [""]

    def add_template(self, text: str) -> None:
        first, *rest = text.split(EOS_TEXT)
        self.pieces[-1] += first
        self.pieces.extend(rest)

    def add_content(self, text: str) -> None:
        self.pieces[-1] += text

    def take_ids(self, tokenizer: Tokenizer) -> List[int]:
        """The ids of everything added so far; starts afresh."""
        ids, self.pieces = _encode_pieces(tokenizer, self.pieces), [""]
        return ids


def conversation_ids(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Union[Message, dict]],
                     *, add_generation_prompt: bool = True) -> List[int]:
    """BOS, then the rendered conversation, then (by default) the assistant's opening to be continued.

    Only the template's own `</s>` become EOS ids; a message's content is encoded as plain text.
    Text between known token runs (an assistant turn's own `tokens`) is rendered and encoded in one
    go, so with no token runs and no `</s>` in any content this is exactly BOS + encode_text(the whole
    rendered text).
    """
    ids = [tokenizer.bos_id]
    pending = _Pieces()  # rendered text not yet encoded
    for message in messages:
        if isinstance(message, dict):
            message = Message(message["role"], message["content"])
        before, after = template.parts(message.role)
        pending.add_template(before)
        if message.tokens is None:
            pending.add_content(message.content)
        else:
            ids += pending.take_ids(tokenizer) + list(message.tokens)
        pending.add_template(after)
    if add_generation_prompt:
        pending.add_template(template.parts("assistant")[0])
    return ids + pending.take_ids(tokenizer)


def add_template_options(parser: argparse.ArgumentParser) -> None:
    """--chat-template / --raw (alias --ignore-chat-template), shared by generate, chat and serve."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--chat-template", metavar="NAME|FILE",
                       help=f"prompt format: {' or '.join(BUILTIN)}, or a JSON file of 'system', 'user', 'assistant' "
                            "format strings (default: zephyr if the model's name contains 'Instruct', else raw)")
    group.add_argument("--raw", "--ignore-chat-template", dest="raw", action="store_true",
                       help="no chat format: the text is used as it is (the default for base models)")


def add_system_prompt_option(parser: argparse.ArgumentParser) -> None:
    """--system-prompt (alias --system), shared by generate and chat."""
    parser.add_argument("--system-prompt", "--system", dest="system", metavar="TEXT",
                        help="system prompt: the conversation's first turn, in the prompt format's system role")


def template_from_args(args: argparse.Namespace) -> ChatTemplate:
    """The template --chat-template / --raw ask for, else the default for --model's name."""
    if args.raw:
        return RAW
    return load_template(args.chat_template or default_template_name(args.model))
