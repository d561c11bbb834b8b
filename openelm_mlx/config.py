"""OpenELM's configuration: `ModelArgs` from config.json, per-layer sizes, and the four presets.

Field names are Apple's config.json keys, so a config round-trips without a rename table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Number
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import ConfigError

# OpenELM was trained on sequences of this many tokens (config key max_context_length).
DEFAULT_CONTEXT_LENGTH = 2048

_REQUIRED = ("num_transformer_layers", "model_dim", "head_dim", "vocab_size", "ffn_multipliers")


def make_divisible(value: float, divisor: int) -> int:
    """Round `value` to the nearest multiple of `divisor`, never down by more than 10% (Apple's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def _layerwise(bounds: Sequence[float], num_layers: int) -> List[float]:
    """Apple's layer-wise scaling: linspace(min, max, L) rounded to 2 decimals before use."""
    return [round(float(v), 2) for v in np.linspace(bounds[0], bounds[1], num=num_layers, dtype=float)]


@dataclass
class ModelArgs:
    """Everything the model needs; build it with `ModelArgs.from_dict(config_json)` or `from_preset`."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    vocab_size: int
    num_query_heads: List[int]
    num_kv_heads: List[int]
    ffn_multipliers: List[float]
    ffn_dim_divisor: int = 256
    num_gqa_groups: int = 4
    qkv_multipliers: List[float] = field(default_factory=lambda: [0.5, 1.0])
    max_context_length: int = DEFAULT_CONTEXT_LENGTH
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    ffn_with_glu: bool = True
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "openelm"
    # MLX quantization block ({"group_size", "bits"} plus optional per-module overrides).
    quantization: Optional[Dict[str, Any]] = None
    # Derived in __post_init__, not read from config.json.
    ffn_dims: List[int] = field(init=False)

    def __post_init__(self) -> None:
        self._validate()
        self.ffn_dims = [make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]

    def _validate(self) -> None:
        num_layers = self.num_transformer_layers
        for name in ("num_transformer_layers", "model_dim", "head_dim", "vocab_size", "ffn_dim_divisor",
                     "num_gqa_groups", "max_context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name in ("rope_freq_constant", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"config field '{name}' must be a positive number, got {value!r}")
        for name in ("normalize_qk_projections", "share_input_output_layers", "ffn_with_glu"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            values = getattr(self, name)
            if len(values) != num_layers:
                raise ConfigError(
                    f"config field '{name}' has {len(values)} entries but num_transformer_layers is {num_layers}"
                )
        for i, (nq, nkv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if nq <= 0 or nkv <= 0:
                raise ConfigError(f"config fields 'num_query_heads'/'num_kv_heads' must be positive (layer {i}: {nq}, {nkv})")
            if nq % nkv:
                raise ConfigError(
                    f"config field 'num_query_heads' ({nq}) is not divisible by 'num_kv_heads' ({nkv}) in layer {i}"
                )
        if any(m <= 0 for m in self.ffn_multipliers):
            raise ConfigError(f"config field 'ffn_multipliers' must be positive, got {self.ffn_multipliers}")
        if not self.ffn_with_glu:
            raise ConfigError("config field 'ffn_with_glu' is false: only the GLU FFN of released OpenELM models is supported")
        if self.activation_fn_name not in ("swish", "silu"):
            raise ConfigError(f"config field 'activation_fn_name' is {self.activation_fn_name!r}: only 'swish' is supported")
        if self.normalization_layer_name != "rms_norm":
            raise ConfigError(
                f"config field 'normalization_layer_name' is {self.normalization_layer_name!r}: only 'rms_norm' is supported"
            )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict: Apple's expanded per-layer lists or the (min, max) form.

        Unknown keys are ignored; missing or inconsistent fields raise ConfigError naming the field.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(config).__name__}")
        if config.get("model_type", "openelm") != "openelm":
            raise ConfigError(f"config field 'model_type' is {config['model_type']!r}, expected 'openelm'")
        for name in _REQUIRED:
            if name not in config:
                raise ConfigError(f"config.json is missing the field '{name}'")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in config.items() if k in known}
        num_layers = values["num_transformer_layers"]
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ConfigError(f"config field 'num_transformer_layers' must be a positive integer, got {num_layers!r}")
        values["ffn_multipliers"] = _expand_ffn_multipliers(values["ffn_multipliers"], num_layers)
        if "num_query_heads" not in values or "num_kv_heads" not in values:
            values["num_query_heads"], values["num_kv_heads"] = _derive_heads(values)
        values["num_query_heads"] = _int_list(values["num_query_heads"], "num_query_heads")
        values["num_kv_heads"] = _int_list(values["num_kv_heads"], "num_kv_heads")
        if isinstance(values.get("qkv_multipliers"), Number):
            values["qkv_multipliers"] = [values["qkv_multipliers"]] * 2
        try:
            return cls(**values)
        except TypeError as e:  # a wrong type deep inside validation
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        """The real architecture of a released size ('270M', '450M', '1_1B', '3B')."""
        key = name.upper().replace(".", "_")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        """config.json contents with expanded per-layer lists (the form Apple and mlx-lm write)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if out["quantization"] is None:
            del out["quantization"]
        return out

    # ----------------------------------------------------------------------------- derived sizes
    def qkv_out_dim(self, layer: int) -> int:
        return (self.num_query_heads[layer] + 2 * self.num_kv_heads[layer]) * self.head_dim

    def num_parameters(self) -> int:
        """Exact parameter count (tied embedding counted once)."""
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d + d  # embedding + final norm
        if not self.share_input_output_layers:
            total += self.vocab_size * d
        for i in range(self.num_transformer_layers):
            total += 2 * d  # attn_norm, ffn_norm
            total += d * self.qkv_out_dim(i) + self.num_query_heads[i] * hd * d
            if self.normalize_qk_projections:
                total += 2 * hd
            total += d * 2 * self.ffn_dims[i] + self.ffn_dims[i] * d
        return total

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return sum(2 * nkv * self.head_dim * bytes_per_element for nkv in self.num_kv_heads)


def _int_list(values: Any, name: str) -> List[int]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"config field '{name}' must be a list of integers, got {values!r}")
    return list(values)


