"""The generation engine: owns the model and runs continuous batching for the server and `batch_generate`.

Requests queue as Jobs. Each round (`step`) admits queued jobs while fewer than `max_batch` sequences
run, feeds one chunk of one admitted prompt (`prefill_chunk` tokens, so a long prompt does not stall the
others' tokens), then moves every decoding sequence forward by one token in one batched forward pass.
Finished and cancelled sequences leave between rounds.

Each sequence keeps its own KV cache (B = 1) and its own `SequenceSampler`: in the batched pass the
matmuls run over all rows and attention runs per row over the row's own cache (`RowCaches`), so a row's
logits are those of the same sequence run alone (float32 and bfloat16, measured on MLX's CPU matmuls),
and its seeded draws come from its own key stream. docs/serve.md#continuous-batching says how far that
goes.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import replace
from typing import Deque, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import DEFAULT_KV_GROUP_SIZE, KVCache, RowCaches
from .constraints import ConstraintState
from .drafting import Drafter
from .errors import InvalidOptionError, OpenELMError
from .generation import (CompletionText, GenerationOptions, GenerationResponse, GenerationResult, Prompt,
                         cache_window, context_room)
from .jobs import JOB_DONE as DONE
from .jobs import Job, JobRecord
from .model import Model
from .openai_api import COMPLETION, APIError, ParsedRequest
from .prompt_cache import PromptCache
from .prompt_store import PrefixStore
from .sampling import describe_logprobs
from .tokenizer import Tokenizer

# Sequences decoded together. Measured with the synthetic 270M in float32 on the 2-core CPU
# (docs/serve.md#continuous-batching): aggregate tok/s still grows at 8; the KV caches stay small.
DEFAULT_MAX_BATCH = 8
# Prompt tokens fed per round: a 64-token chunk of the 270M costs about as much as a few decode steps.
DEFAULT_PREFILL_CHUNK = 64
DEFAULT_QUEUE_SIZE = 16  # requests waiting for a place in the batch; more get 503
IDLE_POLL_S = 0.5  # how often an idle engine wakes (so the main thread sees Ctrl-C)


class _Row:
    """One admitted sequence: its cache, what it still has to prefill, its sampler and its text."""

    def __init__(self, job: Job, cache: List[KVCache], context: List[int], new_ids: List[int],
                 options: GenerationOptions, limit: int, context_full: bool, completion: CompletionText):
        self.job, self.cache, self.options, self.limit = job, cache, options, limit
        self.context = context  # ids the cache held when the row was admitted
        self.pending = new_ids  # prompt ids not fed yet
        self.fed: List[int] = []  # ids fed since admission (prompt, then generated)
        self.context_full = context_full  # the context, not max_tokens, bounds the length
        self.completion = completion
        seen = (context + new_ids)[-options.repetition_context_size:]
        self.sample = options.sequence_sampler(mx.array([seen]))
        self.constraint = None  # a ConstraintState when options.constraint is set (_new_row)
        self.last_token: Optional[int] = None  # generated, not fed yet
        self.stats = GenerationResponse(text="", token=-1, prompt_tokens=len(job.request.prompt_ids))
        self.started = time.perf_counter()
        self.first_at = self.started

    @property
    def constraints(self) -> Optional[List[ConstraintState]]:
        """The row's constraint state as the sampler takes it (None: free text)."""
        return None if self.constraint is None else [self.constraint]


