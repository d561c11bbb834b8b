"""`openelm-mlx chat`: a terminal conversation that streams replies and reuses the KV cache across turns."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, TextIO

from .cli_args import (add_draft_options, add_kv_cache_options, add_model_options, add_sampling_options,
                       context_full_notice, drafter_from_args, load_from_args, options_from_args, speculation_summary)
from .drafting import Drafter
from .errors import ContextLengthError
from .generation import GenerationOptions, GenerationResponse
from .model import Model
from .jobs import ReuseStats
from .prompt_cache import PromptCache
from .prompt_format import (ChatTemplate, Message, add_system_prompt_option, add_template_options, conversation_ids,
                            template_from_args)
from .tokenizer import Tokenizer

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (no TEXT: remove it)
  /help          show this
  /exit          leave (Ctrl-D too)
Ctrl-C stops the current reply and keeps the chat going."""
# When the conversation no longer fits, oldest turns are dropped until this much room is left for the
# reply: max_tokens, but at most this fraction of the context (a huge max_tokens must not empty the chat).
REPLY_ROOM_FRACTION = 4


@dataclass
class TurnStats:
    """What the last reply cost: the prompt split into cached and prefilled tokens, and the speed."""

    cached_tokens: int = 0
    prefilled_tokens: int = 0
    dropped_turns: int = 0
    last: Optional[GenerationResponse] = None


class ChatSession:
    """A conversation with one model: the messages, the system prompt and a KV cache that matches them.

    Assistant turns keep the model's own token ids, so each new turn's prompt extends the cached one
    and only the new part (the closing EOS, the user's message, the assistant tag) is prefilled.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, template: ChatTemplate, options: GenerationOptions,
                 *, system: Optional[str] = None, draft: Optional[Drafter] = None):
        """`draft`: speculative decoding for every reply (a DraftModel keeps its own cache across turns too)."""
        self.model = model
        self.draft = draft
        self.tokenizer = tokenizer
        self.template = template
        self.options = options
        self.system = system
        self.messages: List[Message] = []
        self.prompt_cache = PromptCache(model)
        self.stats = TurnStats()

    def reset(self) -> None:
        """Forget the turns (not the system prompt)."""
        self.messages = []

    def prompt_ids(self) -> List[int]:
        system = [Message("system", self.system)] if self.system else []
        return conversation_ids(self.tokenizer, self.template, system + self.messages)

    def ask(self, text: str) -> int:
        """Add a user message; drop the oldest turns if the conversation would not leave room for a
        reply. Returns how many turns were dropped."""
        context = self.model.args.max_context_length
        room = min(self.options.max_tokens, context // REPLY_ROOM_FRACTION)
        history, self.messages = self.messages, [Message("user", text)]
        if len(self.prompt_ids()) + room > context:  # even alone it would not fit: keep the chat as it was
            self.messages = history
            raise ContextLengthError(
                f"this message leaves no room for a reply in the {context}-token context"
                + (" next to the system prompt" if self.system else "") + ": shorten it")
        self.messages = history + self.messages
        dropped = 0
        while len(self.prompt_ids()) + room > context:
            del self.messages[0]  # a user turn, then its reply
            if self.messages[0].role == "assistant":
                del self.messages[0]
            dropped += 1
        self.stats = TurnStats(dropped_turns=dropped)
        return dropped

    def reply(self) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to the last message. Closing the iterator early (Ctrl-C) keeps
        the partial reply as the assistant's turn."""
        reuse = ReuseStats()
        tokens: List[int] = []
        texts: List[str] = []
        try:
            for response in self.prompt_cache.generate(self.tokenizer, self.prompt_ids(), self.options, reuse,
                                                       draft=self.draft):
                if response.token >= 0:
                    tokens.append(response.token)
                texts.append(response.text)
                self.stats.last = response
                yield response
        finally:
            if tokens and tokens[-1] == self.tokenizer.eos_id:
                tokens.pop()  # the template closes the turn with EOS itself
            self.messages.append(Message("assistant", "".join(texts), tokens=tokens))
            self.stats.cached_tokens, self.stats.prefilled_tokens = reuse.cached_tokens, reuse.prefilled_tokens