def _expand_ffn_multipliers(raw: Any, num_layers: int) -> List[float]:
    if isinstance(raw, Number) and not isinstance(raw, bool):
        return [float(raw)] * num_layers
    if not isinstance(raw, (list, tuple)) or not all(isinstance(v, Number) for v in raw):
        raise ConfigError(f"config field 'ffn_multipliers' must be a number or a list of numbers, got {raw!r}")
    if len(raw) == num_layers:
        return [float(v) for v in raw]
    if len(raw) == 2:
        return _layerwise(raw, num_layers)
    raise ConfigError(
        f"config field 'ffn_multipliers' has {len(raw)} entries: give one per layer ({num_layers}) or a (min, max) pair"
    )


def _derive_heads(values: Dict[str, Any]):
    """Per-layer head counts from qkv_multipliers, as Apple's OpenELMConfig computes them."""
    if "qkv_multipliers" not in values:
        raise ConfigError("config.json needs 'num_query_heads' and 'num_kv_heads', or 'qkv_multipliers' to derive them")
    raw = values["qkv_multipliers"]
    num_layers, head_dim, model_dim = values["num_transformer_layers"], values["head_dim"], values["model_dim"]
    groups = values.get("num_gqa_groups", 4)
    if not isinstance(groups, int) or groups <= 0:
        raise ConfigError(f"config field 'num_gqa_groups' must be a positive integer, got {groups!r}")
    if isinstance(raw, Number):
        multipliers = [float(raw)] * num_layers
    elif isinstance(raw, (list, tuple)) and len(raw) == 2:
        multipliers = _layerwise(raw, num_layers)
    else:
        raise ConfigError(f"config field 'qkv_multipliers' must be a number or a (min, max) pair, got {raw!r}")
    q_dims = [make_divisible(model_dim * m, head_dim * groups) for m in multipliers]
    num_query_heads = [q // head_dim for q in q_dims]
    return num_query_heads, [nq // groups for nq in num_query_heads]


def _preset(num_layers: int, model_dim: int, head_dim: int) -> Dict[str, Any]:
    return {
        "num_transformer_layers": num_layers,
        "model_dim": model_dim,
        "head_dim": head_dim,
        "vocab_size": 32000,
        "num_gqa_groups": 4,
        "qkv_multipliers": [0.5, 1.0],
        "ffn_multipliers": [0.5, 4.0],
        "ffn_dim_divisor": 256,
    }


# The released architectures, in the (min, max) form; from_preset expands them.
PRESETS: Dict[str, Dict[str, Any]] = {
    "270M": _preset(16, 1280, 64),
    "450M": _preset(20, 1536, 64),
    "1_1B": _preset(28, 2048, 64),
    "3B": _preset(36, 3072, 128),
}