class Engine:
    """Owns the model; runs jobs with continuous batching in the thread that calls `run` (the server) or
    `run_until_idle` (`batch_generate`). `submit` may be called from any thread."""

    def __init__(self, model: Model, tokenizer: Tokenizer, *, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, queue_size: int = DEFAULT_QUEUE_SIZE,
                 draft: Optional[Drafter] = None, num_draft_tokens: Optional[int] = None,
                 store: Optional[PrefixStore] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = DEFAULT_KV_GROUP_SIZE):
        """`draft`: speculative decoding for every request that does not opt out ("speculative": false),
        drafting `num_draft_tokens` per pass (None: GenerationOptions' default). It needs `max_batch` 1:
        drafts are verified one sequence at a time. `store`: the cached prefixes rows start from and
        finish into (default: an empty PrefixStore of the default size). `kv_bits`: every request's KV
        cache quantized so (None: as each request's options say)."""
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("queue_size", queue_size)):
            if not (isinstance(value, int) and value >= 1):
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if draft is not None and max_batch != 1:
            raise InvalidOptionError(
                f"speculative decoding verifies one sequence at a time and cannot share a batch (max batch "
                f"{max_batch}): use a max batch of 1 with a draft model, or drop the draft model to batch")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.draft, self.num_draft_tokens = draft, num_draft_tokens
        self.store = store if store is not None else PrefixStore(model)
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.prompt_cache = PromptCache(model, self.store)  # the speculative path's view of the store
        self.jobs: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self.records: Deque[JobRecord] = collections.deque(maxlen=1000)
        self._rows: List[_Row] = []  # admission order
        self._stopping = False

    # ------------------------------------------------------------------ the jobs' side

    def submit(self, job: Job) -> None:
        """Queue `job`; APIError 503 when `queue_size` jobs already wait."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; retry later",
                           type="server_error", code="queue_full") from None

    def stop(self) -> None:
        """Make `run` return once the jobs queued before this call are done."""
        self.jobs.put(None)

    # ------------------------------------------------------------------ the model's side

    def run(self) -> None:
        """Serve jobs until `stop`."""
        try:
            while not (self._stopping and not self._rows):
                if not self._rows:
                    self._admit(wait=True)
                self.step()
        finally:
            mx.synchronize()
            if threading.current_thread() is not threading.main_thread():
                mx.clear_streams()  # a thread that used MLX must release its streams before it ends

    def run_until_idle(self) -> None:
        """Serve until no job runs or waits (in the calling thread)."""
        while self._rows or not self.jobs.empty():
            self.step()

    @property
    def active(self) -> int:
        """Sequences in the batch (prefilling or decoding)."""
        return len(self._rows)

    def step(self) -> None:
        """One round: admit queued jobs while the batch has room, drop cancelled rows, feed one prompt chunk,
        move every decoding row forward by one token."""
        self._admit(wait=False)
        for row in [r for r in self._rows if r.job.cancelled.is_set()]:
            self._finish(row, "cancelled")
        prefilling = [r for r in self._rows if r.pending]
        if prefilling:
            self._guarded([prefilling[0]], self._prefill_chunk)
        decoding = [r for r in self._rows if not r.pending and r.last_token is not None]
        if decoding:
            self._guarded(decoding, self._decode)

    def _admit(self, *, wait: bool) -> None:
        """Take queued jobs while the batch has room; with `wait`, wait a little for the first one."""
        while len(self._rows) < self.max_batch and not self._stopping:
            try:
                job = self.jobs.get(timeout=IDLE_POLL_S) if wait else self.jobs.get_nowait()
            except queue.Empty:
                return
            wait = False
            if job is None:
                self._stopping = True
            elif job.cancelled.is_set():
                self._close(job, "cancelled", 0)
            elif self.draft is not None and job.request.speculative:
                self._run_speculative(job)  # max_batch is 1: nothing else runs meanwhile
            else:
                try:
                    self._rows.append(self._new_row(job))
                except OpenELMError as e:
                    job.events.put(APIError(400, str(e)))
                    self._close(job, "error", 0)
                except Exception as e:  # an unexpected failure ends this request, not the server
                    job.events.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
                    self._close(job, "error", 0)

    def _options(self, job: Job) -> GenerationOptions:
        options = job.request.options
        if self.kv_bits is not None:
            options = replace(options, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)
        return options

    def _new_row(self, job: Job) -> _Row:
        prompt, options = job.request.prompt_ids, self._options(job)
        if not prompt:
            raise InvalidOptionError("the prompt is empty: give at least one token")
        cache, context = self._take_cache(prompt, options)
        new_ids = list(prompt[len(context):])
        room = context_room(self.model, len(new_ids), cache, options.sliding_window)
        job.reuse.cached_tokens, job.reuse.prefilled_tokens = len(context), len(new_ids)
        limit = options.max_tokens if room is None else min(options.max_tokens, room)
        completion = CompletionText(self.tokenizer, options.stop, continues_text=self._continues_text(job))
        row = _Row(job, cache, context, list(new_ids), options, limit,
                   room is not None and room < options.max_tokens, completion)
        if options.constraint is not None:
            row.constraint = options.constraint.start(self.tokenizer)
        return row

    def _continues_text(self, job: Job) -> bool:
        """Whether the completion's first word keeps its space. decode() drops it at the start of a text, but
        a completion continues its prompt: prompt + completion must read as decode(prompt + completion
        ids), e.g. "Once upon a time" + " there"."""
        if job.continues_text is not None:
            return job.continues_text
        return job.request.kind == COMPLETION and self.tokenizer.decode(job.request.prompt_ids) != ""

    def _take_cache(self, prompt: Sequence[int], options: GenerationOptions) -> Tuple[List[KVCache], List[int]]:
        """A cache for `prompt` and the ids it holds (a prefix of `prompt`, never all of it): a copy of the
        stored prefix that shares most with `prompt`, or an empty one. The row owns it until it ends
        (`_give_back`)."""
        cache, cached = self.store.lookup(prompt, options)
        return cache, list(prompt[:cached])

    def _give_back(self, row: _Row) -> None:
        """A finished row's cache goes into the store. It holds the row's context and every fed id (the
        prompt and the generated tokens but the last), unless a sliding window dropped positions (then
        the store does not take it)."""
        held = row.cache[0].offset
        self.store.insert((row.context + row.fed)[:held], row.cache)

    def _guarded(self, rows: List[_Row], action) -> None:
        """Run `action(rows)`; if it fails, those rows end with a 500 (their caches are dropped)."""
        try:
            action(rows)
        except Exception as e:
            for row in rows:
                row.job.events.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
                self._finish(row, "error", keep_cache=False)

    def _prefill_chunk(self, rows: List[_Row]) -> None:
        """Feed the next chunk of one row's prompt; after the last one, sample its first token."""
        (row,) = rows
        size = min(self.prefill_chunk, row.options.prefill_step)
        # Chunks are aligned at the prompt's start, as in decode_tokens, and only the last yields logits.
        chunk, row.pending = row.pending[:size], row.pending[size:]
        hidden = self.model.hidden(mx.array([chunk]), row.cache)
        row.fed += chunk
        if row.pending or row.limit == 0:
            mx.eval([layer_cache.state for layer_cache in row.cache])
            if not row.pending:  # max_tokens 0: the prompt is in the cache, nothing to generate
                self._emit_final(row, replace(row.stats, finish_reason="length", context_full=row.context_full))
            return
        token = row.sample(self.model.logits(hidden[:, -1, :]).astype(mx.float32), row.constraints)
        self._emit(row, token.item())

    def _decode(self, rows: List[_Row]) -> None:
        """One batched forward pass over the rows' last tokens; each row samples its own next token."""
        last = mx.array([[row.last_token] for row in rows])  # [B, 1]
        layer_caches = [RowCaches([row.cache[i] for row in rows]) for i in range(len(self.model.layers))]
        hidden = self.model.hidden(last, layer_caches)
        logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)  # [B, V]
        for row in rows:
            row.fed.append(row.last_token)
        tokens = mx.concatenate([row.sample(logits[b:b + 1], row.constraints) for b, row in enumerate(rows)]).tolist()
        for row, token in zip(rows, tokens):
            self._emit(row, token)

    def _emit(self, row: _Row, token: int) -> None:
        """Send one generated token's response; end the row at EOS, a stop string or its length limit."""
        now = time.perf_counter()
        stats = row.stats
        n = stats.generation_tokens = stats.generation_tokens + 1
        if n == 1:
            row.first_at = now
            stats.ttft_s = now - row.started
            stats.prompt_tps = stats.prompt_tokens / stats.ttft_s
        stats.generation_tps = (n - 1) / (now - row.first_at) if n > 1 else 0.0
        stats.peak_memory_bytes = mx.get_peak_memory()
        text, ended = row.completion.add(token)
        done = False
        if row.constraint is not None:
            row.constraint.advance(token)
            done = not ended and row.constraint.is_finished  # only EOS could follow
        finish = "stop" if ended or done else ("length" if n == row.limit else None)
        if finish == "length" or done:
            text += row.completion.finish()
        response = replace(stats, text=text, token=token, finish_reason=finish,
                           context_full=finish == "length" and row.context_full)
        if row.options.logprobs is not None:  # the row's sampler just drew this token
            response.logprob, response.top_logprobs = describe_logprobs(row.sample.reported)[0]
        if finish:
            self._emit_final(row, response)
        else:
            row.job.events.put(response)
            row.last_token = token

    def _emit_final(self, row: _Row, response: GenerationResponse) -> None:
        row.job.events.put(response)
        self._finish(row, response.finish_reason)

    def _finish(self, row: _Row, reason: str, *, keep_cache: bool = True) -> None:
        """Take `row` out of the batch; its cache goes back to the prompt cache unless it failed."""
        self._rows.remove(row)
        if keep_cache:
            self._give_back(row)
        self._close(row.job, reason, row.stats.generation_tokens)

    def _close(self, job: Job, reason: str, generated: int, drafted: int = 0, accepted: int = 0) -> None:
        job.events.put(DONE)
        self.records.append(JobRecord(generated, reason, job.reuse.cached_tokens, drafted, accepted))

    def _run_speculative(self, job: Job) -> None:
        """A whole request with speculative decoding (the one-sequence decode loop, on the prompt cache)."""
        finish, last = "cancelled", None
        try:
            options = self._options(job)
            if self.num_draft_tokens is not None:
                options = replace(options, num_draft_tokens=self.num_draft_tokens)
            responses = self.prompt_cache.generate(self.tokenizer, job.request.prompt_ids, options, job.reuse,
                                                   continues_text=self._continues_text(job), draft=self.draft)
            try:
                for response in responses:
                    last = response
                    job.events.put(response)
                    finish = response.finish_reason or finish
                    if job.cancelled.is_set() and not response.finish_reason:
                        break
            finally:
                responses.close()
        except Exception as e:  # an unexpected failure ends this request, not the server
            finish = "error"
            job.events.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
        finally:
            last = last or GenerationResponse(text="", token=-1)
            self._close(job, finish, last.generation_tokens, last.drafted_tokens, last.accepted_tokens)


