"""The quantized KV cache: logits near the full-precision cache's (bounds measured on this tiny model,
see KV_LOGIT_BOUND), with and without the sliding window, in batches, saved and restored, and the
option checks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import text_only_state, tiny_config, write_hf_checkpoint
import openelm_mlx as om
from openelm_mlx import GenerationOptions
from openelm_mlx.cache import KVCache, QuantizedKVCache, make_cache
from openelm_mlx.bench import kv_quant as kv_quant_bench
from openelm_mlx.cli import main
from openelm_mlx.drafting import PromptLookup
from openelm_mlx.engine import batch_generate
from openelm_mlx.errors import InvalidOptionError
from openelm_mlx.generation import new_cache

# Max |logit difference| against the full-precision cache over a teacher-forced run of random ids
# through the tiny random model below (float32, logits up to about +-12). Measured 2026-12-01 with group
# size 32, ids seed 0 (seeds 1-2 in brackets): 8 bits 0.092, with the window 0.095 (up to 0.19); 4 bits
# 1.84, with the window 1.92 (up to 2.8). Trained models fare far better (docs/generate.md).
KV_LOGIT_BOUND = {8: 0.3, 4: 4.0}
HEAD_DIM = 32  # mx.quantize needs groups of 32, 64 or 128 elements


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spm_model):
    config = tiny_config(tied=False, head_dim=HEAD_DIM, max_context_length=32)
    return write_hf_checkpoint(tmp_path_factory.mktemp("kv_quant") / "m", config, text_only_state(config, spm_model),
                               tokenizer=spm_model)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return om.load(checkpoint, dtype="float32")


def teacher_forced_logits(model, ids, cache, chunk=8):
    """Logits [T, V] for every position of `ids`, fed `chunk` tokens at a time through `cache`."""
    out = [model(mx.array([ids[i:i + chunk]]), cache=cache)[0] for i in range(0, len(ids), chunk)]
    return mx.concatenate(out, axis=0)


def ids_for(n, vocab, seed=0):
    return [1] + np.random.default_rng(seed).integers(3, vocab, size=n - 1).tolist()


class FakeQuantizedCache(KVCache):
    """The reference: a full-precision cache of keys and values that went through quantize/dequantize."""

    def __init__(self, bits, **kwargs):
        super().__init__(**kwargs)
        self.bits = bits

    def update_and_fetch(self, keys, values):
        round_trip = lambda x: mx.dequantize(*mx.quantize(x, group_size=32, bits=self.bits), group_size=32,  # noqa: E731
                                             bits=self.bits)
        return super().update_and_fetch(round_trip(keys), round_trip(values))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("window", [None, 32])
def test_the_quantized_cache_equals_quantized_keys_in_a_plain_cache(lm, bits, window):
    """Packing, growing and the window's shifts lose nothing beyond the quantization itself."""
    model, tok = lm
    ids = ids_for(48 if window else 30, tok.vocab_size)
    reference = [FakeQuantizedCache(bits, max_size=window) for _ in model.layers]
    quant = make_cache(len(model.layers), max_size=window, kv_bits=bits, kv_group_size=32)
    assert mx.abs(teacher_forced_logits(model, ids, reference) - teacher_forced_logits(model, ids, quant)).max() < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("window", [None, 32])
def test_logits_stay_within_the_measured_bound(lm, bits, window):
    model, tok = lm
    ids = ids_for(48 if window else 30, tok.vocab_size)  # past the 32-token context with the window
    layers = len(model.layers)
    full = teacher_forced_logits(model, ids, make_cache(layers, max_size=window))
    quant_cache = make_cache(layers, max_size=window, kv_bits=bits, kv_group_size=32)
    quant = teacher_forced_logits(model, ids, quant_cache)
    diff = mx.abs(full - quant).max().item()
    assert 0 < diff < KV_LOGIT_BOUND[bits]  # 0 would mean nothing was quantized
    if window:
        assert quant_cache[0].size < quant_cache[0].offset == len(ids)  # the window did drop positions


def test_eight_bits_agree_with_greedy_decoding(lm):
    model, tok = lm
    prompt = tok.encode("Once upon a time there was a model")
    plain = om.generate(model, tok, prompt, GenerationOptions(max_tokens=12)).tokens
    quant = om.generate(model, tok, prompt, GenerationOptions(max_tokens=12, kv_bits=8, kv_group_size=32)).tokens
    assert quant == plain


def test_generation_past_the_context_with_the_sliding_window(lm):
    """mlx-lm refuses kv-bits with a rotating cache; here they combine."""
    model, tok = lm
    options = GenerationOptions(max_tokens=60, kv_bits=4, kv_group_size=32, sliding_window=True, prefill_step=8)
    result = om.generate(model, tok, "Hello world", options)
    assert len(result.tokens) == 60 and result.finish_reason == "length"


