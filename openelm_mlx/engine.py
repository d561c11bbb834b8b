"""The generation engine, the project's one decode loop: `stream_generate`, `generate`, `chat`, `batch_generate`
and the server all run on it.

Requests queue as Jobs. Each round (`step`) admits queued jobs while fewer than `max_batch` sequences
run, feeds up to `prefill_chunk` prompt tokens of the admitted prompts in one packed pass (so several
prompts arriving together share a pass, and a long prompt does not stall the others' tokens for its
whole prefill), then moves every decoding sequence forward: plain rows by one token in one batched
forward pass, a speculative row by one verify round (draft, score in one pass, keep what the target
agrees with). Finished and cancelled sequences leave between rounds.

Each sequence keeps its own KV cache (B = 1) and its own `SequenceSampler`: in the batched pass the
matmuls run over all rows and attention runs per row over the row's own cache (`RowCaches`), so a row's
logits are those of the same sequence run alone (float32 and bfloat16, measured on MLX's CPU matmuls),
and its seeded draws come from its own key stream. docs/serve.md#continuous-batching says how far that
goes.

The rounds are pipelined: a round queues the forward pass over the tokens sampled in the round before,
then reads those tokens and emits them while the device runs it, so the device never waits for Python
(a row whose emitted token ends it gets that extra position trimmed). A constrained row's mask needs its
last token on the host; it is computed while the pass runs.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import replace
from typing import Deque, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import DEFAULT_KV_GROUP_SIZE, KVCache, RowCaches
from .constraints import ConstraintState, mask_rows
from .drafting import DraftModel, Drafter, Speculation, accept_drafts
from .errors import InvalidOptionError, OpenELMError
from .generation import (CompletionText, GenerationOptions, GenerationResponse, GenerationResult, Prompt,
                         cache_window, context_room)
from .jobs import JOB_DONE as DONE
from .jobs import Job, JobRecord
from .model import Model
from .openai_api import COMPLETION, APIError, ParsedRequest
from .prompt_store import PrefixStore
from .sampling import describe_logprobs
from .tokenizer import Tokenizer

# Sequences decoded together. Measured with serve_load (synthetic 270M, float32, MKL, 2-core CPU;
# docs/bench.md#serving-under-load): a 16-row decode step cost about what an 8-row one did (MKL's
# few-row matmuls), so 16 clients got about twice the tokens per second of a batch capped at 8; the
# KV caches stay small.
DEFAULT_MAX_BATCH = 16
# Prompt tokens fed per round, over all waiting prompts packed into one pass. Measured with serve_load
# (synthetic 270M, float32, 8 clients sending 64-token prompts at once; docs/bench.md#serving-under-load):
# 512 gave 2.3x the aggregate tok/s of 64 and a quarter of its p95 time to first token, because the
# prompts share one pass instead of taking a round each. The cost: a long prompt arriving while others
# decode delays their next token by up to one 512-token pass.
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_QUEUE_SIZE = 16  # requests waiting for a place in the batch; more get 503
IDLE_POLL_S = 0.5  # how often an idle engine wakes (so the main thread sees Ctrl-C)

Reported = Tuple[mx.array, mx.array, mx.array]  # a draw's logprobs (SequenceSampler.reported)


class _Row:
    """One admitted sequence: its cache, what it still has to prefill, its sampler, its tokens and text."""

    def __init__(self, job: Job, cache: List[KVCache], context: List[int], prompt: List[int],
                 options: GenerationOptions, limit: int, context_full: bool, completion: Optional[CompletionText],
                 speculation: Optional[Speculation]):
        self.job, self.cache, self.options, self.limit = job, cache, options, limit
        self.context = context  # ids before `prompt` (all the cache holds; a caller's cache: its recent ids)
        self.base = cache[0].offset  # positions the cache held at admission
        self.prompt = prompt  # ids this row prefills
        self.pending = list(prompt)  # prompt ids not fed yet
        self.prefilled = False  # the whole prompt went through and the first token was sampled
        self.generated: List[int] = []  # emitted tokens
        self.context_full = context_full  # the context, not max_tokens, bounds the length
        self.completion = completion  # None: tokens only (no text, EOS does not end the row)
        self.speculation = speculation
        seen = (context + prompt)[-options.repetition_context_size:]
        self.sample = options.sequence_sampler(mx.array([seen]))
        self.constraint: Optional[ConstraintState] = None  # set when options.constraint is (_new_row)
        # Sampled, not yet emitted or fed: (an async-evaluated array of tokens, this row's index in it), and
        # the draw's logprobs when the options ask for them.
        self.next: Optional[Tuple[mx.array, int]] = None
        self.next_reported: Optional[Reported] = None
        self.stats = GenerationResponse(text="", token=-1, prompt_tokens=len(job.request.prompt_ids))
        self.started = time.perf_counter()
        self.first_at = self.started

    @property
    def constraints(self) -> Optional[List[ConstraintState]]:
        """The row's constraint state as the sampler takes it (None: free text)."""
        return None if self.constraint is None else [self.constraint]

    def held(self, delivered: Optional[int] = None) -> int:
        """Positions the cache holds at a clean end: what it held, then (once prefilled) the prompt and every
        generated token but the last (a follow-up starts by feeding that one); with `delivered`, only the
        first `delivered` generated tokens count (a consumer that stopped before taking the others)."""
        if not self.prefilled:
            return self.base
        generated = len(self.generated) if delivered is None else min(delivered, len(self.generated))
        return self.base + len(self.prompt) + max(generated - 1, 0)

    def sequence(self) -> List[int]:
        """Every id of the sequence so far: the context, the prompt, the generated tokens."""
        return self.context + self.prompt + self.generated


