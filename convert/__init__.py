"""Checkpoint conversion to MLX (PyTorch, CoreNet, MLX sources; quantization with a quality report).
Installed as `openelm_mlx.convert`; the command is `openelm-mlx convert` or `python -m openelm_mlx.convert`.

`ConvertOptions` and `convert` are imported on first use (PEP 562): `python -m openelm_mlx.convert`
imports this package before its `__main__`, which must place the BLAS before mlx is imported."""

from typing import Any

__all__ = ["ConvertOptions", "convert"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import converter

    return getattr(converter, name)
