"""The benchmark end to end on tiny checkpoints: CLI, JSON fields, mlx-lm comparison, errors, plot.

No timing assertions: speeds are only checked to be positive and finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from helpers import LLAMA2_TOKENIZER, random_state_dict, tiny_config, write_hf_checkpoint
from test_cli import run_main
from openelm_mlx import ModelArgs, blas, loading
from openelm_mlx.bench.checkpoint import build_model, quantized, synthetic_checkpoint
from openelm_mlx.bench.runner import PAPER_PROMPT, BenchSettings, measure
from openelm_mlx.errors import InvalidOptionError

REQUIRED_KEYS = {"impl", "model", "dtype", "bits", "prompt_tokens", "gen_tokens", "prefill_tok_s", "decode_tok_s",
                 "ttft_s", "peak_memory_bytes", "weight_bytes", "achieved_bandwidth_gb_s", "copy_bandwidth_gb_s",
                 "bandwidth_fraction", "device", "backend", "mlx_version", "blas", "kv_cache_bytes"}
QUICK = ["--prompt-tokens", "5", "--gen-tokens", "4", "--trials", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Widths divisible by 32 so the 4-bit configuration (group size 32) applies to every matrix.
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, vocab_size=320)
    return write_hf_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", config, random_state_dict(config, seed=3),
                               dtype="bfloat16")


@pytest.fixture(autouse=True)
def small_copy_probe(monkeypatch):
    """A 4 MB copy-bandwidth probe instead of 256 MB: the tests check fields, not figures."""
    from openelm_mlx.bench import system

    monkeypatch.setattr(system, "COPY_PROBE_BYTES", 4 * 1024 * 1024)


def test_cli_vs_mlx_lm_writes_every_field(capsys, tiny_dir, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, ["bench", "--model", str(tiny_dir), *QUICK, "--vs-mlx-lm",
                                       "--dtype", "default", "--dtype", "float32", "--bits", "0", "--bits", "4",
                                       "--group-size", "32", "--json", str(out_json)])
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    measured = [r for r in rows if r["impl"] in ("openelm-mlx", "mlx-lm")]
    ratios = [r for r in rows if "decode_ratio" in r]
    assert len(measured) == 8 and len(ratios) == 4  # 2 dtypes x 2 bit widths x 2 implementations
    for r in measured:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert r["prompt_tokens"] == 5 and r["gen_tokens"] == 4 and r["trials"] == 2
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "achieved_bandwidth_gb_s", "copy_bandwidth_gb_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["prefill_tok_s_min"] <= r["prefill_tok_s"] <= r["prefill_tok_s_max"]
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["weight_bytes"] < r["peak_memory_bytes"]
        assert r["kv_cache_bytes"] > 0
        assert r["checkpoint_dtype"] == "bfloat16" and r["backend"] in ("cpu", "metal", "cuda")
    # The same checkpoint reached both implementations: equal weights at equal dtypes and bits.
    by = {(r["config"], r["impl"]): r for r in measured}
    for (config, impl), r in by.items():
        if impl == "mlx-lm":
            ours = by[(config, "openelm-mlx")]
            assert r["bits"] == ours["bits"]
            if ", float32" in config:
                assert r["dtype"] == ours["dtype"] == "float32"
                assert r["weight_bytes"] == ours["weight_bytes"]
            else:
                assert r["dtype"] == "bfloat16"  # mlx-lm computes in the checkpoint's dtype
                assert ours["dtype"] == loading.default_dtype(quantized=bool(ours["bits"]))
    assert {r["bits"] for r in measured} == {None, 4}
    for r in ratios:
        assert r["decode_ratio"] > 0 and r["prefill_ratio"] > 0
        if ", float32" in r["config"]:
            assert r["same_tokens"], r  # two independent implementations, identical greedy tokens
    assert "decode x" in out and "prefill x" in out and "openelm-mlx" in out and "mlx-lm" in out
    assert "[trial 2/2: mlx-lm]" in err


def test_python_api_on_a_synthetic_tiny_model():
    args = ModelArgs.from_dict(tiny_config(num_layers=2))
    checkpoint = synthetic_checkpoint(args, "synthetic tiny")
    (result,) = measure(checkpoint, BenchSettings(prompt_tokens=6, gen_tokens=3, trials=1, warmup=0), dtype="float32")
    assert result.impl == "openelm-mlx" and result.compute_dtype == "float32"
    trial = result.trials[0]
    assert len(trial.tokens) == 3 and trial.decode_tok_s > 0 and trial.prefill_tok_s > 0
    # Weight bytes are the float32 model's: every parameter, 4 bytes each.
    assert result.weight_bytes == 4 * args.num_parameters()


def test_quantized_checkpoint_keeps_norms_and_quantizes_matrices():
    args = ModelArgs.from_dict(tiny_config(num_layers=2))
    q = quantized(synthetic_checkpoint(args, "tiny"), bits=4, group_size=32)
    assert q.bits == 4 and q.group_size == 32
    assert q.weights["transformer.token_embeddings.weight"].dtype == mx.uint32
    assert "transformer.layers.0.attn.qkv_proj.scales" in q.weights
    assert "transformer.layers.0.attn_norm.scales" not in q.weights
    model = build_model(q, mx.float32)
    assert model.transformer.token_embeddings.scales.dtype == mx.float32


def test_plain_run_prints_a_table_without_mlx_lm(capsys, tiny_dir):
    code, out, err = run_main(capsys, ["bench", "--model", str(tiny_dir), "--prompt-tokens", "3", "--gen-tokens", "2",
                                       "--trials", "1", "--warmup", "0"])
    assert code == 0, err
    assert "openelm-mlx" in out and "mlx-lm " not in out and "decode x" not in out
    assert "copy bandwidth" in out and "MLX " in out


@pytest.mark.parametrize("argv, needle", [
    (["--size", "270M", "--model", "x"], "not both"),
    (["--trials", "0"], "trials must be an integer >= 1"),
    (["--prompt-tokens", "0"], "prompt-tokens must be"),
    (["--gen-tokens", "0"], "gen-tokens must be"),
    (["--json", "/nonexistent/dir/out.json"], "no such directory"),
    (["--num-draft-tokens", "2"], "--num-draft-tokens needs --draft-model or --prompt-lookup"),
    (["--prompt-lookup", "--num-draft-tokens", "0"], "num_draft_tokens must be a positive integer or 'auto'"),
    (["--draft-model", "synthetic:9B"], "unknown size '9B'"),
])
def test_bad_options_are_one_line_errors(capsys, argv, needle):
    code, out, err = run_main(capsys, ["bench", *argv])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openelm-mlx bench: error: ") and needle in err, err


def test_prompt_and_generation_must_fit_the_context(capsys, tiny_dir):
    code, _, err = run_main(capsys, ["bench", "--model", str(tiny_dir), "--prompt-tokens", "2000", "--gen-tokens", "49"])
    assert code == 2 and "2048-token context" in err and "Traceback" not in err


def test_paper_mode_needs_a_tokenizer(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, ["bench", "--paper", "--tokenizer", str(tmp_path / "missing.model")])
    assert code == 2 and "openelm-mlx bench: error:" in err and "Traceback" not in err


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="needs ../shared/data/llama2-tokenizer.model")
def test_paper_prompt_is_36_tokens_with_bos():
    from openelm_mlx import Tokenizer

    ids = Tokenizer(LLAMA2_TOKENIZER).encode(PAPER_PROMPT)
    assert len(ids) == 36 and ids[0] == 1


def test_settings_validate():
    with pytest.raises(InvalidOptionError, match="gen-tokens"):
        BenchSettings(gen_tokens=0)


def test_plot(capsys, tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, _, err = run_main(capsys, ["bench", "--model", str(tiny_dir), "--prompt-tokens", "3", "--gen-tokens", "2",
                                     "--trials", "1", "--warmup", "0", "--vs-mlx-lm", "--plot", str(png)])
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LONG_MODEL = "/Users/someone/models/converted/OpenELM-270M-Instruct-mlx-4bit-group32-with-a-long-suffix"


def plot_rows():
    """Records as `bench` writes them: one configuration measured against mlx-lm (with its ratio row),
    one measured alone, with a long model path."""
    def measured(config, model, impl, dtype, prefill, decode):
        row = {"config": config, "model": model, "impl": impl, "dtype": dtype, "device": "cpu", "mlx_version": "0"}
        for name, (low, median, high) in (("prefill_tok_s", prefill), ("decode_tok_s", decode)):
            row.update({name: median, f"{name}_min": low, f"{name}_max": high})
        return row

    model = "/data/OpenELM-270M"
    return [
        measured(f"{model}, float32", model, "openelm-mlx", "float32", (90, 100, 120), (40, 45, 48)),
        measured(f"{model}, float32", model, "mlx-lm", "bfloat16", (45, 50, 52), (20, 30, 31)),
        {"config": "/data/OpenELM-270M, float32", "impl": "openelm-mlx/mlx-lm", "model": "/data/OpenELM-270M",
         "dtype": "float32", "mlx_lm_dtype": "bfloat16", "decode_ratio": 1.5, "prefill_ratio": 2.0},
        measured(f"{LONG_MODEL} 4-bit g32, float32", LONG_MODEL, "openelm-mlx", "float32", (10, 11, 13), (5, 6, 7)),
    ]


def test_plot_shows_min_max_ratio_dtypes_and_short_labels():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    from openelm_mlx.bench.report import PLOT_LABEL_CHARS, build_plot

    fig = build_plot(plot_rows())
    try:
        prefill, decode = fig.axes
        for ax, metric, ratio in ((prefill, "prefill_tok_s", "x2.00"), (decode, "decode_tok_s", "x1.50")):
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            assert [c.get_label() for c in bars] == ["openelm-mlx (float32)", "mlx-lm (bfloat16)"]
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["openelm-mlx (float32)", "mlx-lm (bfloat16)"]
            # Each bar's height is the median and its error bar spans the trials' min to max.
            expected = {"openelm-mlx": [r for r in plot_rows() if r["impl"] == "openelm-mlx"],
                        "mlx-lm": [r for r in plot_rows() if r["impl"] == "mlx-lm"]}
            for container, impl in zip(bars, ("openelm-mlx", "mlx-lm")):
                # (a configuration the implementation did not run has a NaN bar and an empty segment)
                spans = [sorted(seg[:, 1]) for seg in container.errorbar.lines[2][0].get_segments() if len(seg)]
                assert len(spans) == len(expected[impl])
                for bar, span, row in zip(container.patches, spans, expected[impl]):
                    assert bar.get_height() == pytest.approx(row[metric])
                    assert span == pytest.approx([row[f"{metric}_min"], row[f"{metric}_max"]])
            # The ratio is printed once, over the configuration that has one.
            assert [t.get_text() for t in ax.texts] == [ratio]
            labels = [t.get_text() for t in ax.get_xticklabels()]
            assert labels[0] == "OpenELM-270M\nfloat32"
            name, quant, dtype = labels[1].split("\n")
            assert (quant, dtype) == ("4-bit g32", "float32") and "/" not in name and len(name) == PLOT_LABEL_CHARS
            assert name.startswith("OpenELM-270M-") and "…" in name and name.endswith("-long-suffix")
    finally:
        plt.close(fig)


@pytest.mark.parametrize("name,shown", [
    ("/a/b/OpenELM-270M", "OpenELM-270M"),
    ("/a/b/OpenELM-270M/", "OpenELM-270M"),
    ("apple/OpenELM-3B-Instruct", "OpenELM-3B-Instruct"),
    ("synthetic 270M", "synthetic 270M"),
    ("x" * 10 + "y" * 40, "x" * 10 + "y" * 3 + "…" + "y" * 14),
])
def test_short_model_name(name, shown):
    from openelm_mlx.bench.report import short_model_name

    assert short_model_name(name) == shown


def test_plot_without_matplotlib_is_a_clear_error(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if it were not installed
    code, _, err = run_main(capsys, ["bench", "--model", str(tiny_dir), "--plot", str(tmp_path / "x.png")])
    assert code == 2 and "pip install 'openelm-mlx[plot]'" in err


# ---------------------------------------------------------------------------- BLAS and the default dtype


def test_default_dtype_per_backend(monkeypatch):
    monkeypatch.setattr(loading, "optimized_blas", lambda: True)
    assert loading.default_dtype() == ("float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16")
    monkeypatch.setattr(loading, "optimized_blas", lambda: False)
    assert loading.default_dtype() == "bfloat16"
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert loading.default_dtype(quantized=True) == ("float32" if on_cpu else "bfloat16")


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice is a Linux mlx[cpu] matter")
def test_blas_is_described():
    text = blas.describe_blas()
    assert "BLAS" in text and "/" in text


def run_with_blas_env(code: str, **env: str) -> str:
    """Stdout of `code` in a fresh interpreter, with `env` set and no BLAS thread count of the caller's."""
    environment = {key: value for key, value in os.environ.items() if key not in blas.BLAS_THREAD_VARS}
    environment.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _blas_in_subprocess(setting: str, **extra_env: str) -> str:
    code = ("import openelm_mlx\nopenelm_mlx.use_optimized_blas()\nimport mlx.core as mx\n"
            "from openelm_mlx import blas, loading\n"
            "a = mx.random.normal((64, 48), key=mx.random.key(0)); b = mx.random.normal((48, 32), key=mx.random.key(1))\n"
            "import numpy as np\n"
            "err = float(np.abs(np.array(a @ b) - np.array(a).astype(np.float64) @ np.array(b)).max())\n"
            "print(blas.optimized_blas(), loading.default_dtype(), err < 1e-4, blas.describe_blas(),\n"
            "      blas.blas_threads(), sep='|')\n")
    return run_with_blas_env(code, **{blas.ENV_VAR: setting, **extra_env})


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_reference_setting_keeps_the_bundled_blas():
    optimized, dtype, exact, text, threads = _blas_in_subprocess("reference").split("|")
    assert optimized == "False" and dtype == "bfloat16" and exact == "True" and "reference BLAS" in text
    assert threads == "1"


