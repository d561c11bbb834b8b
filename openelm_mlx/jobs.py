"""What the HTTP side hands the generation worker, and what comes back: a Job per request.

The engine (engine.Engine, or anything with the same submit/run/stop/records contract) puts the
job's GenerationResponses on `events`, or an APIError, then JOB_DONE; it stops early once
`cancelled` is set. Nothing here computes with MLX or speaks HTTP, so both sides import it without
importing each other.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .openai_api import ParsedRequest

JOB_DONE = object()  # end of a job's events


@dataclass
class ReuseStats:
    """How a prompt was split between cached positions and the prefill (filled in when the job starts)."""

    cached_tokens: int = 0
    prefilled_tokens: int = 0


@dataclass
class Job:
    request: ParsedRequest
    events: "queue.Queue" = field(default_factory=queue.Queue)  # GenerationResponse, APIError, then JOB_DONE
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    reuse: ReuseStats = field(default_factory=ReuseStats)
    # Whether the completion continues its prompt's text (its first word keeps its space); None: decided
    # from the request (a completion with a non-empty prompt).
    continues_text: Optional[bool] = None
    # A cache of the caller's (`stream_generate`) holding `context_ids` before the prompt (the recent ones
    # suffice without speculative decoding); None: the engine's prefix store supplies one. The job's
    # prompt_ids are then only what the cache does not hold.
    cache: Optional[List[Any]] = None
    context_ids: Sequence[int] = ()
    speculation: Optional[Any] = None  # a drafting.Speculation of the job's own (counters readable after)
    # Generated tokens the consumer has taken, when it counts them (`run_alone`): a cancelled job's cache
    # keeps only those (a round may have generated more than were taken).
    delivered: Optional[int] = None


@dataclass(frozen=True)
class JobRecord:
    """How a job ended, kept for logs and tests."""

    generated_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    cached_tokens: int
    drafted_tokens: int = 0
    accepted_tokens: int = 0
