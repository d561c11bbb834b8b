"""`openelm-mlx bench` with speculative decoding on tiny checkpoints: flags, JSON fields, table, errors.

No timing assertions: speeds and costs are only checked to be positive and finite.
"""

from __future__ import annotations

import json
import math

import pytest

from helpers import random_state_dict, tiny_config, write_hf_checkpoint
from test_cli import run_main
from openelm_mlx import ModelArgs
from openelm_mlx.bench import system
from openelm_mlx.bench.checkpoint import synthetic_checkpoint
from openelm_mlx.bench.runner import BenchSettings, measure

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
