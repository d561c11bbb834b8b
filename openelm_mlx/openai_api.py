"""The OpenAI API's request and response bodies: strict validation of what a client sends, OpenAI-style
errors for what is wrong, and the JSON the official clients expect back. No HTTP here (see server.py)."""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Tuple

from .constraints import Constraint
from .errors import ConstraintError, InvalidOptionError
from .generation import GenerationOptions
from .prompt_format import ChatTemplate, Message, PromptFormatError, conversation_ids
from .tokenizer import Tokenizer

CHAT, COMPLETION = "chat.completion", "text_completion"
MAX_STOP_STRINGS = 16
# OpenAI's temperature range; 0 is greedy here.
MAX_TEMPERATURE = 2.0
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the model's id, tokenizer, prompt format and context."""

    model_id: str
    tokenizer: Tokenizer
    template: ChatTemplate
    context_length: int


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # CHAT or COMPLETION
    prompt_ids: List[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    speculative: bool = True  # false: no speculative decoding for this request (serve --draft-model)


def parse_request(kind: str, body: bytes, served: ServedModel) -> ParsedRequest:
    """Validate a /v1/chat/completions or /v1/completions body; raise APIError saying what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _field(data, "model", str, None)
    if model is not None and model != served.model_id:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{served.model_id}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    if _field(data, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if kind == CHAT:
        ids = _chat_prompt(data, served)
        max_tokens = _field(data, "max_completion_tokens", int, None)
        if max_tokens is None:
            max_tokens = _field(data, "max_tokens", int, None)
    else:
        ids = _completion_prompt(data, served.tokenizer)
        max_tokens = _field(data, "max_tokens", int, None)
    if len(ids) >= served.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens, but the model's context is {served.context_length} "
                            "tokens and the reply needs room too: shorten it", param="messages" if kind == CHAT
                       else "prompt", code="context_length_exceeded")
    options = _options(data, max_tokens, served.context_length)
    stream = _field(data, "stream", bool, False)
    stream_options = _field(data, "stream_options", dict, None) or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean", param="stream_options")
    return ParsedRequest(kind, ids, options, stream, include_usage, _field(data, "speculative", bool, True))


def _field(data: dict, name: str, kind: type, default: Any) -> Any:
    """data[name] checked against `kind` (float accepts int; bool is never a number); `default` if absent/null."""
    value = data.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = {float: "a number", int: "an integer", bool: "a boolean", str: "a string", dict: "an object",
                    list: "an array"}[kind]
        raise APIError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", param=name,
                       code="invalid_type")
    return float(value) if kind is float else value


def _chat_prompt(data: dict, served: ServedModel) -> List[int]:
    messages = _field(data, "messages", list, None)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    parsed = []
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = _ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be 'system', 'user' or 'assistant', got {json.dumps(role)}",
                           param=f"{where}.role")
        parsed.append(Message(role, _content(message.get("content"), f"{where}.content")))
    try:
        return conversation_ids(served.tokenizer, served.template, parsed)
    except PromptFormatError as e:
        raise APIError(400, str(e), param="messages") from None


def _content(content: Any, where: str) -> str:
    """A string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or an array of text parts (only text is supported)", param=where)


def _completion_prompt(data: dict, tokenizer: Tokenizer) -> List[int]:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in prompt)):
        return list(prompt)
    raise APIError(400, "'prompt' must be a non-empty string or array of token ids "
                        f"(0..{tokenizer.vocab_size - 1}); batches of several prompts are not supported",
                   param="prompt")


def _options(data: dict, max_tokens: Optional[int], context_length: int) -> GenerationOptions:
    defaults = GenerationOptions()
    if max_tokens is not None and not 1 <= max_tokens <= context_length:
        raise APIError(400, f"max_tokens must be between 1 and {context_length} (the model's context), "
                            f"got {max_tokens}", param="max_tokens")
    temperature = _field(data, "temperature", float, defaults.temperature)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}",
                       param="temperature")
    stop = data.get("stop")
    stops: Tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if (stop is not None and not isinstance(stop, (str, list))) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    constraint = parse_response_format(data.get("response_format"))
    try:
        options = GenerationOptions(
            max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
            temperature=temperature,
            top_p=_field(data, "top_p", float, defaults.top_p),
            top_k=_field(data, "top_k", int, defaults.top_k),
            min_p=_field(data, "min_p", float, defaults.min_p),
            repetition_penalty=_field(data, "repetition_penalty", float, defaults.repetition_penalty),
            seed=_field(data, "seed", int, None),
            stop=stops,
            constraint=constraint,
        )
    except InvalidOptionError as e:
        raise APIError(400, str(e)) from None
    if options.seed is None and options.temperature > 0:
        # An explicit seed per request: sampling never touches MLX's global random state from the worker.
        options = replace(options, seed=random.SystemRandom().randrange(2 ** 31))
    return options


def parse_response_format(response_format: Any) -> Optional[Constraint]:
    """OpenAI's `response_format` as a Constraint: None for absent or {"type": "text"}, any JSON object for
    {"type": "json_object"}, the schema of {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}} (always enforced, strict or not). Raises APIError 400 with the reason for anything else."""
    if response_format is None:
        return None
    where = "response_format"
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise APIError(400, "'response_format' must be an object with a 'type': 'text', 'json_object' or "
                            "'json_schema'", param=where)
    kind = response_format["type"]
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint.any_json()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(400, "response_format.json_schema must be an object with the JSON Schema under "
                                    "'schema' (and a 'name')", param="response_format.json_schema")
            return Constraint.json_schema(spec["schema"])
    except ConstraintError as e:
        raise APIError(400, f"response_format: {e}", param=where, code="invalid_response_format") from None
    raise APIError(400, f"response_format type {json.dumps(kind)} is not supported: use 'text', 'json_object' or "
                        "'json_schema'", param=where)


# ---------------------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response_body(kind: str, response_id: str, created: int, model_id: str, text: str, finish_reason: str,
                  usage: dict) -> dict:
    """A whole (non-streamed) completion."""
    if kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": response_id, "object": kind, "created": created, "model": model_id, "choices": [choice],
            "usage": usage}


def chunk_body(kind: str, response_id: str, created: int, model_id: str, *, text: Optional[str] = None,
               finish_reason: Optional[str] = None, role: bool = False, usage: Optional[dict] = None) -> dict:
    """One server-sent event of a stream; `usage` alone makes the final usage chunk (no choices)."""
    if usage is not None:
        choices = []
    elif kind == CHAT:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": response_id, "object": "chat.completion.chunk" if kind == CHAT else kind, "created": created,
            "model": model_id, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "openelm-mlx"}]}


def now() -> int:
    return int(time.time())
