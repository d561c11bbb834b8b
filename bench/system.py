"""What the benchmark runs on: device, backend, MLX version, BLAS, and the device's copy bandwidth."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..blas import describe_blas

# Copy-bandwidth probe: big enough to leave every cache, small enough for a 2-core laptop-class box.
COPY_PROBE_BYTES = 256 * 1024 * 1024
COPY_PROBE_REPS = 5


@dataclass(frozen=True)
class SystemInfo:
    device: str
    backend: str  # "cpu", "metal" or "cuda"
    mlx_version: str
    blas: str  # Linux CPU only: which BLAS serves MLX's float32 matmuls; "" elsewhere
    copy_bandwidth_gb_s: float  # read + write bytes per second of a large array copy

    def as_dict(self) -> dict:
        return {"device": self.device, "backend": self.backend, "mlx_version": self.mlx_version,
                "blas": self.blas, "copy_bandwidth_gb_s": self.copy_bandwidth_gb_s}


def backend() -> str:
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def device_name() -> str:
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or platform.processor() or "unknown"
    return f"{name} ({backend()})"


def copy_bandwidth(nbytes: Optional[int] = None, reps: int = COPY_PROBE_REPS) -> float:
    """Best-of-`reps` GB/s (bytes read + written) of copying a float32 array of `nbytes`
    (default COPY_PROBE_BYTES) on the device. On MLX's CPU backend the copy runs on one thread."""
    nbytes = nbytes or COPY_PROBE_BYTES
    source = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(source)
    mx.eval(source * 1)  # first touch of the output buffer, which the allocator then reuses
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(source * 1)
        best = min(best, time.perf_counter() - start)
    del source
    mx.clear_cache()
    return 2 * nbytes / best / 1e9


def system_info() -> SystemInfo:
    return SystemInfo(device=device_name(), backend=backend(), mlx_version=mx.__version__,
                      blas=describe_blas() if backend() == "cpu" else "", copy_bandwidth_gb_s=copy_bandwidth())
