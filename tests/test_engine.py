"""The generation engine: continuous batching with per-request settings, checked against solo runs.

Every row's output is compared with `generate` for the same prompt and options alone (the one-sequence
decode loop), token for token: greedy and seeded sampling alike.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from helpers import DOCS_TARGET, LLAMA2_TOKENIZER, text_checkpoints
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.cache import RowCaches, make_cache
from openelm_mlx.cli import main
from openelm_mlx.engine import DONE, Engine, Job
from openelm_mlx.errors import InvalidOptionError
from openelm_mlx.openai_api import COMPLETION, APIError, ParsedRequest

# Eight prompts of eight different lengths (tiny tokenizer: 2 to ~40 tokens).
PROMPTS = ["a", "Hello world", "Once upon a time", "The quick brown fox jumps",
           "Python is a programming language.", "def fibonacci(n): return n if n < 2",
           "OpenELM uses layer-wise scaling: every layer has its own number of heads.",
           "Numbers like 12345 and 2048 are split into digits. Hello world! Once upon a time there was"]
SAMPLING = dict(temperature=1.0, top_p=0.95)
SMALL_CONTEXT = 32
EOS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, spm_model):
    """The same tiny float32 weights with the default context (2048) and a 32-token one."""
    return text_checkpoints(tmp_path_factory.mktemp("engine"), spm_model, SMALL_CONTEXT)


@pytest.fixture(scope="module")
def lm(checkpoints, spm_model):
    return om.load(checkpoints[0], dtype="float32", tokenizer=spm_model)


def ids_of(tok, prompt):
    return tok.encode(prompt)


def job(ids, options):
    """A job as the server makes it for a completion request (continues_text from the prompt)."""
    return Job(ParsedRequest(COMPLETION, list(ids), options, stream=True, include_usage=False))


def events(j):
    """All events of a finished job, DONE excluded."""
    out = []
    while (event := j.events.get_nowait()) is not DONE:
        out.append(event)
    return out


def tokens_of(j):
    return [e.token for e in events(j) if e.token >= 0]


def solo(model, tok, ids, options):
    """The same request alone through the one-sequence decode loop (what `generate` runs)."""
    return list(om.stream_generate(model, tok, ids, options, continues_text=tok.decode(ids) != ""))


def run_all(engine, jobs):
    for j in jobs:
        engine.submit(j)
    engine.run_until_idle()


# ---------------------------------------------------------------------------- logits


def test_batched_step_logits_equal_solo_logits_bit_for_bit(lm):
    """One step over rows of different lengths gives each row exactly the logits of its solo step."""
    model, tok = lm
    prompts = [ids_of(tok, p) for p in PROMPTS[:5]]
    caches = []
    for ids in prompts:
        cache = make_cache(len(model.layers))
        model(mx.array([ids[:-1]]), cache)
        caches.append(cache)
    solo_logits = [model(mx.array([[ids[-1]]]), cache)[0, -1] for ids, cache in zip(prompts, caches)]
    for cache in caches:  # forget the last token again, then step them all at once
        for layer_cache in cache:
            layer_cache.trim(1)
    layers = [RowCaches([cache[i] for cache in caches]) for i in range(len(model.layers))]
    batched = model(mx.array([[ids[-1]] for ids in prompts]), layers)[:, -1]
    for b, expected in enumerate(solo_logits):
        assert mx.array_equal(batched[b], expected).item(), b
    assert [cache[0].offset for cache in caches] == [len(ids) for ids in prompts]


def test_row_caches_step_one_token_only(lm):
    model, tok = lm
    caches = [make_cache(len(model.layers)) for _ in range(2)]
    layers = [RowCaches([cache[i] for cache in caches]) for i in range(len(model.layers))]
    with pytest.raises(ValueError, match="one token"):
        model(mx.array([[5, 6], [7, 8]]), layers)


def test_packed_prefill_equals_solo_prefills_bit_for_bit(lm):
    """Several rows' chunks packed into one pass (over caches that already hold different prefixes, one of
    them empty) give each row the hidden states and the cache of its own prefill."""
    model, tok = lm
    prompts = [ids_of(tok, p) for p in PROMPTS[2:6]]
    held = [len(ids) // 2 for ids in prompts[:-1]] + [0]
    solo_hidden, solo_caches, caches = [], [], []
    for ids, n in zip(prompts, held):
        mine, theirs = make_cache(len(model.layers)), make_cache(len(model.layers))
        if n:
            model(mx.array([ids[:n]]), mine)
            model(mx.array([ids[:n]]), theirs)
        solo_hidden.append(model.hidden(mx.array([ids[n:]]), theirs)[0])
        solo_caches.append(theirs)
        caches.append(mine)
    lengths = [len(ids) - n for ids, n in zip(prompts, held)]
    packed = sum((ids[n:] for ids, n in zip(prompts, held)), [])
    layers = [RowCaches([cache[i] for cache in caches], lengths) for i in range(len(model.layers))]
    hidden = model.hidden(mx.array([packed]), layers)[0]
    start = 0
    for b, length in enumerate(lengths):
        assert mx.array_equal(hidden[start:start + length], solo_hidden[b]).item(), b
        start += length
        for mine, theirs in zip(caches[b], solo_caches[b]):
            assert (mine.offset, mine.size) == (theirs.offset, theirs.size)
            assert all(mx.array_equal(x, y).item() for x, y in zip(mine.state, theirs.state))


def test_prompts_arriving_together_are_prefilled_in_one_pass(lm, monkeypatch):
    """With room in the round's prefill budget, waiting prompts share one pass; each still gets its solo
    tokens (greedy and seeded), and a prompt longer than the budget goes on in the next rounds."""
    model, tok = lm
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=5, seed=i, **(SAMPLING if i % 2 else {})))
                for i, p in enumerate(PROMPTS[:6])]
    passes = []
    real_hidden = type(model).hidden

    def counting_hidden(self, ids, cache=None, last=None):
        passes.append(ids.shape)
        return real_hidden(self, ids, cache, last)

    monkeypatch.setattr(type(model), "hidden", counting_hidden)
    budget = sum(len(ids) for ids, _ in requests) - 3  # the last prompt's last 3 tokens wait a round
    engine = Engine(model, tok, max_batch=8, prefill_chunk=budget)
    jobs = [job(*r) for r in requests]
    run_all(engine, jobs)
    assert passes[0] == (1, budget)  # every prompt (but 3 tokens) in the first pass
    assert passes[1] == (5, 1)  # the first five rows' first step; the sixth is still prefilling
    monkeypatch.setattr(type(model), "hidden", real_hidden)
    for j, (ids, options) in zip(jobs, requests):
        assert tokens_of(j) == [r.token for r in solo(model, tok, ids, options)]


# ---------------------------------------------------------------------------- greedy and seeded rows


@pytest.mark.parametrize("max_batch", [1, 2, 5, 8])
def test_greedy_rows_equal_solo_runs(lm, max_batch):
    """Eight requests of different prompt lengths and max_tokens: each gets exactly its solo tokens and text."""
    model, tok = lm
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=3 + 2 * i)) for i, p in enumerate(PROMPTS)]
    engine = Engine(model, tok, max_batch=max_batch, prefill_chunk=16)
    jobs = [job(ids, options) for ids, options in requests]
    run_all(engine, jobs)
    for (ids, options), j in zip(requests, jobs):
        got, want = events(j), solo(model, tok, ids, options)
        assert [e.token for e in got] == [r.token for r in want]
        assert "".join(e.text for e in got) == "".join(r.text for r in want)
        assert got[-1].finish_reason == "length" and got[-1].generation_tokens == options.max_tokens
    assert [r.finish_reason for r in engine.records] == ["length"] * len(PROMPTS)


def test_seeded_rows_equal_solo_runs_whatever_the_batch(lm):
    """Seeded sampling with per-request settings: alone, in a batch of 8 with other seeded and unseeded
    requests, with another prefill chunk, a row draws the same tokens as `generate` alone."""
    model, tok = lm
    settings = [dict(seed=11, **SAMPLING), dict(seed=12, temperature=0.7, top_k=20),
                dict(seed=13, temperature=1.2, min_p=0.05, repetition_penalty=1.3),
                dict(temperature=1.0)]  # unseeded: its draws use the global state and must not disturb others
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=12, **settings[i % 4])) for i, p in enumerate(PROMPTS)]
    seeded = [i for i, (_, options) in enumerate(requests) if options.seed is not None]
    wanted = {i: [r.token for r in solo(model, tok, *requests[i])] for i in seeded}
    assert len({tuple(t) for t in wanted.values()}) == len(seeded)  # the seeds give different samples
    for max_batch, chunk in [(1, 64), (8, 64), (8, 3), (3, 5)]:
        engine = Engine(model, tok, max_batch=max_batch, prefill_chunk=chunk)
        jobs = [job(ids, options) for ids, options in requests]
        run_all(engine, jobs)
        for i in seeded:
            assert tokens_of(jobs[i]) == wanted[i], (max_batch, chunk, i)


def test_seeded_row_is_the_same_with_a_cached_prefix(lm):
    """The second turn of a conversation hits the prompt cache (only the rest is prefilled) and still
    samples exactly what it samples from scratch."""
    model, tok = lm
    first = ids_of(tok, PROMPTS[6])
    options = GenerationOptions(max_tokens=10, seed=5, **SAMPLING)
    engine = Engine(model, tok, max_batch=4)
    warm = job(first, GenerationOptions(max_tokens=6))
    run_all(engine, [warm])
    follow = first + tokens_of(warm)[:-1] + ids_of(tok, " Hello")[1:]
    turn = job(follow, options)
    others = [job(ids_of(tok, p), GenerationOptions(max_tokens=8, seed=i, **SAMPLING)) for i, p in enumerate(PROMPTS[:3])]
    run_all(engine, [turn] + others)
    assert turn.reuse.cached_tokens == len(first) + 5  # the warm-up's prompt and all its tokens but the last
    assert turn.reuse.prefilled_tokens == len(follow) - turn.reuse.cached_tokens
    assert tokens_of(turn) == [r.token for r in solo(model, tok, follow, options)]


def test_batch_generate_equals_generate(lm):
    """batch_generate runs the engine: more prompts than max_batch, sampled with a seed, equal solo runs."""
    model, tok = lm
    options = GenerationOptions(max_tokens=9, seed=3, **SAMPLING)
    rows = om.batch_generate(model, tok, PROMPTS, options, max_batch=3)
    for prompt, row in zip(PROMPTS, rows):
        want = om.generate(model, tok, prompt, options)
        assert (row.tokens, row.text, row.finish_reason) == (want.tokens, want.text, want.finish_reason)
        assert row.stats.prompt_tokens == len(tok.encode(prompt))


# ---------------------------------------------------------------------------- joining, leaving, limits


def test_requests_join_and_leave_mid_batch(lm):
    """A request submitted while another decodes joins its batch; both get their solo tokens."""
    model, tok = lm
    long_req = (ids_of(tok, PROMPTS[2]), GenerationOptions(max_tokens=30))
    late_req = (ids_of(tok, PROMPTS[7]), GenerationOptions(max_tokens=6))
    engine = Engine(model, tok, max_batch=4, prefill_chunk=4)
    first, late = job(*long_req), job(*late_req)
    engine.submit(first)
    for _ in range(6):  # 4 prefill chunks, then tokens (each emitted the round after it is drawn)
        engine.step()
    assert first.events.qsize() >= 3 and engine.active == 1  # decoding alone
    engine.submit(late)
    sizes = []
    while engine.active or not engine.jobs.empty():
        engine.step()
        sizes.append(engine.active)
    assert 2 in sizes and sizes[-1] == 0
    assert engine.records[0].generated_tokens == 6  # the late one left first
    assert tokens_of(first) == [r.token for r in solo(model, tok, *long_req)]
    assert tokens_of(late) == [r.token for r in solo(model, tok, *late_req)]


def test_cancelling_one_request_leaves_the_others_unchanged(lm):
    model, tok = lm
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=14, seed=i, **SAMPLING)) for i, p in enumerate(PROMPTS[:4])]
    engine = Engine(model, tok, max_batch=4)
    jobs = [job(*r) for r in requests]
    for j in jobs:
        engine.submit(j)
    for _ in range(8):
        engine.step()
    jobs[1].cancelled.set()
    engine.run_until_idle()
    cancelled = events(jobs[1])
    assert 0 < len(cancelled) < 14 and cancelled[-1].finish_reason is None
    assert [r.finish_reason for r in engine.records][0] == "cancelled"
    for i in (0, 2, 3):
        assert tokens_of(jobs[i]) == [r.token for r in solo(model, tok, *requests[i])]


def test_max_batch_is_respected_and_a_full_queue_gets_503(lm):
    model, tok = lm
    engine = Engine(model, tok, max_batch=2, queue_size=2)
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=4 + i)) for i, p in enumerate(PROMPTS[:4])]
    jobs = [job(*r) for r in requests]
    for j in jobs[:2]:
        engine.submit(j)
    engine.step()  # both admitted: the queue is empty again
    for j in jobs[2:]:
        engine.submit(j)
    with pytest.raises(APIError) as refused:
        engine.submit(job(*requests[0]))
    assert refused.value.status == 503 and "busy" in refused.value.message
    sizes = []
    while engine.active or not engine.jobs.empty():
        engine.step()
        sizes.append(engine.active)
    assert max(sizes) == 2
    for r, j in zip(requests, jobs):
        assert tokens_of(j) == [x.token for x in solo(model, tok, *r)]


def test_stop_strings_and_max_tokens_per_request(lm):
    """Each request ends on its own stop string, max_tokens or max_tokens 0, exactly as alone."""
    model, tok = lm
    base = [(ids_of(tok, p), 12) for p in PROMPTS[:4]]
    texts = ["".join(r.text for r in solo(model, tok, ids, GenerationOptions(max_tokens=n))) for ids, n in base]
    requests = [(base[0][0], GenerationOptions(max_tokens=12, stop=[texts[0][4:6]])),
                (base[1][0], GenerationOptions(max_tokens=12, stop=[texts[1][7:9], "never there"])),
                (base[2][0], GenerationOptions(max_tokens=0)),
                (base[3][0], GenerationOptions(max_tokens=12))]
    engine = Engine(model, tok, max_batch=4)
    jobs = [job(*r) for r in requests]
    run_all(engine, jobs)
    for r, j in zip(requests, jobs):
        got, want = events(j), solo(model, tok, *r)
        assert [(e.text, e.token, e.finish_reason) for e in got] == [(w.text, w.token, w.finish_reason) for w in want]
    assert sorted(r.finish_reason for r in engine.records) == ["length", "length", "stop", "stop"]


def test_eos_ends_only_its_own_row(checkpoints, spm_model, lm):
    """A model that emits EOS a few tokens into one prompt: that row stops there, the others go on."""
    plain, tok = lm
    model, _ = om.load(checkpoints[0], dtype="float32", tokenizer=spm_model)
    ids, greedy, j = next((ids, g, j) for ids in (ids_of(tok, p) for p in PROMPTS)
                          for g in [[r.token for r in solo(plain, tok, ids, GenerationOptions(max_tokens=12))]]
                          for j in range(3, 12) if g[j] not in g[:j])
    weight = model.lm_head.weight  # EOS's row becomes just above the row of the token emitted at step j
    model.lm_head.weight = mx.concatenate([weight[:EOS], 1.001 * weight[greedy[j]][None], weight[EOS + 1:]])
    requests = [(ids, GenerationOptions(max_tokens=20)), (ids_of(tok, PROMPTS[7]), GenerationOptions(max_tokens=20))]
    engine = Engine(model, tok, max_batch=2)
    jobs = [job(*r) for r in requests]
    run_all(engine, jobs)
    first = events(jobs[0])
    assert first[-1].token == EOS and first[-1].finish_reason == "stop" and len(first) == j + 1
    for r, got in zip(requests, [first, events(jobs[1])]):
        assert [e.token for e in got] == [w.token for w in solo(model, tok, *r)]


def test_sliding_window_rows_equal_solo_runs(checkpoints, spm_model):
    """Each row has its own cache, so the sliding window drops positions per row exactly as alone."""
    model, tok = om.load(checkpoints[1], dtype="float32", tokenizer=spm_model)
    options = GenerationOptions(max_tokens=2 * SMALL_CONTEXT, sliding_window=True, prefill_step=8)
    prompts = [ids_of(tok, p) for p in PROMPTS[1:4]]
    rows = om.batch_generate(model, tok, prompts, options, prefill_chunk=5)
    for ids, row in zip(prompts, rows):
        assert len(row.tokens) == 2 * SMALL_CONTEXT  # well past the context
        assert row.tokens == om.generate(model, tok, ids, options).tokens


# ---------------------------------------------------------------------------- refusals and the server thread


def test_speculative_decoding_refuses_a_batch(lm):
    model, tok = lm
    with pytest.raises(InvalidOptionError, match="one sequence at a time"):
        Engine(model, tok, max_batch=2, draft=om.PromptLookup())
    with pytest.raises(InvalidOptionError, match="max_batch"):
        Engine(model, tok, max_batch=0)


@pytest.mark.parametrize("flags, message", [
    (["--prompt-lookup", "--max-batch", "4"], "cannot batch"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
])
def test_serve_refuses_bad_batch_flags_before_loading(flags, message, capsys):
    assert main(["serve", "--model", "/nonexistent/model", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_engine_thread_serves_concurrent_submissions_until_stop(lm):
    """The server's shape: run() in its own thread, jobs submitted from others, stop() ends it."""
    model, tok = lm
    engine = Engine(model, tok, max_batch=8)
    thread = threading.Thread(target=engine.run)
    thread.start()
    requests = [(ids_of(tok, p), GenerationOptions(max_tokens=8, seed=i, **SAMPLING)) for i, p in enumerate(PROMPTS)]
    jobs = [job(*r) for r in requests]
    submitters = [threading.Thread(target=engine.submit, args=(j,)) for j in jobs]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join()
    results = []
    for j in jobs:
        got = []
        while (event := j.events.get(timeout=60)) is not DONE:
            got.append(event.token)
        results.append(got)
    engine.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
    for r, got in zip(requests, results):
        assert got == [x.token for x in solo(model, tok, *r)]


@pytest.mark.slow
@pytest.mark.skipif(not DOCS_TARGET.exists(), reason="needs /work/shared/data/openelm-docs-target")
def test_bfloat16_greedy_rows_equal_solo_on_docs_target():
    """The trained docs-target in bfloat16: eight greedy requests in one batch give their solo tokens."""
    model, tok = om.load(DOCS_TARGET, dtype="bfloat16", tokenizer=LLAMA2_TOKENIZER)
    prompts = ["The server", "To install the package, run", "MLX is", "Speculative decoding",
               "A KV cache", "def main():", "The sliding window", "OpenELM models"]
    options = GenerationOptions(max_tokens=24)
    rows = om.batch_generate(model, tok, prompts, options, max_batch=8)
    for prompt, row in zip(prompts, rows):
        assert row.tokens == om.generate(model, tok, prompt, options).tokens, prompt
