"""Benchmarks (tokens/s, latency, memory). Installed as `openelm_mlx.bench`.

Empty until the benchmark issue lands; the package exists so the layout and its mapping under
the `openelm_mlx` namespace (no top-level `bench` in site-packages) are fixed from the start.
"""
