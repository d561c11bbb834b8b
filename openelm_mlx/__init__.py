"""openelm-mlx: run Apple's OpenELM language models with MLX."""

from . import blas

blas.preload()  # before anything imports mlx.core: MLX binds its BLAS when it is first loaded

from .cache import KVCache, make_cache
from .config import PRESETS, ModelArgs
from .errors import ConfigError, ContextLengthError, LoadError, OpenELMError, TokenizerNotFoundError
from .generation import (GenerationOptions, GenerationResponse, GenerationResult, batch_generate, generate,
                         stream_generate)
from .loading import load
from .model import Model
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ContextLengthError", "GenerationOptions", "GenerationResponse", "GenerationResult",
    "KVCache", "LoadError", "Model", "ModelArgs", "OpenELMError", "PRESETS", "Tokenizer",
    "TokenizerNotFoundError", "batch_generate", "generate", "load", "make_cache", "stream_generate",
]
