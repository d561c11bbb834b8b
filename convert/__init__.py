"""Checkpoint conversion to MLX (PyTorch, CoreNet, MLX sources; quantization with a quality report).
Installed as `openelm_mlx.convert`; the command is `openelm-mlx convert` or `python -m openelm_mlx.convert`."""

from .converter import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
