"""Numerics the spec insists on: RMSNorm reductions in float32, RoPE angles in float32, so 16-bit
activations with OpenELM's large hidden states stay finite and accurate."""

import mlx.core as mx
import numpy as np
import pytest

from openelm_mlx.config import ModelArgs
from openelm_mlx.model import Model

from helpers import tiny_config


@pytest.fixture(scope="module")
def layer():
    return Model(ModelArgs.from_dict(tiny_config())).layers[0]


@pytest.mark.parametrize("dtype,scale", [(mx.float16, 2e3), (mx.bfloat16, 1e5)])
def test_rms_norm_reduces_in_float32(layer, dtype, scale):
    """Squares of these activations overflow float16 (max 65504): a 16-bit reduction gives inf/0."""
    rng = np.random.default_rng(0)
    x = (scale * rng.standard_normal((2, 5, 64))).astype(np.float32)
    norm = layer.attn_norm
    norm.weight = mx.array(1.0 + 0.1 * rng.standard_normal(64), dtype)
    out = np.array(norm(mx.array(x, dtype)).astype(mx.float32))
    x16 = np.array(mx.array(x, dtype).astype(mx.float32), dtype=np.float64)  # the input as the model sees it
    expected = x16 / np.sqrt((x16 ** 2).mean(-1, keepdims=True) + 1e-6) * np.array(norm.weight.astype(mx.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)


def test_rope_at_large_positions_is_accurate_in_bfloat16():
    """Angles p * inv_freq for p near the 2048 context need float32: in bfloat16 they would be off
    by whole radians. The bfloat16 result must be within about one bfloat16 rounding of float32's."""
    x = mx.array(np.random.default_rng(1).standard_normal((1, 2, 8, 64)).astype(np.float32) * 30)
    for offset in (0, 1000, 2040):
        exact = mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=offset)
        half = mx.fast.rope(x.astype(mx.bfloat16), 64, traditional=False, base=10000.0, scale=1.0, offset=offset)
        err = np.abs(np.array(half.astype(mx.float32)) - np.array(exact))
        # input rounding + output rounding, each <= 2^-8 relative: a bound of 3 ulps of the magnitude
        bound = 3 * 2.0 ** -8 * np.maximum(np.abs(np.array(exact)), np.abs(np.array(x)).max())
        assert (err <= bound).all(), (offset, err.max())