class Engine:
    """Owns the model; runs jobs with continuous batching in the thread that calls `run` (the server),
    `run_until_idle` (`batch_generate`) or `step` (`run_alone`). `submit` may be called from any thread."""

    def __init__(self, model: Model, tokenizer: Optional[Tokenizer], *, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, queue_size: int = DEFAULT_QUEUE_SIZE,
                 draft: Optional[Drafter] = None, num_draft_tokens: Optional[Union[int, str]] = None,
                 store: Optional[PrefixStore] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = DEFAULT_KV_GROUP_SIZE):
        """`tokenizer` None: tokens only (no text; EOS and stop strings do not end a sequence). `draft`:
        speculative decoding for every request that does not opt out ("speculative": false), drafting
        `num_draft_tokens` per pass (None: each request's options). It needs `max_batch` 1: drafts are
        verified one sequence at a time. `store`: the cached prefixes rows start from and finish into
        (default: an empty PrefixStore of the default size). `kv_bits`: every request's KV cache quantized
        so (None: as each request's options say)."""
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
        """One round: admit queued jobs while the batch has room, drop cancelled rows, feed up to
        `prefill_chunk` prompt tokens (one packed pass), move every decoding row forward (plain rows by a
        token in one batched pass, a speculative row by a verify round)."""
        self._admit(wait=False)
        self.drop_cancelled()
        chunks = self._prefill_plan([r for r in self._rows if r.pending])
        if chunks:
            self._guarded([row for row, _ in chunks], lambda rows: self._prefill(chunks))
        decoding = [r for r in self._rows if r.prefilled]
        for row in [r for r in decoding if r.speculation is not None]:
            self._guarded([row], self._speculative_round)
        plain = [r for r in decoding if r.speculation is None]
        if plain:
            self._guarded(plain, self._decode)

    def drop_cancelled(self) -> None:
        """End the rows whose jobs were cancelled (their caches settled, as at any end)."""
        for row in [r for r in self._rows if r.job.cancelled.is_set()]:
            self._finish(row, "cancelled", delivered=row.job.delivered)

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
            else:
                try:
                    self._rows.append(self._new_row(job))
                except Exception as e:  # a bad request ends that request, not the server
                    self._fail(job, e, 400 if isinstance(e, OpenELMError) else 500)
                    self._close(job, "error", 0)

    def _options(self, job: Job) -> GenerationOptions:
        options = job.request.options
        if self.kv_bits is not None:
            options = replace(options, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)
        return options

    def _new_row(self, job: Job) -> _Row:
        prompt, options = list(job.request.prompt_ids), self._options(job)
        if not prompt:
            raise InvalidOptionError("the prompt is empty: give at least one token")
        speculation = self._speculation(job, options)
        if job.cache is not None:  # the caller's cache, holding ids before the prompt
            cache, context = job.cache, list(job.context_ids)
        else:
            cache, cached = self.store.lookup(prompt, options)
            context, prompt = prompt[:cached], prompt[cached:]
        room = context_room(self.model, len(prompt), cache, options.sliding_window)
        job.reuse.cached_tokens, job.reuse.prefilled_tokens = len(job.request.prompt_ids) - len(prompt), len(prompt)
        limit = options.max_tokens if room is None else min(options.max_tokens, room)
        completion = None
        if self.tokenizer is None and options.stop:
            raise InvalidOptionError("stop strings need the tokenizer: generate text (stream_generate), not bare tokens")
        if self.tokenizer is not None:
            completion = CompletionText(self.tokenizer, options.stop, continues_text=self._continues_text(job))
        row = _Row(job, cache, context, prompt, options, limit, room is not None and room < options.max_tokens,
                   completion, speculation)
        if options.constraint is not None:
            if self.tokenizer is None:
                raise InvalidOptionError("a constraint needs the tokenizer: generate text, not bare tokens")
            row.constraint = options.constraint.start(self.tokenizer)
        return row

    def _speculation(self, job: Job, options: GenerationOptions) -> Optional[Speculation]:
        """The job's speculative decoding (its own, or the engine's draft unless it opted out); checked
        against the options."""
        speculation = job.speculation
        if speculation is None and self.draft is not None and job.request.speculative:
            num_draft_tokens = self.num_draft_tokens if self.num_draft_tokens is not None else options.num_draft_tokens
            speculation = Speculation(self.draft, num_draft_tokens)
        if speculation is not None:
            check_speculation(options)
        return speculation

    def _continues_text(self, job: Job) -> bool:
        """Whether the completion's first word keeps its space. decode() drops it at the start of a text, but
        a completion continues its prompt: prompt + completion must read as decode(prompt + completion
        ids), e.g. "Once upon a time" + " there"."""
        if job.continues_text is not None:
            return job.continues_text
        return job.request.kind == COMPLETION and self.tokenizer.decode(job.request.prompt_ids) != ""

    def _guarded(self, rows: List[_Row], action) -> None:
        """Run `action(rows)`; if it fails, those rows end with an error (store caches are dropped)."""
        try:
            action(rows)
        except Exception as e:
            for row in rows:
                if row in self._rows:
                    self._fail(row.job, e, 500)
                    self._finish(row, "error", keep_cache=False)

    @staticmethod
    def _fail(job: Job, error: Exception, status: int) -> None:
        """Report `error` on the job's events as an APIError (400: the request's own mistake; 500: a failed
        step); the original exception is its __cause__, which `run_alone` raises."""
        if status == 400:
            event = APIError(400, str(error))
        else:
            event = APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")
        event.__cause__ = error
        job.events.put(event)

    def _prefill_plan(self, rows: List[_Row]) -> List[Tuple[_Row, int]]:
        """How many prompt tokens each prefilling row feeds this round: in admission order, each as many as
        it has left (at most its prefill_step) until the round's `prefill_chunk` tokens are spent."""
        plan, budget = [], self.prefill_chunk
        for row in rows:
            if budget == 0:
                break
            size = min(budget, row.options.prefill_step, len(row.pending))
            plan.append((row, size))
            budget -= size
        return plan

    def _prefill(self, chunks: List[Tuple[_Row, int]]) -> None:
        """Feed the planned chunks in one pass (several rows' chunks packed into one sequence, each attending
        over its own cache); a row whose prompt is then complete draws its first token."""
        rows = [row for row, _ in chunks]
        ids = []
        for row, size in chunks:
            ids += row.pending[:size]
            row.pending = row.pending[size:]
        if len(rows) == 1:  # one prompt needs its last position's hidden state at most
            hidden = self.model.hidden(mx.array([ids]), rows[0].cache, last=1)[0]  # [1, model_dim]
            ends = [1]
        else:
            lengths = [size for _, size in chunks]
            caches = [RowCaches([row.cache[i] for row in rows], lengths) for i in range(len(self.model.layers))]
            hidden = self.model.hidden(mx.array([ids]), caches)[0]  # [tokens, model_dim]
            ends = list(itertools.accumulate(size for _, size in chunks))
        drawing = [(row, end - 1) for row, end in zip(rows, ends) if not row.pending and row.limit > 0]
        drew = [row for row, _ in drawing]
        if drew:  # only the prompts' last positions need logits
            logits = self.model.logits(hidden[mx.array([last for _, last in drawing])]).astype(mx.float32)
            self._sample(drew, logits)
        others = [row for row in rows if row not in drew]
        if others:  # evaluated now, so no row carries a lazy graph from chunk to chunk
            mx.eval([layer_cache.state for row in others for layer_cache in row.cache])
        for row in rows:
            row.prefilled = not row.pending
        for row in others:
            if row.prefilled:  # max_tokens 0: the prompt is in the cache, nothing to generate
                self._emit_final(row, replace(row.stats, finish_reason="length", context_full=row.context_full))

    def _sample(self, rows: List[_Row], logits: mx.array) -> None:
        """Each row draws its next token from its row of `logits` [B, V]; the draws are queued, not read."""
        drawn = [row.sample(logits[b:b + 1], row.constraints) for b, row in enumerate(rows)]
        tokens = drawn[0] if len(drawn) == 1 else mx.concatenate(drawn)
        reported = []
        for b, row in enumerate(rows):
            row.next = (tokens, b)
            row.next_reported = row.sample.reported if row.options.logprobs is not None else None
            reported.extend(row.next_reported or ())
        mx.async_eval(tokens, *reported)

    def _decode(self, rows: List[_Row]) -> None:
        """Feed the rows' sampled tokens in one batched pass, emit those tokens while it runs, then let each
        row that goes on draw its next token from the pass's logits."""
        feed = [row for row in rows if len(row.generated) + 1 < row.limit]  # the others end with this token
        logits = None
        if feed:
            last = _gather([row.next for row in feed])[:, None]  # [B, 1]
            caches = (feed[0].cache if len(feed) == 1
                      else [RowCaches([row.cache[i] for row in feed]) for i in range(len(self.model.layers))])
            hidden = self.model.hidden(last, caches)
            logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)  # [B, V]
            mx.async_eval(logits)
        for row, token in zip(rows, _read([row.next for row in rows])):
            self._emit(row, token, row.next_reported)
        going_on = [(b, row) for b, row in enumerate(feed) if row in self._rows]
        if len(going_on) < len(feed):
            logits = logits[mx.array([b for b, _ in going_on])] if going_on else None
        if going_on:
            self._sample([row for _, row in going_on], logits)

    def _speculative_round(self, rows: List[_Row]) -> None:
        """Emit the row's sampled token if it has one waiting, then run one verify round and emit its tokens
        (accepted drafts, then the target's own), stopping where the row ends."""
        (row,) = rows
        waiting, row.next = row.next, None
        if waiting is not None:
            (token,) = _read([waiting])
            if not self._emit(row, token):
                return
        key = row.sample.next_key()
        tokens, accepted = _verify_round(self.model, row.cache, row.sequence(), row.options, row.speculation,
                                         row.limit - len(row.generated), key, row.constraint)
        for i, token in enumerate(tokens):
            if not self._emit(row, token, from_draft=i < accepted):
                return

    def _emit(self, row: _Row, token: int, reported: Optional[Reported] = None, *, from_draft: bool = False) -> bool:
        """Send one generated token's response; end the row at EOS, a stop string, its constraint's end or its
        length limit. Returns whether the row goes on."""
        now = time.perf_counter()
        row.generated.append(token)
        stats = row.stats
        n = stats.generation_tokens = len(row.generated)
        if n == 1:
            row.first_at = now
            stats.ttft_s = now - row.started
            stats.prompt_tps = stats.prompt_tokens / stats.ttft_s
        stats.generation_tps = (n - 1) / (now - row.first_at) if n > 1 else 0.0
        stats.peak_memory_bytes = mx.get_peak_memory()
        if row.speculation is not None:
            stats.drafted_tokens, stats.accepted_tokens = row.speculation.drafted, row.speculation.accepted
            stats.verify_passes = row.speculation.target_passes
        text, ended = row.completion.add(token) if row.completion is not None else ("", False)
        done = False
        if row.constraint is not None:
            row.constraint.advance(token)
            done = not ended and row.constraint.is_finished  # only EOS could follow
        finish = "stop" if ended or done else ("length" if n == row.limit else None)
        if row.completion is not None and (finish == "length" or done):
            text += row.completion.finish()
        response = replace(stats, text=text, token=token, finish_reason=finish, from_draft=from_draft,
                           context_full=finish == "length" and row.context_full)
        if reported is not None:
            response.logprob, response.top_logprobs = describe_logprobs(reported)[0]
        if finish:
            self._emit_final(row, response)
            return False
        row.job.events.put(response)
        return True

    def _emit_final(self, row: _Row, response: GenerationResponse) -> None:
        row.job.events.put(response)
        self._finish(row, response.finish_reason)

    def _finish(self, row: _Row, reason: str, *, keep_cache: bool = True, delivered: Optional[int] = None) -> None:
        """Take `row` out of the batch. Its cache is settled (`_Row.held`: also what a pipelined pass or a
        failed step fed beyond it is trimmed), then a store cache goes back to the store unless it failed."""
        self._rows.remove(row)
        held = row.held(delivered)
        for layer_cache in row.cache:  # also evens out layers that a failed step reached only partly
            layer_cache.trim(layer_cache.offset - held)
        if keep_cache and row.job.cache is None:
            # The store takes it only if the cache holds exactly these ids (no sliding window dropped any).
            self.store.insert(row.sequence()[:held], row.cache)
        speculation = row.speculation
        self._close(row.job, reason, len(row.generated), speculation.drafted if speculation else 0,
                    speculation.accepted if speculation else 0)

    def _close(self, job: Job, reason: str, generated: int, drafted: int = 0, accepted: int = 0) -> None:
        job.events.put(DONE)
        self.records.append(JobRecord(generated, reason, job.reuse.cached_tokens, drafted, accepted))


