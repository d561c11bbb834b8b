"""ModelArgs: per-layer sizes of the released architectures, parameter counts, config validation.

The expected numbers come from the spec (docs/openelm-spec.md sections 2 and 4); the derivation
of per-layer sizes from the (min, max) form is re-implemented here from the spec's text.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlx.utils import tree_flatten

from openelm_mlx.config import PRESETS, ModelArgs
from openelm_mlx.errors import ConfigError
from openelm_mlx.model import Model

from helpers import DOCS_TARGET, tiny_config

# ------------------------------------------------------------------ independent derivation (spec §2)


def spec_make_divisible(v: float, d: int) -> int:
    n = max(d, int(v + d / 2) // d * d)
    if n < 0.9 * v:
        n += d
    return n


def spec_multipliers(lo: float, hi: float, num_layers: int) -> list:
    return [round(x, 2) for x in np.linspace(lo, hi, num_layers).astype(np.float64).tolist()]


def spec_layer_sizes(num_layers, model_dim, head_dim, groups=4, qkv=(0.5, 1.0), ffn=(0.5, 4.0), divisor=256):
    q_dims = [spec_make_divisible(model_dim * m, head_dim * groups) for m in spec_multipliers(*qkv, num_layers)]
    nq = [q // head_dim for q in q_dims]
    nkv = [q // groups for q in nq]
    ffn_mults = spec_multipliers(*ffn, num_layers)
    ffn_dims = [int(spec_make_divisible(m * model_dim, divisor)) for m in ffn_mults]
    return nq, nkv, ffn_mults, ffn_dims


# (L, model_dim, head_dim, q first/last, kv first/last, ffn first/last, parameters, kv bytes per token)
SPEC_TABLE = {
    "270M": (16, 1280, 64, (12, 20), (3, 5), (768, 5120), 271_527_168, 16_128),
    "450M": (20, 1536, 64, (12, 24), (3, 6), (768, 6144), 457_179_136, 23_296),
    "1_1B": (28, 2048, 64, (16, 32), (4, 8), (1024, 8192), 1_079_891_456, 43_264),
    "3B": (36, 3072, 128, (12, 24), (3, 6), (1536, 12288), 3_036_647_424, 83_968),
}


# ------------------------------------------------------------------ presets


def test_presets_are_the_four_released_sizes():
    assert set(PRESETS) == set(SPEC_TABLE)


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_preset_per_layer_sizes_match_spec(name):
    L, d, hd, q, kv, ffn, _, _ = SPEC_TABLE[name]
    args = ModelArgs.from_preset(name)
    assert (args.num_transformer_layers, args.model_dim, args.head_dim, args.vocab_size) == (L, d, hd, 32000)
    for values in (args.num_query_heads, args.num_kv_heads, args.ffn_dims, args.ffn_multipliers):
        assert len(values) == L
    assert (args.num_query_heads[0], args.num_query_heads[-1]) == q
    assert (args.num_kv_heads[0], args.num_kv_heads[-1]) == kv
    assert (args.ffn_dims[0], args.ffn_dims[-1]) == ffn
    assert all(nq == 4 * nkv for nq, nkv in zip(args.num_query_heads, args.num_kv_heads))
    assert all(isinstance(f, int) for f in args.ffn_dims)
    assert (args.bos_token_id, args.eos_token_id) == (1, 2)
    assert args.share_input_output_layers and args.normalize_qk_projections
    assert args.rms_norm_eps == 1e-6 and args.rope_freq_constant == 10000


def test_270m_exact_lists():
    args = ModelArgs.from_preset("270M")
    assert args.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert args.num_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert args.ffn_dims == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840,
                             4352, 4608, 4864, 5120]


def test_1_1b_layers_13_and_14_share_a_width():
    dims = ModelArgs.from_preset("1_1B").ffn_dims
    assert dims[13] == dims[14] == 4608
    assert dims == sorted(dims)  # non-decreasing, but not strictly increasing


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_preset_parameter_count_and_kv_bytes(name):
    *_, params, kv_bytes = SPEC_TABLE[name]
    args = ModelArgs.from_preset(name)
    assert args.num_parameters() == params
    assert args.kv_cache_bytes_per_token() == kv_bytes
    # 16-bit is the default; other element sizes scale linearly.
    assert args.kv_cache_bytes_per_token(4) == 2 * kv_bytes


@pytest.mark.parametrize("name", ["270M", "3B"])
def test_num_parameters_equals_the_built_model(name):
    # MLX arrays are lazy: building the module tree allocates nothing until evaluated.
    args = ModelArgs.from_preset(name)
    model = Model(args)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == args.num_parameters()


@pytest.mark.parametrize("name", ["270m", "1.1B", "1_1b"])
def test_preset_names_are_forgiving(name):
    assert ModelArgs.from_preset(name).num_transformer_layers in (16, 28)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="7B.*270M"):
        ModelArgs.from_preset("7B")


def test_preset_overrides():
    args = ModelArgs.from_preset("270M", vocab_size=320)
    assert args.vocab_size == 320
    assert args.num_parameters() == 271_527_168 - (32000 - 320) * 1280


# ------------------------------------------------------------------ (min, max) form vs expanded form


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_min_max_form_matches_independent_derivation(name):
    L, d, hd, *_ = SPEC_TABLE[name]
    nq, nkv, ffn_mults, ffn_dims = spec_layer_sizes(L, d, hd)
    args = ModelArgs.from_dict({"model_type": "openelm", "num_transformer_layers": L, "model_dim": d, "head_dim": hd,
                                "vocab_size": 32000, "num_gqa_groups": 4, "qkv_multipliers": [0.5, 1.0],
                                "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 256})
    assert args.num_query_heads == nq
    assert args.num_kv_heads == nkv
    assert args.ffn_multipliers == ffn_mults
    assert args.ffn_dims == ffn_dims


@pytest.mark.parametrize("name", ["270M", "3B"])
def test_expanded_form_equals_min_max_form(name):
    L, d, hd, *_ = SPEC_TABLE[name]
    nq, nkv, ffn_mults, _ = spec_layer_sizes(L, d, hd)
    base = {"model_type": "openelm", "num_transformer_layers": L, "model_dim": d, "head_dim": hd,
            "vocab_size": 32000, "num_gqa_groups": 4, "ffn_dim_divisor": 256, "qkv_multipliers": [0.5, 1.0]}
    compact = ModelArgs.from_dict({**base, "ffn_multipliers": [0.5, 4.0]})
    # What save_pretrained writes: the expanded lists (multipliers already rounded).
    expanded = ModelArgs.from_dict({**base, "ffn_multipliers": ffn_mults, "num_query_heads": nq, "num_kv_heads": nkv})
    assert expanded == compact
    assert expanded.num_parameters() == SPEC_TABLE[name][6]


def test_multipliers_are_rounded_before_use():
    # With divisor 256 the rounding rarely shows, so use divisor 2: linspace(0.5, 4.0, 16)[1] = 0.7333...
    # gives 938 unrounded, but the rounded multiplier 0.73 gives 934.
    args = ModelArgs.from_dict({"num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64, "vocab_size": 32000,
                                "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 2, "qkv_multipliers": [0.5, 1.0]})
    assert args.ffn_multipliers[1] == 0.73
    assert args.ffn_dims[1] == spec_make_divisible(0.73 * 1280, 2) == 934
    assert spec_make_divisible(np.linspace(0.5, 4.0, 16)[1] * 1280, 2) != 934  # unrounded would differ


def test_scalar_multipliers_give_uniform_layers():
    args = ModelArgs.from_dict({"num_transformer_layers": 4, "model_dim": 256, "head_dim": 32, "vocab_size": 100,
                                "qkv_multipliers": 1.0, "ffn_multipliers": 2.0, "ffn_dim_divisor": 64})
    assert args.num_query_heads == [8] * 4
    assert args.num_kv_heads == [2] * 4
    assert args.ffn_dims == [512] * 4


def test_make_divisible_rules():
    from openelm_mlx.config import make_divisible

    for v, d in [(0.5 * 1280, 256), (938.67, 256), (100, 256), (1, 8), (0.73 * 2048, 256), (95, 100), (3.3 * 3072, 256)]:
        assert make_divisible(v, d) == spec_make_divisible(v, d)
    assert make_divisible(100, 256) == 256  # never below the divisor
    assert make_divisible(1150, 1000) == 2000  # 1000 would be more than 10% down


def test_to_dict_round_trips():
    args = ModelArgs.from_preset("450M")
    config = json.loads(json.dumps(args.to_dict()))
    assert "ffn_dims" not in config and "quantization" not in config
    assert len(config["num_query_heads"]) == 20 and len(config["ffn_multipliers"]) == 20
    assert ModelArgs.from_dict(config) == args


def test_helpers_tiny_config_parses():
    config = tiny_config()
    args = ModelArgs.from_dict(config)
    assert args.num_query_heads == config["num_query_heads"]
    assert args.ffn_dims == [32, 160, 256]


# ------------------------------------------------------------------ the docs-target checkpoint's config


def test_docs_target_config():
    path = DOCS_TARGET / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    args = ModelArgs.from_dict(json.loads(path.read_text()))
    assert args.num_transformer_layers == 8 and args.model_dim == 256
    assert args.num_parameters() == 12_964_608


# ------------------------------------------------------------------ validation


def test_unknown_keys_are_ignored():
    config = tiny_config(some_future_key={"a": 1}, transformers_version="9.9", quantization_config={"bits": 4})
    assert ModelArgs.from_dict(config) == ModelArgs.from_dict(tiny_config())


@pytest.mark.parametrize("field", ["num_transformer_layers", "model_dim", "head_dim", "vocab_size", "ffn_multipliers"])
def test_missing_required_field_is_named(field):
    config = tiny_config()
    del config[field]
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelArgs.from_dict(config)


def test_missing_heads_without_qkv_multipliers():
    config = tiny_config()
    for key in ("num_query_heads", "num_kv_heads", "qkv_multipliers"):
        del config[key]
    with pytest.raises(ConfigError, match="num_query_heads.*qkv_multipliers"):
        ModelArgs.from_dict(config)


@pytest.mark.parametrize("field", ["num_query_heads", "num_kv_heads", "ffn_multipliers"])
@pytest.mark.parametrize("length", [2 - 1, 4])
def test_list_length_must_match_layers(field, length):
    config = tiny_config(num_layers=3)
    config[field] = (config[field] * 2)[:length]
    with pytest.raises(ConfigError, match=f"'{field}'.*{length}"):
        ModelArgs.from_dict(config)


def test_query_heads_must_be_divisible_by_kv_heads():
    config = tiny_config(num_query_heads=[4, 6, 8], num_kv_heads=[1, 4, 2])
    with pytest.raises(ConfigError, match="num_query_heads.*num_kv_heads.*layer 1"):
        ModelArgs.from_dict(config)


def test_non_positive_heads_rejected():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelArgs.from_dict(tiny_config(num_query_heads=[4, 4, 8], num_kv_heads=[1, 0, 2]))


@pytest.mark.parametrize("model_type", ["llama", "OpenELM-270M", None])
def test_model_type_must_be_openelm(model_type):
    with pytest.raises(ConfigError, match="model_type"):
        ModelArgs.from_dict(tiny_config(model_type=model_type))


def test_model_type_may_be_absent():
    config = tiny_config()
    del config["model_type"]
    assert ModelArgs.from_dict(config).model_type == "openelm"


WRONG_TYPES = [
    ("num_transformer_layers", "3"),
    ("num_transformer_layers", 3.0),
    ("num_transformer_layers", 0),
    ("model_dim", "64"),
    ("model_dim", 64.5),
    ("model_dim", True),
    ("head_dim", None),
    ("head_dim", -16),
    ("vocab_size", [320]),
    ("ffn_dim_divisor", "32"),
    ("num_query_heads", "4,4,8"),
    ("num_query_heads", [4.0, 4.0, 8.0]),
    ("num_kv_heads", [1, "1", 2]),
    ("ffn_multipliers", "0.5"),
    ("ffn_multipliers", [0.5, "2.25", 4.0]),
    ("ffn_multipliers", [0.5, -1.0, 4.0]),
    ("qkv_multipliers", "wide"),
    ("num_gqa_groups", "4"),
    ("num_gqa_groups", 0),
    ("max_context_length", "2048"),
    ("max_context_length", 0),
    ("rope_freq_constant", "10000"),
    ("rope_freq_constant", 0),
    ("rms_norm_eps", "1e-6"),
    ("rms_norm_eps", -1e-6),
    ("normalize_qk_projections", "yes"),
    ("share_input_output_layers", 1),
    ("activation_fn_name", "gelu"),
    ("normalization_layer_name", "layer_norm"),
    ("ffn_with_glu", False),
]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_wrong_types_rejected_naming_the_field(field, value):
    config = tiny_config()
    if field in ("qkv_multipliers", "num_gqa_groups"):  # only read when heads are derived
        del config["num_query_heads"], config["num_kv_heads"]
    config[field] = value
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelArgs.from_dict(config)


def test_config_must_be_an_object():
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_dict([1, 2, 3])


def test_config_error_is_a_value_error():
    # Callers that catch ValueError (as for any bad input) still catch it.
    with pytest.raises(ValueError):
        ModelArgs.from_dict({})


def test_heads_are_derived_only_when_missing():
    # Expanded lists win over qkv_multipliers (they are what the checkpoint's tensors were shaped from).
    config = tiny_config(num_query_heads=[4, 8, 8], num_kv_heads=[2, 2, 4], qkv_multipliers=[0.25, 0.25])
    args = ModelArgs.from_dict(config)
    assert args.num_query_heads == [4, 8, 8] and args.num_kv_heads == [2, 2, 4]
    assert args.qkv_out_dim(2) == (8 + 2 * 4) * 16
    assert math.isclose(sum(args.ffn_multipliers), 0.5 + 2.25 + 4.0)
