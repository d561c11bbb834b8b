"""`openelm-mlx bench` with speculative decoding on tiny checkpoints: flags, JSON fields, table, errors.

No timing assertions: speeds and costs are only checked to be positive and finite.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from mlx.utils import tree_unflatten

from helpers import random_state_dict, tiny_config, write_hf_checkpoint
from test_cli import run_main
import openelm_mlx as om
from openelm_mlx import ModelArgs
from openelm_mlx.bench import speculation_costs, system
from openelm_mlx.bench.checkpoint import parameter_bytes, synthetic_checkpoint
from openelm_mlx.bench.runner import BenchSettings, measure
from openelm_mlx.synthetic import random_weights

QUICK = ["--prompt-tokens", "6", "--gen-tokens", "9", "--trials", "1", "--warmup", "0", "--dtype", "float32"]
SPECULATIVE_KEYS = {"drafter", "num_draft_tokens", "drafted_tokens", "accepted_tokens", "acceptance_rate",
                    "tokens_per_pass", "verify_cost", "plain_decode_tok_s", "speedup", "same_tokens_as_plain"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny target, and a different tiny model of the same vocabulary as its draft."""
    root = tmp_path_factory.mktemp("bench-spec")
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, vocab_size=320)
    target = write_hf_checkpoint(root / "target", config, random_state_dict(config, seed=3), dtype="float32")
    draft_config = tiny_config(num_layers=1, model_dim=64, head_dim=16, vocab_size=320)
    draft = write_hf_checkpoint(root / "draft", draft_config, random_state_dict(draft_config, seed=5), dtype="float32")
    return target, draft


@pytest.fixture(autouse=True)
def small_copy_probe(monkeypatch):
    monkeypatch.setattr(system, "COPY_PROBE_BYTES", 4 * 1024 * 1024)


def _speculative_rows(rows):
    return [r for r in rows if "speedup" in r]


def test_target_as_its_own_draft_accepts_every_draft(capsys, tiny_dirs, tmp_path):
    target, _ = tiny_dirs
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, ["bench", "--model", str(target), "--draft-model", str(target),
                                       "--num-draft-tokens", "3", *QUICK, "--json", str(out_json)])
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["impl"] for r in rows] == ["openelm-mlx", "openelm-mlx+draft"]
    (r,) = _speculative_rows(rows)
    assert SPECULATIVE_KEYS <= set(r), SPECULATIVE_KEYS - set(r)
    # Greedy, same weights, same dtype: the draft always guesses the target's token. 9 tokens: the
    # prefill's, then two verify passes of 3 accepted drafts + 1 target token each.
    assert r["acceptance_rate"] == 1.0 and r["accepted_tokens"] == r["drafted_tokens"] > 0
    assert r["num_draft_tokens"] == 3 and r["tokens_per_pass"] == 9 / 3  # prefill, then 4 + 4 tokens
    assert r["same_tokens_as_plain"]
    assert math.isfinite(r["verify_cost"]) and r["verify_cost"] > 0
    assert r["speedup"] > 0 and r["plain_decode_tok_s"] == rows[0]["decode_tok_s"]
    assert "speedup x" in out and "(100%)" in out and "verify pass of 4 tokens" in out


def test_draft_model_vs_mlx_lm_in_one_run(capsys, tiny_dirs, tmp_path):
    target, draft = tiny_dirs
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, ["bench", "--model", str(target), "--draft-model", str(draft), "--vs-mlx-lm",
                                       *QUICK, "--json", str(out_json)])
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    impls = [r["impl"] for r in rows]
    assert impls == ["openelm-mlx", "openelm-mlx+draft", "mlx-lm", "mlx-lm+draft",
                     "openelm-mlx/mlx-lm", "openelm-mlx+draft/mlx-lm+draft"], impls
    ours, theirs = _speculative_rows(rows)
    for r in (ours, theirs):
        assert 1 <= r["tokens_per_pass"] <= 1 + r["num_draft_tokens"]
        assert r["same_tokens_as_plain"]  # greedy: speculative output equals plain output
        assert r["drafter"] == f"draft {draft}"
    assert 0 <= ours["acceptance_rate"] <= 1 and ours["num_draft_tokens"] == 2  # the library's default K
    assert theirs["drafted_tokens"] is None and theirs["verify_cost"] is None  # mlx-lm does not report them
    # The rounds' ends differ near max tokens (mlx-lm drafts there where ours stops), so the counts
    # need not be equal; each is bounded by the tokens after the prefill's.
    assert 0 <= theirs["accepted_tokens"] <= 8 and 0 <= ours["accepted_tokens"] <= 8
    assert rows[-1]["same_tokens"] and rows[-1]["decode_ratio"] > 0
    assert "speculative, ours float32 vs mlx-lm float32: decode x" in out