def _gather(picks: Sequence[Tuple[mx.array, int]]) -> mx.array:
    """The picked tokens [B] as one array (lazily; the arrays they were drawn into, as they are when whole)."""
    arrays = {id(array) for array, _ in picks}
    if len(arrays) == 1 and [i for _, i in picks] == list(range(picks[0][0].shape[0])):
        return picks[0][0]
    return mx.concatenate([array[i:i + 1] for array, i in picks])


def _read(picks: Sequence[Tuple[mx.array, int]]) -> List[int]:
    """The picked tokens' values. Reads only the arrays they were drawn into (already queued), never a new
    op: a new op would queue behind the pass just started and wait for it."""
    values = {}
    for array, _ in picks:
        if id(array) not in values:
            values[id(array)] = array.tolist()
    return [values[id(array)][i] for array, i in picks]


def check_speculation(options: GenerationOptions) -> None:
    """Refuse the options speculative decoding cannot honour."""
    if options.sliding_window:
        # A verify pass of k + 1 positions fills the window at another moment than single steps do, so
        # different positions would be dropped and the output would differ from plain decoding.
        raise InvalidOptionError("speculative decoding cannot be combined with the sliding window: turn one off")
    if options.uses_token_processing:
        raise InvalidOptionError("speculative decoding does not support presence_penalty, frequency_penalty, "
                                 "logit_bias or logprobs: generate without a draft for these")


