"""The serving load benchmark on a tiny model: real servers and streaming clients on 127.0.0.1, the
report's fields, and errors counted (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from serving import tiny_chat_checkpoint
from openelm_mlx.bench import serve_load

pytest.importorskip("starlette")

FIELDS = {"server", "concurrency", "requests", "errors", "error_messages", "generated_tokens", "wall_s",
          "aggregate_tok_s", "ratio_to_1", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    """The tiny checkpoint converted as the benchmark does it (tokenizer files for mlx-lm included)."""
    source = tiny_chat_checkpoint(tmp_path_factory.mktemp("load") / "tiny", spm_model)
    return serve_load.prepare_weights(str(source), spm_model, tmp_path_factory.mktemp("load-out") / "model",
                                      "float32")


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.5]
    for q in (0, 50, 95, 100):
        assert serve_load.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert serve_load.percentile([], 50) is None


def test_the_benchmark_reports_every_level_and_counts_errors(model_dir, spm_model, tmp_path):
    texts = serve_load.prompts(spm_model, 4, 8)
    results = serve_load.bench_server(serve_load.OURS, model_dir, [1, 2], texts, 2, 4, "float32", [], tmp_path,
                                      progress=lambda _: None)
    assert [(r.concurrency, r.requests) for r in results] == [(1, 2), (2, 4)]
    for r in results:
        assert set(vars(r)) == FIELDS
        assert r.errors == 0 and r.generated_tokens == r.requests * 4  # EOS banned: every request is whole
        assert r.aggregate_tok_s > 0 and r.ttft_p50_ms <= r.ttft_p95_ms and r.itl_p50_ms <= r.itl_p95_ms
    assert results[0].ratio_to_1 == 1.0 and results[1].ratio_to_1 is not None
    table = serve_load.format_table(results)
    assert table.splitlines()[0].split()[:4] == ["server", "N", "requests", "errors"] and len(table.splitlines()) == 4


def test_failed_requests_are_counted_not_timed(model_dir, tmp_path):
    """A server that answers 400 (max_tokens past the context), and a port where nothing listens."""
    port = serve_load.free_port()
    command = serve_load.server_command(serve_load.OURS, model_dir, port, "float32", 8, [])
    with serve_load.running_server(command, port, tmp_path / "log"):
        bad = {"prompt": "Hello", "max_tokens": 10 ** 6, "stream": True}
        good = {"prompt": "Hello", "max_tokens": 3, "stream": True}
        results = serve_load.run_level(port, [[bad, good], [bad]])
    level = serve_load.summarize("x", 2, results, None)
    assert (level.requests, level.errors, level.generated_tokens) == (3, 2, 3)
    assert level.error_messages and level.error_messages[0].startswith("HTTP 400")
    unreachable = serve_load.stream_completion(serve_load.free_port(), good, timeout=5)
    assert unreachable.error and unreachable.tokens == 0


def test_main_writes_json(model_dir, spm_model, tmp_path, monkeypatch, capsys):
    """The command line end to end (our server only; mlx-lm's is covered by the slow test below)."""
    monkeypatch.setattr(serve_load, "prepare_weights", lambda *a: model_dir)
    out = tmp_path / "load.json"
    code = serve_load.main(["--tokenizer", str(spm_model), "--concurrency", "1", "2", "--requests-per-client", "1",
                            "--prompt-tokens", "8", "--gen-tokens", "3", "--no-mlx-lm", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["concurrency"] for r in data["results"]] == [1, 2] and data["settings"]["gen_tokens"] == 3
    assert "x N=1" in capsys.readouterr().out


@pytest.mark.slow
def test_mlx_lm_server_on_the_same_weights(model_dir, spm_model, tmp_path):
    pytest.importorskip("transformers")
    texts = serve_load.prompts(spm_model, 2, 8)
    results = serve_load.bench_server(serve_load.MLX_LM, model_dir, [1, 2], texts, 1, 3, "float32", [], tmp_path,
                                      progress=lambda _: None)
    assert [r.errors for r in results] == [0, 0], [r.error_messages for r in results]
    assert [r.generated_tokens for r in results] == [3, 6]


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--gen-tokens", "0"], ["--tokenizer", "/no/such/file"]])
def test_bad_arguments_are_one_line(argv, spm_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_load.parse_args(["--tokenizer", str(spm_model), *argv])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