@pytest.mark.skipif(sys.platform != "linux" or not blas.ctypes.util.find_library("openblas"),
                    reason="needs a system OpenBLAS (apt install libopenblas0-pthread)")
def test_system_openblas_is_used():
    # By name (`auto` prefers MKL when the cpu-blas extra is installed too).
    optimized, dtype, exact, text, _ = _blas_in_subprocess(blas.ctypes.util.find_library("openblas")).split("|")
    assert optimized == "True" and "OpenBLAS" in text and exact == "True"
    assert dtype == "float32"  # float32 is the CPU default once matmuls are fast


@pytest.mark.skipif(sys.platform != "linux" or not blas._installed_mkl(),
                    reason="needs MKL (pip install 'openelm-mlx[cpu-blas]')")
def test_installed_mkl_is_used_automatically():
    optimized, dtype, exact, text, threads = _blas_in_subprocess("auto").split("|")
    assert optimized == "True" and "Math Kernel Library" in text and exact == "True"
    assert dtype == "float32"
    assert threads == "1"  # MKL on one thread; cpu_split spreads the work over CPU streams


@pytest.mark.skipif(sys.platform != "linux" or not blas._installed_mkl(),
                    reason="needs MKL (pip install 'openelm-mlx[cpu-blas]')")
def test_a_thread_count_the_user_set_is_kept():
    *_, exact, text, threads = _blas_in_subprocess("auto", MKL_NUM_THREADS="2").split("|")
    assert "Math Kernel Library" in text and exact == "True" and threads == "2"


