"""The weights every implementation in a benchmark is given: one checkpoint, built once.

A checkpoint is a config plus the arrays as stored (a bfloat16 synthetic model, a directory's
safetensors, or either quantized). Each implementation builds its own model from the same arrays,
cast to its compute dtype, so a comparison is on identical weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..loading import DTYPES, assign_weights, quantize_tree, read_config, read_weights, resolve_model_dir
from ..model import Model
from ..synthetic import random_weights

# Synthetic checkpoints are stored like Apple's Instruct models and mlx-community's: bfloat16.
SYNTHETIC_DTYPE = "bfloat16"


@dataclass
class Checkpoint:
    name: str  # what the report calls the model: "synthetic 270M" or a path
    args: ModelArgs
    weights: Dict[str, mx.array]
    stored_dtype: str  # floating dtype of the stored weights (mlx-lm computes in it by default)

    @property
    def bits(self) -> Optional[int]:
        return self.args.quantization["bits"] if self.args.quantization else None

    @property
    def group_size(self) -> Optional[int]:
        return self.args.quantization["group_size"] if self.args.quantization else None


def synthetic_checkpoint(args: ModelArgs, name: str, *, seed: int = 0) -> Checkpoint:
    """Random bfloat16 weights of the architecture `args` (speed does not depend on their values)."""
    weights = random_weights(args, seed=seed, dtype=DTYPES[SYNTHETIC_DTYPE])
    mx.eval(weights)
    return Checkpoint(name=name, args=args, weights=weights, stored_dtype=SYNTHETIC_DTYPE)


def directory_checkpoint(path_or_repo: str) -> Checkpoint:
    """The arrays of an OpenELM checkpoint directory (or hub repo), as stored."""
    model_dir = resolve_model_dir(path_or_repo)
    args = read_config(model_dir)
    weights = read_weights(model_dir)
    floating = {str(v.dtype).split(".")[-1] for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    stored = floating.pop() if len(floating) == 1 else "float32"  # mixed: mlx-lm keeps each as stored
    return Checkpoint(name=str(path_or_repo), args=args, weights=weights, stored_dtype=stored)


def quantized(checkpoint: Checkpoint, *, bits: int, group_size: int) -> Checkpoint:
    """The checkpoint quantized as mlx-lm's converter does it (every Linear and the tied embedding)."""
    if checkpoint.args.quantization:
        return checkpoint
    model = build_model(checkpoint, DTYPES[checkpoint.stored_dtype])
    quantize_tree(model, {"bits": bits, "group_size": group_size})
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    args = dataclasses.replace(checkpoint.args, quantization={"group_size": group_size, "bits": bits})
    return Checkpoint(name=checkpoint.name, args=args, weights=weights, stored_dtype=checkpoint.stored_dtype)


def build_model(checkpoint: Checkpoint, dtype: mx.Dtype) -> Model:
    """Our model on the checkpoint's arrays, floating ones cast to `dtype`."""
    model = Model(checkpoint.args)
    if checkpoint.args.quantization:
        quantize_tree(model, checkpoint.args.quantization, {n[: -len(".scales")] for n in checkpoint.weights
                                                            if n.endswith(".scales")})
    assign_weights(model, dict(checkpoint.weights), dtype)
    return model


def build_mlx_lm_model(checkpoint: Checkpoint, dtype: mx.Dtype) -> nn.Module:
    """mlx-lm's own OpenELM model on the same arrays."""
    model = mlx_lm_skeleton(checkpoint.args)
    quant = checkpoint.args.quantization
    if quant:
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda path, _: f"{path}.scales" in checkpoint.weights)
    weights = {name: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
               for name, value in checkpoint.weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def mlx_lm_skeleton(args: ModelArgs) -> nn.Module:
    """mlx-lm's OpenELM model for `args`, its weights not yet loaded (imported here: mlx_lm pulls transformers)."""
    from mlx_lm.models import openelm

    return openelm.Model(openelm.ModelArgs.from_dict({**args.to_dict(), "model_type": "openelm"}))


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
