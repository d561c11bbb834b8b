"""openelm-mlx: run Apple's OpenELM language models with MLX.

Importing the package has no side effect and does not import mlx: each public name below is
imported from its module on first use (PEP 562). On Linux CPUs, call `use_optimized_blas()` before
anything imports `mlx.core` to have MLX's float32 matmuls run on MKL or OpenBLAS (see `blas`).
"""

from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "BLASWarning": "blas", "use_optimized_blas": "blas",
    "KVCache": "cache", "make_cache": "cache",
    "PRESETS": "config", "ModelArgs": "config",
    "Constraint": "constraints",
    "DraftModel": "drafting", "Drafter": "drafting", "PromptLookup": "drafting",
    "ConfigError": "errors", "ConstraintError": "errors", "ContextLengthError": "errors", "LoadError": "errors", "OpenELMError": "errors",
    "TokenizerNotFoundError": "errors",
    "GenerationOptions": "generation", "GenerationResponse": "generation", "GenerationResult": "generation",
    "batch_generate": "engine", "generate": "streaming", "stream_generate": "streaming",
    "load": "loading",
    "Model": "model",
    "Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return [*__all__, "__version__"]