@pytest.mark.skipif(sys.platform != "linux" or not blas._installed_mkl(),
                    reason="needs MKL (pip install 'openelm-mlx[cpu-blas]')")
def test_a_thread_count_set_for_the_calling_thread_only_is_not_mlxs():
    """torch.set_num_threads(2) calls MKL's mkl_set_num_threads_local on its thread, and it binds to the MKL
    loaded here: MLX's stream threads still run MKL on one thread, so float32 work is still spread."""
    code = ("import ctypes, openelm_mlx\nopenelm_mlx.use_optimized_blas()\nimport mlx.core as mx\n"
            "from openelm_mlx import blas, cpu_split\n"
            "mkl = ctypes.CDLL(blas._preloaded)\nmkl.MKL_Set_Num_Threads_Local(2)\n"
            "print(mkl.MKL_Get_Max_Threads(), blas.blas_threads(), cpu_split.spread(mx.float32))\n")
    assert run_with_blas_env(code, **{blas.ENV_VAR: "auto"}) == "2 1 True"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_unloadable_blas_path_warns_and_keeps_the_bundled_one(tmp_path):
    env = {**os.environ, blas.ENV_VAR: str(tmp_path / "nope.so")}
    proc = subprocess.run([sys.executable, "-c", "import openelm_mlx; openelm_mlx.use_optimized_blas(); "
                                                 "from openelm_mlx import blas; print(blas.describe_blas())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "reference BLAS" in proc.stdout
    assert "BLASWarning" in proc.stderr and blas.ENV_VAR in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