class _Interrupt:
    """While active, Ctrl-C (SIGINT) sets a flag the reply loop checks, instead of raising anywhere."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Interrupt":
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run_repl(session: ChatSession, *, read_line: Callable[[str], str], out: TextIO, err: TextIO,
             interactive: bool, verbose: bool) -> None:
    """Read messages and commands until /exit or end of input; stream each reply to `out`."""
    prompt = "> " if interactive else ""
    while True:
        try:
            line = read_line(prompt)
        except EOFError:
            if interactive:
                out.write("\n")  # Ctrl-D left the cursor after the prompt: the shell's prompt starts a new line
            break
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D leaves the chat)", file=err)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text, out, err):
                break
            continue
        try:
            dropped = session.ask(line.rstrip("\n"))
        except ContextLengthError as e:
            print(f"error: {e}", file=err)
            continue
        if dropped:
            print(f"[the conversation was too long for the context: dropped the oldest {dropped} turn(s)"
                  + (", kept the system prompt" if session.system else "") + "]", file=err)
        with _Interrupt() as interrupt:
            replies = session.reply()
            for response in replies:
                out.write(response.text)
                out.flush()
                if interrupt.requested:
                    replies.close()
                    out.write("\n[interrupted]")
                    break
        out.write("\n")
        out.flush()
        if session.stats.last is not None and session.stats.last.context_full:
            print(context_full_notice(session.model.args.max_context_length), file=err)
        if verbose and session.stats.last is not None:
            last, stats = session.stats.last, session.stats
            print(f"[prompt: {stats.prefilled_tokens} tokens prefilled, {stats.cached_tokens} from the cache, "
                  f"{last.prompt_tps:.1f} tokens/s | reply: {last.generation_tokens} tokens, "
                  f"{last.generation_tps:.1f} tokens/s, finish: {last.finish_reason or 'interrupted'}]", file=err)
            if session.draft is not None:
                print(f"[{speculation_summary(last)}]", file=err)


def _command(session: ChatSession, text: str, out: TextIO, err: TextIO) -> bool:
    """Run a /command; True means leave the chat."""
    name, _, argument = text.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.reset()
        print("[conversation reset]", file=err)
    elif name == "/system":
        session.system = argument.strip() or None
        print(f"[system prompt {'set' if session.system else 'removed'}]", file=err)
    elif name == "/help":
        print(HELP, file=out)
    else:
        print(f"unknown command {name}: /help lists the commands", file=err)
    return False


def register(subparsers) -> None:
    """Add the `chat` subcommand."""
    parser = subparsers.add_parser(
        "chat", help="chat with a model in the terminal", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multi-turn chat; replies stream to stdout. Reads messages from stdin (one per line)\n"
                    "when it is not a terminal.\n\n" + HELP)
    add_model_options(parser)
    add_template_options(parser)
    add_system_prompt_option(parser)
    parser.add_argument("--verbose", action="store_true", help="show prompt and reply statistics after each reply")
    add_sampling_options(parser)
    add_kv_cache_options(parser)
    add_draft_options(parser)
    parser.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # validate before the slow load
    template = template_from_args(args)
    model, tokenizer = load_from_args(args)
    session = ChatSession(model, tokenizer, template, options, system=args.system,
                          draft=drafter_from_args(args, model, tokenizer))
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        print(f"Chatting with {args.model} (prompt format: {template.name}). /help lists the commands.",
              file=sys.stderr)
    run_repl(session, read_line=input if interactive else _read_piped_line, out=sys.stdout, err=sys.stderr,
             interactive=interactive, verbose=args.verbose)
    return 0


def _enable_line_editing() -> None:
    """Arrow keys and history for input(): importing readline is what turns them on."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Python built without it (some Windows and minimal builds)
        pass


def _read_piped_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line
