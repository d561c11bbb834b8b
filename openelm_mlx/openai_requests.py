"""Validation of what a client sends to /v1/chat/completions and /v1/completions: pydantic models with
strict types for the bodies, then the checks that need the served model (prompt format, context,
vocabulary), each failure an OpenAI-style 400/404 saying what is wrong."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Annotated, Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from .errors import InvalidOptionError
from .generation import GenerationOptions
from .openai_api import CHAT, APIError, ParsedRequest, ServedModel, parse_response_format
from .prompt_format import Message, PromptFormatError, conversation_ids
from .sampling import MAX_TOP_LOGPROBS
from .tokenizer import Tokenizer

MAX_STOP_STRINGS = 16
# OpenAI's temperature range; 0 is greedy here.
MAX_TEMPERATURE = 2.0
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
# Request fields that map one to one onto GenerationOptions.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def _number(value: Any) -> float:
    """A JSON number (never a boolean), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("number_type", "must be a number")
    return float(value)


Number = Annotated[float, BeforeValidator(_number)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: Optional[bool] = None


class _Body(BaseModel):
    """The fields both endpoints share. Types are strict (no "10" for 10, no true for 1); unknown fields
    are ignored, as OpenAI's own optional fields that change nothing here (user, metadata...)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: Optional[str] = None
    n: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[int] = None
    min_p: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[Dict[str, Number]] = None
    seed: Optional[int] = None
    stop: Any = None  # a string or an array of them: checked by _options
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    speculative: Optional[bool] = None  # our extension: false opts out of speculative decoding
    response_format: Any = None  # checked by openai_api.parse_response_format


class ChatBody(_Body):
    messages: Optional[list] = None  # checked message by message by _chat_prompt
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class CompletionBody(_Body):
    prompt: Any = None  # a string, token ids, or a batch of one of them: checked by _completion_prompt
    logprobs: Optional[int] = None  # the number of alternatives per token (0-5), as OpenAI's legacy API
    echo: Optional[bool] = None
    suffix: Optional[str] = None


_EXPECTED = {"int_type": "an integer", "bool_type": "a boolean", "string_type": "a string", "dict_type": "an object",
             "model_type": "an object", "list_type": "an array", "number_type": "a number"}


def _validation_error(error: ValidationError) -> APIError:
    """The first problem pydantic found, as OpenAI's 400: the field as a path (messages[0].role)."""
    first = error.errors()[0]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    expected = _EXPECTED.get(first["type"])
    given = json.dumps(first.get("input"))[:80]
    if expected is None:
        return APIError(400, f"'{param}': {first['msg']}", param=param)
    return APIError(400, f"'{param}' must be {expected}, got {given}", param=param, code="invalid_type")


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
    try:
        request = (ChatBody if kind == CHAT else CompletionBody).model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    if request.model is not None and request.model != served.model_id:
        raise APIError(404, f"the model '{request.model}' does not exist: this server serves '{served.model_id}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    if request.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if kind == CHAT:
        ids = _chat_prompt(request.messages, served)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        logprobs = _chat_logprobs(request)
    else:
        if request.echo or request.suffix:
            raise APIError(400, "'echo' and 'suffix' are not supported", param="echo" if request.echo else "suffix")
        ids = _completion_prompt(request.prompt, served.tokenizer)
        max_tokens = request.max_tokens
        logprobs = request.logprobs
        if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {logprobs}",
                           param="logprobs")
    if len(ids) >= served.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens, but the model's context is {served.context_length} "
                            "tokens and the reply needs room too: shorten it", param="messages" if kind == CHAT
                       else "prompt", code="context_length_exceeded")
    options = _options(request, max_tokens, logprobs, served)
    speculative = request.speculative is not False
    if served.drafts and speculative and options.uses_token_processing:
        raise APIError(400, "speculative decoding (this server's --draft-model/--prompt-lookup) does not support "
                            "presence_penalty, frequency_penalty, logit_bias or logprobs: send \"speculative\": false "
                            "with them", param="speculative")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ParsedRequest(kind, ids, options, bool(request.stream), include_usage, speculative)


def _chat_logprobs(request: ChatBody) -> Optional[int]:
    """GenerationOptions.logprobs for a chat request: top_logprobs alternatives when logprobs is true."""
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise APIError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {request.top_logprobs}",
                           param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def _chat_prompt(messages: Optional[list], served: ServedModel) -> List[int]:
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


def _completion_prompt(prompt: Any, tokenizer: Tokenizer) -> List[int]:
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


def _options(request: _Body, max_tokens: Optional[int], logprobs: Optional[int],
             served: ServedModel) -> GenerationOptions:
    """The request's GenerationOptions: its own fields, the server's defaults for the others."""
    defaults, context_length = served.defaults, served.context_length
    if max_tokens is not None and not 1 <= max_tokens <= context_length:
        raise APIError(400, f"max_tokens must be between 1 and {context_length} (the model's context), "
                            f"got {max_tokens}", param="max_tokens")
    if request.temperature is not None and not 0 <= request.temperature <= MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be between 0 and {MAX_TEMPERATURE}, got {request.temperature}",
                       param="temperature")
    stop = request.stop
    stops: Tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if (stop is not None and not isinstance(stop, (str, list))) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    bias = {}
    for token, value in (request.logit_bias or {}).items():
        if not (token.isascii() and token.isdigit() and int(token) < served.tokenizer.vocab_size):
            raise APIError(400, f"logit_bias keys must be token ids 0..{served.tokenizer.vocab_size - 1}, "
                                f"got {json.dumps(token)[:40]}", param="logit_bias")
        bias[int(token)] = value
    given = {name: getattr(request, name) for name in SAMPLING_FIELDS if getattr(request, name) is not None}
    constraint = parse_response_format(request.response_format)
    try:
        options = replace(defaults, max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                          seed=request.seed, stop=stops, logit_bias=bias, logprobs=logprobs, constraint=constraint,
                          **given)
    except InvalidOptionError as e:
        field_name = next((name for name in ("seed", "logit_bias", *SAMPLING_FIELDS) if str(e).startswith(name)), None)
        raise APIError(400, str(e), param=field_name) from None
    if options.seed is None and options.temperature > 0:
        # An explicit seed per request: sampling never touches MLX's global random state from the worker.
        options = replace(options, seed=random.SystemRandom().randrange(2 ** 31))
    return options