def speculation_for(model: Model, draft: Union[Model, Drafter], num_draft_tokens: Union[int, str]) -> Speculation:
    """Speculative decoding with `draft` (a draft `Model` is wrapped in a DraftModel and checked against
    the target)."""
    drafter = DraftModel(draft) if isinstance(draft, Model) else draft
    if isinstance(drafter, DraftModel):
        drafter.check_target(model)
    return Speculation(drafter, num_draft_tokens)


def _verify_round(model: Model, cache: List[KVCache], sequence: List[int], options: GenerationOptions,
                  speculation: Speculation, remaining: int, key: Optional[mx.array],
                  constraint: Optional[ConstraintState] = None) -> Tuple[List[int], int]:
    """One speculative round after `sequence` (the cache holds all of it but the last id): draft, score
    the last id and the drafts in one target pass, keep what the target agrees with and trim the rest.
    Returns (the tokens to emit: accepted drafts, then one target token; how many drafts are among them).
    Never more than `remaining` tokens. With a `constraint`, each position's logits are masked by the
    state after the drafts before it, so a draft the constraint refuses is rejected like one the target
    would not draw; the constraint's state is left as it was (the tokens advance it as they are emitted)."""
    scoring = options.scoring()
    draft_key = None
    if key is not None:
        key, draft_key = mx.random.split(key)
    k = min(speculation.draft_length, remaining - 1)
    drafts, q = speculation.drafter.propose(sequence, k, scoring, draft_key) if k > 0 else ([], None)
    drafts = [int(t) for t in drafts[:k]]
    if q is not None:
        q = q[:len(drafts)]
    hidden = model.hidden(mx.array([sequence[-1:] + drafts]), cache)
    logits = model.logits(hidden[0]).astype(mx.float32)  # [k + 1, V]: after the last id and each draft
    logits = scoring.penalise(logits, [sequence + drafts[:j] for j in range(len(drafts) + 1)])
    if constraint is not None:
        logits = mask_rows(logits, constraint.draft_masks(drafts, logits.shape[-1]))
    if scoring.greedy:
        targets = mx.argmax(logits, axis=-1).tolist()
        accepted = next((j for j, d in enumerate(drafts) if d != targets[j]), len(drafts))
        follow = targets[accepted]
    else:
        accepted, follow = accept_drafts(scoring.probabilities(logits), q, drafts, key)
    for layer_cache in cache:  # the rejected drafts leave the cache; the accepted ones stay
        layer_cache.trim(len(drafts) - accepted)
    speculation.record_round(len(drafts), accepted)
    return drafts[:accepted] + [follow], accepted


def run_alone(model: Model, tokenizer: Optional[Tokenizer], job: Job) -> Iterator[GenerationResponse]:
    """Run `job` on an engine of its own in the calling thread, yielding its responses as they come. Errors
    are raised as they were (a bad option, a failed step). However it ends (done, the caller closing the
    iterator, an error), the job's cache is settled first (`_Row.held`)."""
    engine = Engine(model, tokenizer, max_batch=1, prefill_chunk=job.request.options.prefill_step, queue_size=1)
    engine.submit(job)
    job.delivered = 0
    try:
        while True:
            engine.step()
            while not job.events.empty():
                event = job.events.get_nowait()
                if event is DONE:
                    return
                if isinstance(event, APIError):
                    raise event.__cause__ or OpenELMError(event.message)
                job.delivered += event.token >= 0  # counted before the yield: the consumer may close there
                yield event
    finally:
        job.cancelled.set()
        engine.drop_cancelled()


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
