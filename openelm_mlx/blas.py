"""An optimized BLAS for MLX's CPU backend on Linux, without LD_PRELOAD.

`mlx[cpu]` wheels link the reference (netlib) BLAS, and MLX's float32 matmuls on the CPU all call
`cblas_sgemm`. A library loaded with RTLD_GLOBAL before `mlx.core` is imported sits in the global
symbol scope, which the dynamic linker searches before mlx's own dependencies: loading an optimized
BLAS first makes MLX's float32 matmuls use it. Two are looked for, in this order:
- Intel MKL from PyPI (`pip install 'openelm-mlx[cpu-blas]'`, Linux x86-64): its `libmkl_rt` lies in
  the environment's `lib/`. On this project's 2-core EPYC a 270M float32 decode step ran ~3x faster
  than with OpenBLAS 0.3.21, whose `sgemm` packs the whole weight even for one row;
- the system's OpenBLAS (Debian/Ubuntu: `apt install libopenblas0-pthread`): fast prefill.

In front of that BLAS, on x86-64 CPUs with AVX2 and FMA, goes the project's own few-row kernel
(`openelm_mlx/small_gemm.c`, built at install where a C compiler is found): it takes the float32
`x @ W.T` of 2 to 16 rows (a verify pass, a batch of decode rows), where MKL costs nearly as much
per row as for one row, and hands every other call to the BLAS.
OPENELM_MLX_SMALL_GEMM=off leaves it out.

Controlled by the environment variable OPENELM_MLX_BLAS:
- unset or `auto`: the first of those that is installed, else mlx's bundled BLAS;
- `reference`: keep mlx's bundled reference BLAS;
- a path: load that library (a BLAS exporting `cblas_sgemm`); one that cannot be loaded is
  reported with a warning (BLASWarning) and the bundled BLAS is kept.

Nothing happens on import: `openelm_mlx.use_optimized_blas()` loads the library, and must run before
`mlx.core` is first imported (the `openelm-mlx` command calls it first). This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.machinery
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Optional

from .cpu_memory import keep_freed_memory

ENV_VAR = "OPENELM_MLX_BLAS"
KERNEL_ENV_VAR = "OPENELM_MLX_SMALL_GEMM"
# A thread count set in one of these is the user's: MKL is then left with it.
BLAS_THREAD_VARS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")
_preloaded: Optional[str] = None  # the library `use_optimized_blas` loaded, if any
_kernel: Optional[str] = None  # the few-row kernel placed in front of it, if any


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


class BLASWarning(UserWarning):
    """`use_optimized_blas` could not put the BLAS it was asked for in place."""


def use_optimized_blas() -> Optional[str]:
    """Make MLX's float32 CPU matmuls use an optimized BLAS; call it before anything imports `mlx.core`.

    Loads the library chosen by OPENELM_MLX_BLAS (see the module docstring) with RTLD_GLOBAL and returns
    its path, or None when there is nothing to load (off Linux, `reference`, none installed). The
    `openelm-mlx` command calls it first thing. On glibc it first keeps freed memory in the process
    (`cpu_memory.keep_freed_memory`: MLX's large CPU ops otherwise fault in fresh pages), whatever the
    BLAS. MKL is set to run on one thread unless MKL_NUM_THREADS or OMP_NUM_THREADS is set (`cpu_split`
    spreads the work over CPU streams instead). Once `mlx.core`
    is imported MLX has bound its BLAS: a later call changes nothing and warns (BLASWarning), as does
    a library that cannot be loaded.
    """
    global _preloaded
    keep_freed_memory()
    choice = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if _preloaded or sys.platform != "linux" or choice == "reference":
        return _preloaded
    path = (_installed_mkl() or ctypes.util.find_library("openblas")) if choice == "auto" else choice
    if path is None:
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(f"openelm_mlx.use_optimized_blas() came after mlx.core was imported, so MLX keeps its "
                      f"bundled reference BLAS and {path} is not used: call it before importing mlx or any "
                      f"openelm_mlx module that imports it (or set {ENV_VAR}=reference to silence this)",
                      BLASWarning, stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(path)
    except OSError as e:
        if choice == "auto":
            return None  # an unusable system library is not the user's request: keep the bundled BLAS
        warnings.warn(f"{ENV_VAR}={choice}: cannot load it ({e}); using mlx's bundled reference BLAS "
                      f"(unset {ENV_VAR} or fix the path)", BLASWarning, stacklevel=2)
        return None
    _place_kernel(library)  # first in the global scope: it gets MLX's calls and passes on the rest
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _preloaded = path
    _single_threaded_mkl(path)
    return path


def _place_kernel(blas: ctypes.CDLL) -> None:
    """Load the few-row kernel with RTLD_GLOBAL and point its other calls at `blas`'s `cblas_sgemm`."""
    global _kernel
    path = kernel_library()
    if path is None or os.environ.get(KERNEL_ENV_VAR, "").strip().lower() in ("off", "0", "no") \
            or not hasattr(blas, "cblas_sgemm"):
        return
    kernel = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    kernel.openelm_gemm_configure(ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p))
    _kernel = path


