"""One sequence at a time: `stream_generate`, `generate` and `decode_tokens`, each a job on an engine of its own
(`engine.run_alone`), so they decode exactly as the server and `batch_generate` do."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .cache import KVCache
from .drafting import Drafter, Speculation
from .engine import run_alone, speculation_for
from .errors import InvalidOptionError
from .generation import (GenerationOptions, GenerationResponse, GenerationResult, Prompt, cache_window, new_cache,
                         quantized_as_asked)
from .jobs import Job
from .model import Model
from .openai_api import COMPLETION, ParsedRequest
from .tokenizer import Tokenizer


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: Prompt,
                    options: Optional[GenerationOptions] = None, *,
                    cache: Optional[List[KVCache]] = None, context_ids: Sequence[int] = (),
                    continues_text: bool = False,
                    draft: Optional[Union[Model, Drafter]] = None) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS, or token ids), one response per token.

    Text segments concatenate to the decoded completion without stop strings or EOS; with
    `continues_text` the completion's first word keeps its space (it continues the text before). Pass a
    `cache` from an earlier call to continue from it (only `prompt` is prefilled), and the ids it holds
    as `context_ids` (the last repetition_context_size suffice) so the repetition penalty sees them too.
    However generation ends (EOS, stop string, length, a full context, the caller closing or dropping
    the iterator, an exception), the cache then holds the prompt and every generated token but the
    last: a follow-up prompt starts with that last token. With max_tokens 0 it holds the prompt.

    `draft` turns on speculative decoding: a draft `Model` (same vocabulary), a `DraftModel` (keeps its
    cache between calls), `PromptLookup()` or any `Drafter`. Greedy output is unchanged token for token
    and sampling keeps the target's distribution; each response says whether its token was an accepted
    draft (`from_draft`) and carries the running drafted / accepted counts. A draft model drafts from
    `context_ids` + prompt + generated, so pass all the ids the cache holds.

    With `options.constraint` the text matches it: generation ends ("stop") once the constraint is
    finished, or with EOS, which it allows only when the text is complete; "length" means it was cut short.
    """
    options = options or GenerationOptions()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    speculation = None if draft is None else speculation_for(model, draft, options.num_draft_tokens)
    mx.reset_peak_memory()
    yield from run_alone(model, tokenizer, _job(model, ids, options, cache, context_ids, speculation,
                                                continues_text=continues_text))


def generate(model: Model, tokenizer: Tokenizer, prompt: Prompt,
             options: Optional[GenerationOptions] = None, *,
             cache: Optional[List[KVCache]] = None, context_ids: Sequence[int] = (),
             draft: Optional[Union[Model, Drafter]] = None) -> GenerationResult:
    """Generate a whole completion; see `stream_generate`."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, prompt, options, cache=cache, context_ids=context_ids,
                                draft=draft):
        text.append(last.text)
        if last.token >= 0:
            tokens.append(last.token)
    return GenerationResult("".join(text), tokens, last.finish_reason, last)


def decode_tokens(model: Model, ids: Union[Sequence[int], mx.array], cache: List[KVCache],
                  options: GenerationOptions, limit: int, *, history: Sequence[int] = (),
                  speculation: Optional[Speculation] = None) -> Iterator[int]:
    """Token ids only, no tokenizer: prefill `ids` (one sequence) on `cache`, then yield exactly `limit`
    tokens (fewer only when the context is full): EOS does not end it (what a benchmark times). `history`:
    ids the cache already holds (the repetition penalty and a drafter see them). With `speculation`,
    its counters are kept as the rounds go. The cache ends as `stream_generate` leaves it."""
    if isinstance(ids, mx.array):
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise InvalidOptionError("decode_tokens runs one sequence at a time ([1, T] ids): batch_generate "
                                     "batches")
        ids = ids[0].tolist()
    options = replace(options, max_tokens=limit)
    job = _job(model, [int(t) for t in ids], options, cache, history, speculation, continues_text=False)
    for response in run_alone(model, None, job):
        if response.token >= 0:
            yield response.token


def _job(model: Model, ids: List[int], options: GenerationOptions, cache: Optional[List[KVCache]],
         context_ids: Sequence[int], speculation: Optional[Speculation], *, continues_text: bool) -> Job:
    """A job for one sequence on the caller's cache (a new one for `options` when None)."""
    if not ids:
        raise InvalidOptionError("the prompt is empty: give at least one token")
    cache_window(model, options)  # checks prefill_step against the window, also for a given cache
    if cache is None:
        cache = new_cache(model, options)
    elif not quantized_as_asked(cache, options):
        held = (f"{cache[0].kv_bits}-bit (group size {cache[0].kv_group_size})" if cache[0].kv_bits
                else "unquantized")
        raise InvalidOptionError(f"the cache holds {held} keys and values but kv_bits is {options.kv_bits} "
                                 f"(group size {options.kv_group_size}): pass a cache built for these options")
    # The penalty needs only the last ids; a drafter looks at all of them.
    recent = list(context_ids) if speculation is not None else list(context_ids)[-options.repetition_context_size:]
    request = ParsedRequest(COMPLETION, ids, options, stream=True, include_usage=False,
                            speculative=speculation is not None)
    return Job(request, continues_text=continues_text, cache=cache, context_ids=[int(t) for t in recent],
               speculation=speculation)
