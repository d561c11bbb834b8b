"""`python -m openelm_mlx.bench.forward`: its PyTorch stand-in computes our model's logits, and its
timing loop alternates implementations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from helpers import tiny_config
from openelm_mlx import ModelArgs
from openelm_mlx.bench import forward
from openelm_mlx.model import Model
from openelm_mlx.synthetic import random_weights


def test_torch_stand_in_matches_the_model_with_and_without_a_cache():
    import torch

    args = ModelArgs.from_dict(tiny_config())
    model = Model(args)
    model.update(tree_unflatten(list(random_weights(args, seed=3).items())))
    ids = np.random.default_rng(0).integers(0, args.vocab_size, size=(1, 9))
    expected = np.array(model(mx.array(ids)))
    weights = {name: torch.from_numpy(np.array(value)) for name, value in tree_flatten(model.parameters())}
    stand_in = forward._TorchOpenELM(args, weights)
    with torch.inference_mode():
        full = stand_in(torch.from_numpy(ids), [], last_only=False).numpy()
        cache: list = []
        stand_in(torch.from_numpy(ids[:, :6]), cache, last_only=True)
        verify = stand_in(torch.from_numpy(ids[:, 6:]), cache, last_only=False).numpy()
    assert np.abs(full - expected).max() <= 1e-4
    assert np.abs(verify - expected[:, 6:]).max() <= 1e-4


def test_mlx_workloads_include_the_one_token_step_and_run():
    model = Model(ModelArgs.from_dict(tiny_config()))
    workloads = forward.mlx_workloads(model, prefill=[5], verify=[3], context=4)
    assert sorted(workloads["verify"]) == [1, 3] and list(workloads["prefill"]) == [5]
    for run in (*workloads["prefill"].values(), *workloads["verify"].values()):
        run()


def test_measure_interleaved_alternates_and_formats():
    calls = []
    workloads = {impl: {"prefill": {8: lambda impl=impl: calls.append((impl, "p"))},
                        "verify": {1: lambda impl=impl: calls.append((impl, 1)),
                                   2: lambda impl=impl: calls.append((impl, 2))}} for impl in ("a", "b")}
    timings = forward.measure_interleaved(workloads, repeats=2)
    warmup = 6
    assert calls[warmup:warmup + 4] == [("a", "p"), ("b", "p"), ("a", "p"), ("b", "p")]
    assert len(calls) == warmup + 2 * 6
    assert set(timings) == {"a", "b"} and set(timings["a"]["verify"]) == {1, 2}
    table = forward.format_tables(timings)
    assert "| 8 |" in table and "(1.00x)" in table