def test_a_batch_row_equals_its_solo_run(lm):
    model, tok = lm
    options = GenerationOptions(max_tokens=8, kv_bits=8, kv_group_size=32)
    prompts = ["Hello world", "Once upon a time there was"]
    batch = batch_generate(model, tok, prompts, options)
    assert [r.tokens for r in batch] == [om.generate(model, tok, p, options).tokens for p in prompts]


def test_the_cache_holds_a_quarter_of_the_bytes_or_less(lm):
    model, _ = lm
    ids = mx.array([ids_for(20, 300)])
    sizes = {}
    for bits in (None, 8, 4):
        cache = make_cache(len(model.layers), kv_bits=bits, kv_group_size=32)
        model(ids, cache=cache)
        sizes[bits] = sum(c.nbytes for c in cache)
    # float32 stores 32 bits per element; 8 bits + a float32 scale and bias per 32 elements: 10 bits.
    assert sizes[8] == sizes[None] * 10 // 32 and sizes[4] == sizes[None] * 6 // 32


def test_state_round_trip_and_trim(lm):
    model, _ = lm
    cache = make_cache(len(model.layers), kv_bits=4, kv_group_size=32)
    model(mx.array([ids_for(10, 300)]), cache=cache)
    restored = [QuantizedKVCache.from_state(c.state, c.meta_state) for c in cache]
    step = mx.array([[5]])
    assert mx.array_equal(model(step, cache=cache), model(step, cache=restored))
    assert all(c.trim(3) == 3 and c.offset == c.size == 8 for c in restored)
    assert restored[0].kv_bits == 4 and restored[0].kv_group_size == 32
    assert KVCache().kv_bits is None and KVCache().kv_group_size is None


@pytest.mark.parametrize("field, value, needle", [
    ("kv_bits", 3, "kv_bits must be one of 4, 8"),
    ("kv_bits", 16, "kv_bits must be one of 4, 8"),
    ("kv_group_size", 48, "kv_group_size must be one of 32, 64, 128"),
])
def test_bad_options_are_refused(field, value, needle):
    with pytest.raises(InvalidOptionError, match=needle):
        GenerationOptions(**{field: value})


def test_a_group_size_that_does_not_divide_head_dim(lm):
    with pytest.raises(InvalidOptionError, match=r"kv_group_size must divide the model's head_dim \(32\)"):
        new_cache(lm[0], GenerationOptions(kv_bits=8, kv_group_size=64))


def test_a_cache_of_another_kind_is_refused(lm):
    model, tok = lm
    with pytest.raises(InvalidOptionError, match="kv_bits is 8"):
        om.generate(model, tok, "Hello", GenerationOptions(kv_bits=8, kv_group_size=32),
                    cache=make_cache(len(model.layers)))


def test_speculative_decoding_on_a_quantized_cache_keeps_greedy_output(lm):
    """Verify passes trim rejected drafts from the quantized cache like from a plain one."""
    model, tok = lm
    options = GenerationOptions(max_tokens=12, kv_bits=4, kv_group_size=32)
    prompt = "Hello world! Hello world"
    plain = om.generate(model, tok, prompt, options)
    speculative = om.generate(model, tok, prompt, options, draft=PromptLookup(2))
    assert speculative.tokens == plain.tokens and speculative.stats.drafted_tokens > 0


def test_the_kv_quant_bench_on_the_tiny_model(lm):
    contexts = kv_quant_bench.contexts(list(range(3, 300)), 40, 2, bos=1)
    assert [len(c) for c in contexts] == [40, 40] and contexts[1][:2] == [1, 3 + 39]
    rows = kv_quant_bench.compare(lm[0], contexts[0], bits=[8, 4], group_size=32, window=32, chunk=8, stride=2)
    assert 0 < rows[8]["kl_mean"] < rows[4]["kl_mean"] and rows[8]["scored_positions"] == 20
    assert 0 <= rows[4]["top1_agreement"] <= rows[8]["top1_agreement"] <= 1
    assert rows[8]["bytes_per_position_quantized"] / rows[8]["bytes_per_position_full"] == 10 / 32


@pytest.mark.parametrize("flags, needle", [
    (["--kv-bits", "8", "--kv-group-size", "64"], "kv_group_size must divide the model's head_dim (32), got 64"),
    (["--kv-bits", "8"], "kv_group_size must divide"),  # the default group size, 64
])
def test_cli_errors_are_one_line(capsys, checkpoint, flags, needle):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "Hello", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openelm-mlx generate: error: ") and needle in lines[0]


def test_cli_generate_with_kv_bits(capsys, checkpoint, lm):
    argv = ["generate", "--model", str(checkpoint), "--dtype", "float32", "--prompt", "Hello world", "--max-tokens",
            "6", "--kv-bits", "4", "--kv-group-size", "32", "--quiet"]
    assert main(argv) == 0
    options = GenerationOptions(max_tokens=6, kv_bits=4, kv_group_size=32)
    assert capsys.readouterr().out == om.generate(lm[0], lm[1], "Hello world", options).text + "\n"
