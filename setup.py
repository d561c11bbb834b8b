"""The one compiled part, for Linux x86-64 CPUs: openelm_mlx/_kernels, built from small_gemm.c (a few-row
float32 matmul kernel) and cpu_attention.c (causal attention of a long prefill); see those files.
Optional: where it cannot be built, the package installs without it, MLX's float32 matmuls all go to
the BLAS that openelm_mlx.blas loads and attention stays in MLX ops. Everything else is in pyproject.toml."""

import platform
import sys

from setuptools import Extension, setup

kernels = []
if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
    kernels.append(Extension("openelm_mlx._kernels", ["openelm_mlx/small_gemm.c", "openelm_mlx/cpu_attention.c"],
                             extra_compile_args=["-O3", "-Wall"], optional=True))

setup(ext_modules=kernels)