def test_prompt_lookup_on_a_tiny_synthetic_model():
    args = ModelArgs.from_dict(tiny_config(num_layers=2, vocab_size=320))
    checkpoint = synthetic_checkpoint(args, "synthetic tiny")
    settings = BenchSettings(prompt_tokens=8, gen_tokens=12, trials=1, warmup=0, prompt_lookup=2, num_draft_tokens=4)
    repeating = [1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]  # the lookup can always find the last bigram earlier
    plain, spec = measure(checkpoint, settings, dtype="float32", prompt=repeating)
    assert spec.impl == "openelm-mlx+draft" and spec.drafter == "prompt lookup 2" and spec.num_draft_tokens == 4
    trial = spec.trials[0]
    assert trial.tokens == plain.trials[0].tokens
    assert trial.drafted_tokens > 0 and 0 <= trial.accepted_tokens <= trial.drafted_tokens
    assert trial.verify_passes >= 1 and spec.verify_cost > 0


def test_synthetic_draft_says_acceptance_means_nothing(capsys, monkeypatch):
    # Presets too large for a unit test: a tiny architecture behind the name "270M".
    tiny = ModelArgs.from_dict(tiny_config(num_layers=1, vocab_size=320))
    monkeypatch.setattr(ModelArgs, "from_preset", classmethod(lambda cls, size: tiny))
    code, out, err = run_main(capsys, ["bench", "--draft-model", "synthetic:270M", "--prompt-tokens", "4",
                                       "--gen-tokens", "4", "--trials", "1", "--warmup", "0", "--dtype", "float32"])
    assert code == 0, err
    assert "random" in out and "acceptance is near 0" in out and "openelm-mlx+draft" in out


def test_draft_and_prompt_lookup_are_exclusive(capsys):
    code, _, err = run_main(capsys, ["bench", "--draft-model", "x", "--prompt-lookup", "2"])
    assert code == 2 and "not allowed with argument" in err and "Traceback" not in err


def test_draft_with_another_vocabulary_is_a_clear_error(capsys, tiny_dirs, tmp_path):
    target, _ = tiny_dirs
    config = tiny_config(num_layers=1, vocab_size=256)
    other = write_hf_checkpoint(tmp_path / "other", config, random_state_dict(config, seed=1), dtype="float32")
    code, _, err = run_main(capsys, ["bench", "--model", str(target), "--draft-model", str(other), *QUICK])
    assert code == 2 and "vocabulary has 256 tokens but the target's has 320" in err and "Traceback" not in err


def test_adaptive_draft_length_in_the_bench(capsys, tiny_dirs, tmp_path):
    target, _ = tiny_dirs
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, ["bench", "--model", str(target), "--draft-model", str(target),
                                       "--num-draft-tokens", "auto", *QUICK, "--json", str(out_json)])
    assert code == 0, err
    (r,) = _speculative_rows(json.loads(out_json.read_text()))
    # The target drafting for itself accepts all: 9 tokens are the prefill's, 2 + 1, 3 + 1 (K grew), and one
    # from a last pass with no room left to draft.
    assert r["num_draft_tokens"] == "auto" and r["acceptance_rate"] == 1.0 and r["tokens_per_pass"] == 9 / 4
    assert r["drafted_tokens"] == 5
    assert r["verify_cost"] is None and r["same_tokens_as_plain"]  # no single K to time a pass of
    assert "K=auto" in out


