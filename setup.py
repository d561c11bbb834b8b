"""The one compiled part: openelm_mlx/small_gemm.c, a few-row float32 matmul kernel for Linux x86-64 CPUs
(see that file). Optional: where it cannot be built, the package installs without it and MLX's float32
matmuls all go to the BLAS that openelm_mlx.blas loads. Everything else is in pyproject.toml."""

import platform
import sys

from setuptools import Extension, setup

kernels = []
if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
    kernels.append(Extension("openelm_mlx._small_gemm", ["openelm_mlx/small_gemm.c"],
                             extra_compile_args=["-O3", "-Wall"], optional=True))

setup(ext_modules=kernels)
