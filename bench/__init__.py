"""Benchmarks: prefill/decode tokens/s, time to first token, memory and bandwidth, against mlx-lm
on identical weights. Installed as `openelm_mlx.bench`; the command is `openelm-mlx bench`.

- `checkpoint`: the weights every implementation is given (synthetic, a directory, quantized)
- `runner`: the timing loop (ours and mlx-lm's, trials interleaved) and its settings
- `system`: device, backend, MLX version, BLAS, copy bandwidth
- `report`: JSON records, ratios, the table and the plot
- `sampler`: per-token cost of the samplers against mlx-lm's (`python -m openelm_mlx.bench.sampler`)
"""
