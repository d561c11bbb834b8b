"""Scoring and perplexity: continuation log-likelihoods against a direct float32 forward and the float64
PyTorch reference, batching and prefix sharing, the sliding windows at their edges, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from helpers import random_state_dict, tiny_config, write_hf_checkpoint
from reference import reference_logits
from scoring_helpers import direct_log_prob
from test_cli import run_main
import openelm_mlx as om
from openelm_mlx.errors import ContextLengthError, InvalidOptionError
from openelm_mlx.perplexity import perplexity, sliding_windows
from openelm_mlx.scoring import log_probs, score_continuations

CONTEXT = 48  # the tiny model's context, so windows and limits are cheap to reach
TEXT = ("OpenELM uses layer-wise scaling: every layer has its own number of heads. "
        "The quick brown fox jumps over the lazy dog. Numbers like 12345 and 2048 are split into digits.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spm_model):
    config = tiny_config(max_context_length=CONTEXT)
    state = random_state_dict(config, seed=3)
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("ppl") / "tiny", config, state, tokenizer=spm_model)
    return directory, config, state


@pytest.fixture(scope="module")
def lm(checkpoint):
    return om.load(checkpoint[0], dtype="float32")




def reference_nll(config, state, ids):
    """Summed NLL of ids[1:] from the float64 PyTorch reference forward (one pass, no windows)."""
    logits = reference_logits(config, state, [ids])[0]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(sum(lse[t] - logits[t, ids[t + 1]] for t in range(len(ids) - 1)))


def requests_with_shared_contexts(tokenizer):
    """Multiple-choice shaped requests: two contexts with three continuations each, plus singletons."""
    contexts = [tokenizer.encode("The quick brown fox"), tokenizer.encode("Python is a programming")]
    choices = [" jumps over", " language.", " dog 12345 and more words"]
    requests = [(c, tokenizer.encode(x, add_bos=False)) for c in contexts for x in choices]
    requests.append((tokenizer.encode("Hello"), tokenizer.encode(" world!", add_bos=False)))
    requests.append(([tokenizer.bos_id], tokenizer.encode("Once upon a time", add_bos=False)))
    return requests


def test_scores_equal_a_direct_float32_computation(lm):
    model, tokenizer = lm
    requests = requests_with_shared_contexts(tokenizer)
    scores = score_continuations(model, requests, batch_size=4)
    for (context, continuation), score in zip(requests, scores):
        assert score.tokens == len(continuation)
        assert abs(score.log_prob - direct_log_prob(model, context, continuation)) < 1e-4
        assert score.log_prob < 0


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
@pytest.mark.parametrize("share_prefixes", [True, False])
def test_batching_and_prefix_sharing_do_not_change_scores(lm, batch_size, share_prefixes):
    model, tokenizer = lm
    requests = requests_with_shared_contexts(tokenizer)
    solo = [score_continuations(model, [r], share_prefixes=False)[0] for r in requests]
    batched = score_continuations(model, requests, batch_size=batch_size, share_prefixes=share_prefixes)
    for a, b in zip(solo, batched):
        assert abs(a.log_prob - b.log_prob) < 1e-4
        assert a.greedy == b.greedy


def test_greedy_flag_is_true_exactly_for_the_argmax_continuation(lm):
    model, tokenizer = lm
    context = tokenizer.encode("The quick brown")
    argmax = []
    for _ in range(3):  # greedy continuation of three tokens, by plain forwards
        argmax.append(int(np.argmax(np.array(log_probs(model, context + argmax))[-1])))
    other = [(argmax[0] + 1) % tokenizer.vocab_size] + argmax[1:]
    greedy, not_greedy = score_continuations(model, [(context, argmax), (context, other)])
    assert greedy.greedy and not not_greedy.greedy


def test_bad_requests_are_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="non-empty context"):
        score_continuations(model, [([], [5, 6])])
    with pytest.raises(ValueError, match="non-empty context"):
        score_continuations(model, [([1, 5], [])])
    with pytest.raises(ContextLengthError, match="48-token context"):
        score_continuations(model, [([1] * 40, [5] * 10)])


def test_exactly_the_model_context_fits(lm):
    model, _ = lm
    ids = [1] + [7 + (i * 13) % 200 for i in range(CONTEXT)]  # 49 ids: 48 positions of input
    (score,) = score_continuations(model, [(ids[:10], ids[10:])])
    assert abs(score.log_prob - direct_log_prob(model, ids[:10], ids[10:])) < 1e-4


# ---------------------------------------------------------------------------- windows


def covered(windows):
    """Each scored position, in order (must be 1 .. N-1 exactly once)."""
    return [t for _, first, end in windows for t in range(first, end)]


@pytest.mark.parametrize("num_ids,context,stride,expected", [
    (10, 16, 8, [(0, 1, 10)]),  # text shorter than the context: one window scores everything
    (16, 16, 8, [(0, 1, 16)]),  # exactly one window
    (17, 16, 8, [(0, 1, 16), (8, 16, 17)]),  # one token more: a second window scoring one token
    (30, 16, 8, [(0, 1, 16), (8, 16, 24), (16, 24, 30)]),  # ragged last window
    (20, 16, 15, [(0, 1, 16), (15, 16, 20)]),  # the largest stride: one token of context
    (5, 4, 1, [(0, 1, 4), (1, 4, 5)]),
])
def test_sliding_windows_at_the_edges(num_ids, context, stride, expected):
    windows = sliding_windows(num_ids, context, stride)
    assert windows == expected
    assert covered(windows) == list(range(1, num_ids))
    assert all(end - begin <= context and begin < first for begin, first, end in windows)


@pytest.mark.parametrize("num_ids,context,stride,needle", [
    (1, 16, 8, "no tokens"), (10, 16, 16, "--stride"), (10, 16, 0, "--stride"), (10, 1, 1, "--context"),
])
def test_bad_windows_are_refused(num_ids, context, stride, needle):
    with pytest.raises(InvalidOptionError, match=needle):
        sliding_windows(num_ids, context, stride)


def test_single_window_perplexity_equals_the_float64_reference(lm, checkpoint):
    model, tokenizer = lm
    _, config, state = checkpoint
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert len(ids) < CONTEXT
    result = perplexity(model, ids)
    nll = reference_nll(config, state, ids)
    assert result.windows == 1 and result.tokens == len(ids) - 1
    assert abs(result.mean_nll - nll / (len(ids) - 1)) < 1e-5
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(48, 24), (16, 5), (16, 15), (9, 4)])
def test_strided_perplexity_equals_direct_window_sums(lm, checkpoint, context, stride):
    model, tokenizer = lm
    _, config, state = checkpoint
    ids = tokenizer.encode(TEXT)
    assert len(ids) > 2 * context  # several windows, ragged at the end
    windows = sliding_windows(len(ids), context, stride)
    # Independent: each window's tokens scored by the float64 reference forward over the window alone.
    total = 0.0
    for begin, first, end in windows:
        logits = reference_logits(config, state, [ids[begin:end]])[0]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += sum(lse[t - 1 - begin] - logits[t - 1 - begin, ids[t]] for t in range(first, end))
    for batch_size in (1, 3):
        result = perplexity(model, ids, context=context, stride=stride, batch_size=batch_size)
        assert (result.tokens, result.windows) == (len(ids) - 1, len(windows))
        assert abs(result.mean_nll - total / (len(ids) - 1)) < 1e-5
        assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_context_above_the_model_is_refused(lm):
    model, tokenizer = lm
    with pytest.raises(InvalidOptionError, match="exceeds the model's 48-token context"):
        perplexity(model, tokenizer.encode(TEXT), context=CONTEXT + 1)


# ---------------------------------------------------------------------------- the command




def test_command_prints_perplexity_nll_and_tokens(capsys, tmp_path, lm, checkpoint):
    model, tokenizer = lm
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    base = ["perplexity", "--model", str(checkpoint[0]), "--dtype", "float32", "--text", str(text_file),
            "--context", "16", "--stride", "8", "--batch-size", "2"]
    code, out, err = run_main(capsys, base + ["--json"])
    assert code == 0, err
    got = json.loads(out)
    expected = perplexity(model, tokenizer.encode(TEXT), context=16, stride=8)
    assert got["tokens"] == expected.tokens == len(tokenizer.encode(TEXT)) - 1
    assert got["mean_nll"] == pytest.approx(expected.mean_nll, abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["mean_nll"]))
    assert (got["context"], got["stride"], got["windows"]) == (16, 8, expected.windows)
    code, out, _ = run_main(capsys, base)
    assert code == 0
    assert f"perplexity {expected.perplexity:.4f}" in out and f"{expected.tokens:,} tokens" in out


@pytest.mark.parametrize("extra,needle", [
    (["--stride", "16", "--context", "16"], "--stride"),
    (["--context", "4096"], "4096 exceeds"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_command_bad_options_are_one_line_errors(capsys, tmp_path, checkpoint, extra, needle):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    code, out, err = run_main(capsys, ["perplexity", "--model", str(checkpoint[0]), "--text", str(text_file), *extra])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openelm-mlx perplexity: error: ") and needle in err, err


def test_command_missing_text_file(capsys, tmp_path, checkpoint):
    code, _, err = run_main(capsys, ["perplexity", "--model", str(checkpoint[0]), "--text", str(tmp_path / "nope.txt")])
    assert code == 2 and "cannot read the text" in err and len(err.strip().splitlines()) == 1


def test_convert_report_perplexity_uses_the_same_scoring(lm):
    """The converter's report computes perplexity over the whole text with BOS: the same number as a
    single-window `perplexity`."""
    from openelm_mlx.convert.report import compare

    model, tokenizer = lm
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    lp = log_probs(model, ids)
    quality = compare(lp, lp, ids, "text")
    assert quality.perplexity_unquantized == pytest.approx(perplexity(model, ids).perplexity, rel=1e-5)
    assert quality.mean_kl == pytest.approx(0.0, abs=1e-6) and quality.top1_agreement == 1.0
