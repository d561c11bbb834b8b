"""The OpenAI API's shared pieces: errors in OpenAI's shape, the parsed request a Job carries, and the JSON
the official clients expect back. Request validation is openai_requests.py; no HTTP here (http_app.py)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from .constraints import Constraint
from .errors import ConstraintError
from .generation import GenerationOptions, GenerationResponse
from .prompt_format import ChatTemplate
from .tokenizer import Tokenizer

CHAT, COMPLETION = "chat.completion", "text_completion"


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
    """What requests are checked against: the model's id, tokenizer, prompt format and context, the
    sampling defaults for fields a request leaves out, and whether the server drafts (speculative)."""

    model_id: str
    tokenizer: Tokenizer
    template: ChatTemplate
    context_length: int
    defaults: GenerationOptions = GenerationOptions()
    drafts: bool = False


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # CHAT or COMPLETION
    prompt_ids: List[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    speculative: bool = True  # false: no speculative decoding for this request (serve --draft-model)


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


def _token_entry(tokenizer: Tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token as OpenAI's logprobs show it: its text (a control token: its piece, e.g. </s>) and bytes."""
    data = tokenizer.piece_bytes(token)
    text = data.decode("utf-8", errors="replace") if data else tokenizer.sp.id_to_piece(token)
    return text, list(data or text.encode())


def logprobs_body(kind: str, tokenizer: Tokenizer, steps: Sequence[GenerationResponse]) -> Optional[dict]:
    """The `logprobs` of a choice (or of one chunk) for these steps; None when logprobs were not asked for."""
    steps = [s for s in steps if s.logprob is not None]
    if not steps:
        return None
    if kind == CHAT:
        def entry(token: int, logprob: float) -> dict:
            text, data = _token_entry(tokenizer, token)
            return {"token": text, "logprob": logprob, "bytes": data}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
                            for s in steps], "refusal": None}
    return {"tokens": [_token_entry(tokenizer, s.token)[0] for s in steps],
            "token_logprobs": [s.logprob for s in steps],
            "top_logprobs": [{_token_entry(tokenizer, t)[0]: lp for t, lp in s.top_logprobs} for s in steps]}


def response_body(kind: str, response_id: str, created: int, model_id: str, text: str, finish_reason: str,
                  usage: dict, logprobs: Optional[dict] = None) -> dict:
    """A whole (non-streamed) completion."""
    if kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": response_id, "object": kind, "created": created, "model": model_id, "choices": [choice],
            "usage": usage}


def chunk_body(kind: str, response_id: str, created: int, model_id: str, *, text: Optional[str] = None,
               finish_reason: Optional[str] = None, role: bool = False, usage: Optional[dict] = None,
               logprobs: Optional[dict] = None) -> dict:
    """One server-sent event of a stream; `usage` alone makes the final usage chunk (no choices)."""
    if usage is not None:
        choices = []
    elif kind == CHAT:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
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