def test_adaptive_draft_length_against_mlx_lm_is_a_clear_error(capsys, tiny_dirs):
    target, draft = tiny_dirs
    code, _, err = run_main(capsys, ["bench", "--model", str(target), "--draft-model", str(draft), "--vs-mlx-lm",
                                     "--num-draft-tokens", "auto", *QUICK])
    assert code == 2 and "mlx-lm's speculative decoding drafts a fixed number of tokens" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 0.9, 1.0])
def test_expected_tokens_per_round_is_the_sum_over_accepted_prefixes(rate):
    # A round yields j + 1 tokens when the first j drafts are accepted: E = sum_{j<=k} rate^j.
    for k in range(9):
        assert speculation_costs.expected_tokens(rate, k) == pytest.approx(sum(rate ** j for j in range(k + 1)))


def test_speedups_divide_expected_tokens_by_the_round_cost():
    table = speculation_costs.speedups([1.1, 1.3], 0.1, [0.5])
    assert table[0.5] == pytest.approx([1.5 / (1.1 + 0.1), 1.75 / (1.3 + 0.2)])


@pytest.fixture
def tiny_models():
    """A tiny target and draft (random weights) as our Model."""
    def build(layers, seed):
        model = om.Model(ModelArgs.from_dict(tiny_config(num_layers=layers, vocab_size=320)))
        model.update(tree_unflatten(list(random_weights(model.args, seed=seed).items())))
        mx.eval(model.parameters())
        return model
    return build(3, 0), build(1, 1)


def test_mlx_lm_gets_the_same_arrays_without_a_copy(tiny_models):
    target, _ = tiny_models
    before = mx.get_active_memory()
    theirs = speculation_costs.mlx_lm_sharing(target)
    mx.eval(theirs.parameters())
    assert mx.get_active_memory() - before < parameter_bytes(target) / 10
    ids = mx.array([[1, 7, 9, 11, 4]])
    assert mx.allclose(theirs(ids), target(ids), atol=1e-4)  # the same weights, the same math


def test_measure_costs_times_ours_and_mlx_lm_in_one_run(tiny_models):
    target, draft = tiny_models
    costs = speculation_costs.measure_costs(target, draft, max_k=3, context=8, repeats=1, vs_mlx_lm=True)
    assert list(costs) == ["openelm-mlx", "mlx-lm"]
    for c in costs.values():
        assert len(c["verify"]) == 3
        assert all(math.isfinite(v) and v > 0 for v in (*c["verify"], c["draft_step"], c["step_ms"]))


def test_speculation_costs_command_prints_both_tables(capsys, monkeypatch, tmp_path):
    tiny = ModelArgs.from_dict(tiny_config(num_layers=1, vocab_size=320))
    monkeypatch.setattr(ModelArgs, "from_preset", classmethod(lambda cls, size: tiny))
    out_json = tmp_path / "costs.json"
    assert speculation_costs.main(["--max-k", "4", "--repeats", "1", "--context", "8", "--vs-mlx-lm",
                                   "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "random weights cannot show real ones" in out
    assert out.count("| 4 |") == 1 and out.count("best k") == 2  # k rows; one speedup table per implementation
    record = json.loads(out_json.read_text())
    ours = record["costs"]["openelm-mlx"]
    assert record["target"] == "3B" and record["draft"] == "270M" and len(ours["verify"]) == 4
    assert ours["speedups"]["0.9"] == pytest.approx(
        speculation_costs.speedups(ours["verify"], ours["draft_step"], [0.9])[0.9])
    for rate in ("0.5", "0.7", "0.9"):
        assert f"| {rate} |" in out


@pytest.mark.parametrize("argv, says", [(["--target", "5B"], "unknown size '5B'"),
                                         (["--max-k", "0"], "must be positive"),
                                         (["--rates", "1.5"], "between 0 and 1")])
def test_speculation_costs_bad_options_exit_2(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        speculation_costs.main(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err