def kernel_library() -> Optional[str]:
    """The built kernels' library (`_kernels*.so` beside this module: the few-row kernel, cpu_attention.c's
    kernel) if this CPU can run it, else None."""
    found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in [Path(__file__).with_name("_kernels" + suffix)] if p.exists()]
    if not found:
        return None
    try:
        supported = ctypes.CDLL(str(found[0])).openelm_gemm_supported()
    except (OSError, AttributeError):
        return None
    return str(found[0]) if supported else None


def _single_threaded_mkl(path: str) -> None:
    """Run MKL's matmuls on one thread unless the user set a thread count: `cpu_split` then spreads
    them, and the elementwise work MLX runs on one thread, over CPU streams (one thread each).

    MKL's own two threads were slow on few-row matmuls next to MLX's threads (8 queries x 72 keys of
    attention: 6.6 ms with 2 threads, 0.56 ms with 1) and cannot speed up what runs outside MKL."""
    if any(os.environ.get(var) for var in BLAS_THREAD_VARS):
        return
    library = ctypes.CDLL(path)
    if hasattr(library, "MKL_Set_Num_Threads"):
        library.MKL_Set_Num_Threads(1)


def _installed_mkl() -> Optional[str]:
    """MKL's single dynamic library as the `mkl` wheel installs it (into the environment's lib/)."""
    found = sorted(Path(sys.prefix, "lib").glob("libmkl_rt.so*"))
    return str(found[-1]) if found else None


def _global_sgemm_provider() -> Optional[str]:
    """The BLAS that `cblas_sgemm` resolves to in the global scope (LD_PRELOAD or `use_optimized_blas`);
    behind the few-row kernel, the BLAS it hands the other calls to."""
    provider = _resolved_sgemm()
    return _preloaded if provider is not None and provider == _kernel else provider


def _resolved_sgemm() -> Optional[str]:
    """The library that `cblas_sgemm` resolves to in the global scope, the few-row kernel included."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _mapped_blas() -> Optional[str]:
    """Path of a mapped library whose name says BLAS (mlx's bundled one), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def _optimized_blas_name(path: str) -> Optional[str]:
    """The version string of an OpenBLAS or MKL library; None for anything else (the reference BLAS)."""
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    if hasattr(library, "openblas_get_config"):
        library.openblas_get_config.restype = ctypes.c_char_p
        return library.openblas_get_config().decode(errors="replace").strip()
    if hasattr(library, "MKL_Get_Version_String"):
        text = ctypes.create_string_buffer(256)
        library.MKL_Get_Version_String(text, len(text))
        return text.value.decode(errors="replace").strip()
    return None


def blas_threads() -> int:
    """How many threads the BLAS behind MLX's float32 CPU matmuls uses (1 for the reference BLAS)."""
    provider = _global_sgemm_provider()
    if provider is None:
        return 1
    try:
        library = ctypes.CDLL(provider)
    except OSError:
        return 1
    for getter in ("MKL_Get_Max_Threads", "openblas_get_num_threads"):
        if hasattr(library, getter):
            return max(1, _on_a_new_thread(getattr(library, getter)))
    return 1


def _on_a_new_thread(count: Callable[[], int]) -> int:
    """`count()` called on a new thread, as MLX calls the BLAS from its stream threads: MKL answers there
    with its global count, not one set for the calling thread alone. torch.set_num_threads(n) sets one:
    its mkl_set_num_threads_local binds to the MKL loaded here, and the main thread then read n."""
    answer: List[int] = []
    thread = threading.Thread(target=lambda: answer.append(count()))
    thread.start()
    thread.join()
    return answer[0]


def optimized_blas() -> bool:
    """Whether MLX's float32 CPU matmuls run on an optimized BLAS (MKL, OpenBLAS) rather than the reference."""
    provider = _global_sgemm_provider()
    return provider is not None and _optimized_blas_name(provider) is not None


def describe_blas() -> str:
    """Which BLAS MLX's CPU matmuls use, in words (Linux); '' elsewhere."""
    if sys.platform != "linux":
        return ""
    provider = _global_sgemm_provider()
    if provider is not None:
        name = _optimized_blas_name(provider)
        in_front = _kernel is not None and _resolved_sgemm() == _kernel
        kernel = ", few-row matmuls by openelm-mlx's small_gemm kernel" if in_front else ""
        return f"{name or 'BLAS'} ({provider}){kernel}"
    bundled = _mapped_blas()
    return f"reference BLAS bundled with mlx[cpu] ({bundled or 'not mapped yet'})"
