"""What the HTTP side hands the generation worker, and what comes back: a Job per request.

The engine (engine.Engine, or anything with the same submit/run/stop/records contract) puts the
job's GenerationResponses on `events`, or an APIError, then JOB_DONE; it stops early once
`cancelled` is set. Nothing here touches MLX or HTTP, so both sides import it without importing
each other.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Optional

from .openai_api import ParsedRequest
from .prompt_cache import ReuseStats

JOB_DONE = object()  # end of a job's events


@dataclass
class Job:
    request: ParsedRequest
    events: "queue.Queue" = field(default_factory=queue.Queue)  # GenerationResponse, APIError, then JOB_DONE
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    reuse: ReuseStats = field(default_factory=ReuseStats)
    # Whether the completion continues its prompt's text (its first word keeps its space); None: decided
    # from the request (a completion with a non-empty prompt).
    continues_text: Optional[bool] = None


@dataclass(frozen=True)
class JobRecord:
    """How a job ended, kept for logs and tests."""

    generated_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    cached_tokens: int
    drafted_tokens: int = 0
    accepted_tokens: int = 0
