"""The few-row float32 kernel (openelm_mlx/small_gemm.c) that `use_optimized_blas` puts in front of the BLAS:
which calls it takes and which it hands on, its results against NumPy in float64, and that a row's
result does not depend on the other rows or on which slice of the weight it is multiplied by.

The library is loaded here with RTLD_LOCAL, so it does not take this process's MLX matmuls; its
fallback is a Python function that records each call and computes it with NumPy."""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from test_bench import run_with_blas_env
from openelm_mlx import blas

ROW_MAJOR, COL_MAJOR, NO_TRANS, TRANS = 101, 102, 111, 112
SGEMM = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                         ctypes.c_float, ctypes.c_void_p, ctypes.c_int)


def _x86_with_avx2() -> bool:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = Path("/proc/cpuinfo").read_text()
    return " avx2" in flags and " fma" in flags


needs_kernel = pytest.mark.skipif(not _x86_with_avx2(), reason="the kernel is built for Linux x86-64 CPUs with AVX2")


def test_the_kernel_is_built_where_it_can_run():
    """setup.py builds it on Linux x86-64 (pip install -e . too); a CPU with AVX2 and FMA can load it."""
    if not _x86_with_avx2():
        assert blas.kernel_library() is None
        return
    assert blas.kernel_library() is not None, "reinstall the package (pip install -e .) to build small_gemm.c"