def batch_generate(model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                   options: Optional[GenerationOptions] = None, *,
                   max_batch: int = DEFAULT_MAX_BATCH,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> List[GenerationResult]:
    """Generate for several prompts with the engine (continuous batching, at most `max_batch` at once).

    Each row's tokens are those of `generate` for that prompt alone: greedy exactly, seeded sampling
    with the same seed too (each row draws from its own key stream)."""
    options = options or GenerationOptions()
    if options.logprobs is not None:
        raise InvalidOptionError("batch_generate does not report logprobs: use stream_generate for them")
    rows = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not rows or not all(rows):
        raise InvalidOptionError("batch_generate needs at least one prompt, and no prompt may be empty")
    cache_window(model, options)  # refuses a bad prefill_step before anything runs
    for ids in rows:
        context_room(model, len(ids), None, options.sliding_window)
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, queue_size=len(rows))
    jobs = [Job(ParsedRequest(COMPLETION, ids, options, stream=False, include_usage=False, speculative=False),
                continues_text=False) for ids in rows]
    for job in jobs:
        engine.submit(job)
    engine.run_until_idle()
    return [_result(job) for job in jobs]


def _result(job: Job) -> GenerationResult:
    """The whole completion from a finished job's events (raises its error, if it failed)."""
    texts, tokens, last = [], [], None
    while (event := job.events.get_nowait()) is not DONE:
        if isinstance(event, APIError):
            raise OpenELMError(event.message)
        texts.append(event.text)
        if event.token >= 0:
            tokens.append(event.token)
        last = event
    return GenerationResult("".join(texts), tokens, last.finish_reason, last)
