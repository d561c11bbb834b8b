"""Checkpoint conversion (PyTorch -> MLX, quantization). Installed as `openelm_mlx.convert`.

Empty until the converter issue lands; the package exists so the layout and its mapping under
the `openelm_mlx` namespace (no top-level `convert` in site-packages) are fixed from the start.
"""