class Kernel:
    """The library with a recording NumPy fallback."""

    def __init__(self):
        self.library = ctypes.CDLL(blas.kernel_library())
        self.forwarded = []
        self.outputs = []  # (address, ldc) of each forwarded call's output
        self._fallback = SGEMM(self._numpy_sgemm)  # kept alive: the library holds its address
        self.library.openelm_gemm_configure(ctypes.cast(self._fallback, ctypes.c_void_p))

    def _numpy_sgemm(self, order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        self.forwarded.append((order, trans_a, trans_b, m, n, k))
        self.outputs.append((c, ldc))
        if (order, trans_b) != (ROW_MAJOR, TRANS):
            return  # only recorded: the tests that send these look at who got them
        if trans_a == NO_TRANS:
            x = np.ctypeslib.as_array(ctypes.cast(a, ctypes.POINTER(ctypes.c_float)), (m, lda))[:, :k]
        else:  # a holds x.T: k rows of lda floats
            x = np.ctypeslib.as_array(ctypes.cast(a, ctypes.POINTER(ctypes.c_float)), (k, lda))[:, :m].T
        w = np.ctypeslib.as_array(ctypes.cast(b, ctypes.POINTER(ctypes.c_float)), (n, ldb))[:, :k]
        out = np.ctypeslib.as_array(ctypes.cast(c, ctypes.POINTER(ctypes.c_float)), (m, ldc))
        out[:, :n] = alpha * (x @ w.T) + (beta * out[:, :n] if beta else 0)  # beta 0: out is not read

    def counts(self):
        kernel, forwarded = ctypes.c_long(), ctypes.c_long()
        self.library.openelm_gemm_counts(ctypes.byref(kernel), ctypes.byref(forwarded))
        return kernel.value, forwarded.value

    def gemm(self, x, w, *, out=None, alpha=1.0, beta=0.0, order=ROW_MAJOR, trans_a=NO_TRANS, trans_b=TRANS):
        """`alpha * x @ w.T + beta * out` through cblas_sgemm; x, w, out may be column slices (strides kept).
        With TransA, `x` is stored transposed ([K, M]), as the BLAS reads it."""
        m, k = x.shape if trans_a == NO_TRANS else x.shape[::-1]
        n = w.shape[0]
        out = np.full((m, n), np.nan, np.float32) if out is None else out
        for array in (x, w, out):
            assert array.strides[1] == 4 and array.dtype == np.float32
        self.library.cblas_sgemm(order, trans_a, trans_b, m, n, k, ctypes.c_float(alpha),
                                 x.ctypes.data_as(ctypes.c_void_p), x.strides[0] // 4,
                                 w.ctypes.data_as(ctypes.c_void_p), w.strides[0] // 4, ctypes.c_float(beta),
                                 out.ctypes.data_as(ctypes.c_void_p), out.strides[0] // 4)
        return out


@pytest.fixture(scope="module")
def kernel():
    if not _x86_with_avx2():
        pytest.skip("the kernel is built for Linux x86-64 CPUs with AVX2")
    return Kernel()


def _random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("n, k", [(7, 256), (48, 259), (100, 1280), (3, 1031)])
def test_kernel_matches_float64(kernel, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    x, w = _random(rng, m, k), _random(rng, n, k)
    before = kernel.counts()
    out = kernel.gemm(x, w)
    assert kernel.counts() == (before[0] + 1, before[1])  # the kernel's, not the fallback's
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(out - exact).max() <= 1e-5 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max() * 4


def test_strides_alpha_and_beta(kernel):
    rng = np.random.default_rng(1)
    x, w = _random(rng, 6, 300)[:, 10:290], _random(rng, 40, 320)[:, 5:285]  # row strides past K
    out = _random(rng, 6, 50)
    start = out.copy()
    kernel.gemm(x, w, out=out[:, 3:43], alpha=0.5, beta=-2.0)
    exact = 0.5 * (x.astype(np.float64) @ w.astype(np.float64).T) - 2.0 * start[:, 3:43]
    assert np.abs(out[:, 3:43] - exact).max() < 1e-3
    assert np.array_equal(out[:, :3], start[:, :3]) and np.array_equal(out[:, 43:], start[:, 43:])  # untouched


def test_beta_zero_does_not_read_the_output(kernel):
    rng = np.random.default_rng(2)
    x, w = _random(rng, 4, 256), _random(rng, 9, 256)
    out = kernel.gemm(x, w, out=np.full((4, 9), np.nan, np.float32))  # BLAS: with beta 0, C need not be set
    assert np.isfinite(out).all()


def test_a_row_gives_the_same_bits_among_any_rows_and_any_weight_slice(kernel):
    """What keeps a verify pass, a batch row and a split matmul (cpu_split) equal to each other."""
    rng = np.random.default_rng(3)
    x, w = _random(rng, 16, 1283), _random(rng, 61, 1283)
    full = kernel.gemm(x, w)
    for rows in ([5, 9], [0, 1, 2, 3, 4], [15, 2, 7], list(range(11))):
        assert np.array_equal(kernel.gemm(x[rows], w), full[rows])
    for cols in (slice(0, 31), slice(31, 61), slice(1, 5), slice(59, 61)):
        assert np.array_equal(kernel.gemm(x[4:9], w[cols]), full[4:9, cols])


@pytest.mark.parametrize("case", [
    dict(m=1, k=1280),                 # a decode step: MKL's matvec is as fast
    dict(m=17, k=1280),                # more rows than the kernel takes
    dict(m=8, k=64),                   # attention's 64-term dot products
])
def test_calls_outside_the_kernel_go_to_the_blas_behind_it(kernel, case):
    rng = np.random.default_rng(4)
    x, w = _random(rng, case["m"], case["k"]), _random(rng, 12, case["k"])
    before, calls = kernel.counts(), len(kernel.forwarded)
    out = kernel.gemm(x, w)
    assert kernel.counts() == (before[0], before[1] + 1)
    assert kernel.forwarded[calls:] == [(ROW_MAJOR, NO_TRANS, TRANS, case["m"], 12, case["k"])]
    assert np.allclose(out, x @ w.T, atol=1e-4)


@pytest.mark.parametrize("order, trans_a, trans_b", [(COL_MAJOR, NO_TRANS, TRANS), (ROW_MAJOR, TRANS, TRANS),
                                                     (ROW_MAJOR, NO_TRANS, NO_TRANS)])
def test_other_orders_and_transposes_are_handed_on(kernel, order, trans_a, trans_b):
    rng = np.random.default_rng(5)
    x, w = (_random(rng, 256, 4) if trans_a == TRANS else _random(rng, 4, 256)), _random(rng, 8, 256)
    before, calls = kernel.counts(), len(kernel.forwarded)
    kernel.gemm(x, w, order=order, trans_a=trans_a, trans_b=trans_b)
    assert kernel.counts() == (before[0], before[1] + 1)
    assert kernel.forwarded[calls:] == [(order, trans_a, trans_b, 4, 8, 256)]


def _misaligned(m: int, n: int, offset_bytes: int = 8) -> np.ndarray:
    """An [m, n] float32 array `offset_bytes` past a 64-byte boundary (MLX's CPU buffers start 8 past 16)."""
    buffer = np.empty(m * n + 32, np.float32)
    start = (-buffer.ctypes.data % 64 + offset_bytes) // 4
    out = buffer[start:start + m * n].reshape(m, n)
    out.fill(np.nan)
    return out


def test_a_large_call_with_a_misaligned_output_reaches_the_blas_with_an_aligned_one(kernel):
    """MKL's sgemm runs slower into an output that is not 64-byte aligned, and MLX's never is: the
    kernel hands the BLAS an aligned scratch (rows padded to 64 bytes) and copies the result out."""
    rng = np.random.default_rng(6)
    x, w = _random(rng, 64, 1024), _random(rng, 300, 1024)
    calls = len(kernel.forwarded)
    out = _misaligned(64, 300)
    kernel.gemm(x, w, out=out)
    [(address, ldc)] = kernel.outputs[calls:]
    assert address % 64 == 0 and ldc == 304 and address != out.ctypes.data
    aligned = _misaligned(64, 300, offset_bytes=0)
    kernel.gemm(x, w, out=aligned)
    assert kernel.outputs[-1] == (aligned.ctypes.data, 300)  # already aligned: straight through
    assert np.array_equal(out, aligned)  # the same numbers, copied out whole
    assert np.allclose(out, x @ w.T, atol=1e-3)


def test_a_misaligned_output_stays_put_where_the_copy_would_not_pay_or_c_is_read(kernel):
    rng = np.random.default_rng(7)
    x, w = _random(rng, 20, 256), _random(rng, 100, 256)  # 1 MFLOP: too small to pay for the copy
    out = _misaligned(20, 100)
    kernel.gemm(x, w, out=out)
    assert kernel.outputs[-1] == (out.ctypes.data, 100)
    x, w = _random(rng, 64, 1024), _random(rng, 300, 1024)
    out = _misaligned(64, 300)
    out.fill(1.0)
    kernel.gemm(x, w, out=out, beta=1.0)  # beta 1 reads C: handed on as it is
    assert kernel.outputs[-1] == (out.ctypes.data, 300)
    assert np.allclose(out, x @ w.T + 1.0, atol=1e-3)


@pytest.mark.parametrize("trans_a", [NO_TRANS, TRANS])
def test_a_large_output_goes_through_the_scratch_in_row_chunks(kernel, trans_a):
    """The scratch holds 16 MB at most: 1,100 rows of 4,100 (padded to 4,112) go as 1,020 + 80 rows."""
    rng = np.random.default_rng(8)
    x, w = _random(rng, 1100, 8), _random(rng, 4100, 8)
    stored = x if trans_a == NO_TRANS else np.ascontiguousarray(x.T)
    calls = len(kernel.forwarded)
    out = _misaligned(1100, 4100)
    kernel.gemm(stored, w, out=out, trans_a=trans_a)
    assert [call[3] for call in kernel.forwarded[calls:]] == [1020, 80]
    assert np.allclose(out, x @ w.T, atol=1e-4)


def _bundled_reference_blas() -> str:
    import mlx

    found = sorted(Path(mlx.__path__[0]).parent.glob("mlx_cpu.libs/libblas*.so*"))
    if not found:
        pytest.skip("mlx[cpu]'s bundled BLAS is not where the mlx-cpu wheel puts it")
    return str(found[0])


MLX_MATMULS = """
import ctypes
import openelm_mlx
openelm_mlx.use_optimized_blas()
import mlx.core as mx, numpy as np
from openelm_mlx import blas
w = mx.random.normal((300, 512), key=mx.random.key(0))
rows = [mx.random.normal((m, 512), key=mx.random.key(m)) for m in (1, 2, 8, 16, 40)]
outs = [x @ w.T for x in rows]
mx.eval(outs)
exact = [np.array(x).astype(np.float64) @ np.array(w).astype(np.float64).T for x in rows]
err = max(float(np.abs(np.array(o) - e).max()) for o, e in zip(outs, exact))
calls = [ctypes.c_long(), ctypes.c_long()]
if blas._kernel:
    ctypes.CDLL(blas._kernel).openelm_gemm_counts(*map(ctypes.byref, calls))
print(err < 1e-3, 'small_gemm' in blas.describe_blas(), blas.optimized_blas(), *(c.value for c in calls))
"""


@needs_kernel
def test_use_optimized_blas_puts_the_kernel_in_front_of_the_blas():
    """End to end through MLX, with mlx's own bundled BLAS named as the library (no MKL needed): the
    kernel takes MLX's few-row matmuls, the BLAS the rest, results match float64; off, it is left out."""
    reference = _bundled_reference_blas()
    on = run_with_blas_env(MLX_MATMULS, **{blas.ENV_VAR: reference}).split()
    assert on[:3] == ["True", "True", "False"]  # exact, described, and a reference BLAS is still no optimized one
    assert on[3:] == ["3", "2"]  # 2, 8 and 16 rows by the kernel; 1 and 40 rows handed to the BLAS
    off = run_with_blas_env(MLX_MATMULS, **{blas.ENV_VAR: reference, blas.KERNEL_ENV_VAR: "off"}).split()
    assert off == ["True", "False", "False", "0", "0"]
