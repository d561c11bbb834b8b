"""Which modules get quantized at what precision (a plan), and the per-tensor conversion itself.

MLX affine quantization packs each row in groups of `group_size` weights with one scale and one
bias per group (16-bit each), so a module costs `bits + 32 / group_size` bits per weight. A module
whose input width is not a multiple of the group size stays unquantized, as in mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from openelm_mlx.config import ModelArgs
from openelm_mlx.model import Model

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_BITS = 32  # a 16-bit scale and a 16-bit bias per group


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits + SCALE_BITS / self.group_size


# module path (e.g. "transformer.layers.0.attn.qkv_proj") -> how it is quantized; others stay float.
QuantPlan = Dict[str, QuantSpec]


def quantizable_modules(args: ModelArgs) -> Dict[str, Tuple[int, int]]:
    """Path -> weight shape [out, in] of every Linear and Embedding (the tied output matrix included)."""
    return {path: tuple(module.weight.shape) for path, module in Model(args).named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding))}


def uniform_plan(args: ModelArgs, spec: QuantSpec) -> QuantPlan:
    return {path: spec for path, shape in quantizable_modules(args).items() if shape[-1] % spec.group_size == 0}


def quantization_block(plan: QuantPlan, default: QuantSpec) -> dict:
    """config.json's `quantization`: the default, plus per-module entries where a module differs.
    mlx-lm's load_model and openelm_mlx.loading both read per-module entries by module path."""
    block = {"group_size": default.group_size, "bits": default.bits, "mode": "affine"}
    for path in sorted(plan):
        if plan[path] != default:
            block[path] = {"group_size": plan[path].group_size, "bits": plan[path].bits}
    return block


def convert_tensor(name: str, value: mx.array, *, dtype: mx.Dtype, plan: QuantPlan) -> Dict[str, mx.array]:
    """One source tensor -> the output tensor(s): cast to `dtype`, then packed if its module is in the plan."""
    value = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    spec: Optional[QuantSpec] = plan.get(module) if module else None
    if spec is None:
        return {name: value}
    weight, scales, biases = mx.quantize(value, group_size=spec.group_size, bits=spec.bits)
    return {f"{module}.weight": weight, f"{module}.scales": scales, f"{module}.biases": biases}


def dequantize_outputs(tensors: Dict[str, mx.array], plan: QuantPlan) -> Dict[str, mx.array]:
    """Float weights equal to what the quantized checkpoint holds (for measuring its quality)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        spec = plan.get(module) if name.endswith(".weight") else None
        if spec is not None:
            value = mx.dequantize(value, tensors[f"{module}.scales"], tensors[f"{module}.biases"],
                                  group_size=spec.group_size, bits=spec.bits)
        out[name] = value
    return out


def fake_quantize(weight: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> mx.array:
    """The weight as the quantized checkpoint would reproduce it, back in `weight`'s dtype."""
    packed = mx.quantize(weight.astype(dtype), group_size=spec.group_size, bits=spec.bits)
    return mx.dequantize(*packed, group_size=spec.group_size, bits=spec.bits).astype(weight.dtype)
