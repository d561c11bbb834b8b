"""The mixed-precision recipe: spend a bits-per-weight budget where quantization error hurts most.

OpenELM's layers differ in size (layer-wise scaling) and in how much their error moves the output,
so uniform bits waste bytes. The recipe measures, for every quantizable matrix alone, the KL
divergence its quantization at the lowest candidate width causes on a calibration text, models the
KL at other widths as falling 4x per extra bit (the error variance of affine quantization), and
upgrades greedily by KL saved per extra bit until the budget (the size of uniform quantization at
the requested bits) is spent. Modules may also go one bit below the requested width, which frees
budget for the sensitive ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from openelm_mlx.model import Model
from openelm_mlx.scoring import log_probs, log_softmax

from .quantize import BITS, QuantPlan, QuantSpec, fake_quantize
from .report import mean_kl

RECIPES = ("uniform", "mixed")
ERROR_FALL_PER_BIT = 4.0  # quantization noise variance falls 4x per extra bit


@dataclass
class MixedRecipe:
    plan: QuantPlan
    sensitivity: Dict[str, float]  # module -> KL when only it is quantized at the probe width
    probe_bits: int
    budget_bits_per_weight: float


def candidate_bits(default_bits: int) -> List[int]:
    return [b for b in BITS if b >= default_bits - 1]


def mixed_plan(reference: Model, calibration_ids: List[int], eligible: QuantPlan, *, default: QuantSpec,
               dtype: mx.Dtype, progress: Optional[Callable[[int, int], None]] = None) -> MixedRecipe:
    """Plan for the modules of `eligible` (module -> its uniform spec) within uniform `default`'s size."""
    widths = candidate_bits(default.bits)
    probe = widths[0]
    sensitivity = _sensitivities(reference, calibration_ids, list(eligible), QuantSpec(probe, default.group_size),
                                 dtype, progress)
    sizes = {m: int(_weight(reference, m).size) for m in eligible}
    budget = sum(sizes.values()) * default.bits  # the group scales cost the same at every width
    bits = {m: probe for m in eligible}
    spent = sum(sizes[m] * probe for m in eligible)

    def kl(m: str, b: int) -> float:
        return sensitivity[m] * ERROR_FALL_PER_BIT ** (probe - b)

    while True:
        best, best_gain = None, 0.0
        for m, b in bits.items():
            higher = [w for w in widths if w > b]
            if not higher:
                continue
            cost = sizes[m] * (higher[0] - b)
            gain = (kl(m, b) - kl(m, higher[0])) / cost
            if spent + cost <= budget and gain > best_gain:
                best, best_gain = (m, higher[0], cost), gain
        if best is None:
            break
        m, b, cost = best
        bits[m], spent = b, spent + cost
    plan = {m: QuantSpec(b, default.group_size) for m, b in bits.items()}
    return MixedRecipe(plan, sensitivity, probe, default.bits_per_weight)


def _weight(model: Model, path: str):
    return dict(model.named_modules())[path].weight


def _sensitivities(model: Model, ids: List[int], modules: List[str], probe: QuantSpec, dtype: mx.Dtype,
                   progress) -> Dict[str, float]:
    """KL of the output when only one module is quantized at `probe`, for each module.

    A module in layer i cannot change layers before it: their outputs are computed once and the
    forward restarts at layer i (the embedding, also the output matrix, reruns everything)."""
    reference = log_probs(model, ids)
    layer_inputs = _layer_inputs(model, ids)
    named = dict(model.named_modules())
    out = {}
    for n, path in enumerate(modules):
        module = named[path]
        original = module.weight
        module.weight = fake_quantize(original, probe, dtype)
        start = int(path.split(".")[2]) if path.startswith("transformer.layers.") else None
        candidate = log_probs(model, ids) if start is None else _from_layer(model, layer_inputs[start], start)
        out[path] = max(mean_kl(reference, candidate), 0.0)
        module.weight = original
        if progress:
            progress(n + 1, len(modules))
    return out


def _layer_inputs(model: Model, ids: List[int]) -> List[mx.array]:
    h = model.transformer.token_embeddings(mx.array([ids]))
    inputs = []
    for layer in model.layers:
        inputs.append(h)
        h = layer(h, "causal", None, 0)
        mx.eval(h)
    return inputs


def _from_layer(model: Model, h: mx.array, start: int) -> mx.array:
    for layer in model.layers[start:]:
        h = layer(h, "causal", None, 0)
    return log_softmax(model.logits(model.transformer.norm(h))[0])
