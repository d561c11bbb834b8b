"""`openelm-mlx eval` and the lm-evaluation-harness model class, offline: a local multiple-choice task
(tests/data/openelm_docs_mc.*) on a tiny random model, checked against accuracies and log-likelihoods
computed directly from plain float32 forwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from helpers import random_state_dict, tiny_config, write_hf_checkpoint  # noqa: E402
from scoring_helpers import direct_log_prob  # noqa: E402
from test_cli import run_main  # noqa: E402
import openelm_mlx as om  # noqa: E402
from openelm_mlx.eval_command import paper_comparison  # noqa: E402
from openelm_mlx.evaluation import OpenELMLM  # noqa: E402
from openelm_mlx.paper import PAPER_TASKS, PAPER_ZERO_SHOT, paper_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = "openelm_docs_mc"
DOCS = [json.loads(line) for line in (REPO / "tests" / "data" / f"{TASK}.jsonl").read_text().splitlines()]
CONTEXT = 160  # above every request of the local task (so none is cut); long texts still reach it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spm_model):
    config = tiny_config(max_context_length=CONTEXT)
    return write_hf_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", config, random_state_dict(config, seed=11),
                               tokenizer=spm_model)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return om.load(checkpoint, dtype="float32")


@pytest.fixture
def offline(monkeypatch):
    """Nothing may reach the hub; the task's data come from the repository."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task YAML names its JSONL relative to the repository root




def harness_encoding(tokenizer, context, continuation):
    """How the harness splits a (context, continuation) pair for a causal model with BOS added:
    encode the whole and the context, the continuation is what the whole has beyond the context."""
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def direct_accuracies(model, tokenizer):
    """acc and acc_norm (log-likelihood over the choice's length in characters) computed directly."""
    hits, norm_hits = [], []
    for doc in DOCS:
        scores = [direct_log_prob(model, *harness_encoding(tokenizer, doc["question"], " " + choice))
                  for choice in doc["choices"]]
        lengths = [float(len(choice)) for choice in doc["choices"]]
        hits.append(int(np.argmax(scores)) == doc["answer"])
        norm_hits.append(int(np.argmax(np.array(scores) / lengths)) == doc["answer"])
    return float(np.mean(hits)), float(np.mean(norm_hits))




@pytest.mark.slow  # the harness's import and its dataset build: ~20 s
def test_harness_accuracy_equals_direct_accuracy(capsys, tmp_path, checkpoint, lm, offline):
    output = tmp_path / "results.json"
    code, out, err = run_main(capsys, ["eval", "--model", str(checkpoint), "--dtype", "float32",
                                  "--include-path", "tests/data", "--tasks", TASK, "--batch-size", "3",
                                  "--output", str(output)])
    assert code == 0, err
    results = json.loads(output.read_text())
    metrics = results["results"][TASK]
    acc, acc_norm = direct_accuracies(*lm)
    assert metrics["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)
    assert results["n-samples"][TASK]["effective"] == len(DOCS)
    # The harness's own table, with our task and its accuracy, is what the command prints.
    assert "|Metric" in out.replace(" ", "") and TASK in out and f"|{acc:.4f}|" in out
    assert "paper" not in out  # a tiny model is not one of Apple's checkpoints


@pytest.mark.slow
def test_limit_and_fewshot_reach_the_harness(capsys, tmp_path, checkpoint, offline):
    output = tmp_path / "results.json"
    code, _, err = run_main(capsys, ["eval", "--model", str(checkpoint), "--include-path", "tests/data",
                                "--tasks", TASK, "--limit", "5", "--num-fewshot", "1", "--output", str(output)])
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["n-samples"][TASK]["effective"] == 5
    assert results["n-shot"][TASK] == 1


def instances(requests, kind="loglikelihood"):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(requests)]


def choice_requests():
    return [(doc["question"], " " + choice) for doc in DOCS[:6] for choice in doc["choices"]] + [
        ("", "Once upon a time"),  # an empty context is scored after BOS
        ("Hello ", "world"),  # the context's trailing space moves to the continuation
    ]


def test_loglikelihood_equals_a_direct_float32_computation(lm):
    model, tokenizer = lm
    harness_lm = OpenELMLM(model, tokenizer, batch_size=4)
    answers = harness_lm.loglikelihood(instances(choice_requests()), disable_tqdm=True)
    for (context, continuation), (log_prob, _) in zip(choice_requests(), answers):
        if context == "":
            context_ids, continuation_ids = [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
        else:
            context_ids, continuation_ids = harness_encoding(tokenizer, context.rstrip(" "),
                                                             context[len(context.rstrip(" ")):] + continuation)
        assert abs(log_prob - direct_log_prob(model, context_ids, continuation_ids)) < 1e-4


@pytest.mark.parametrize("batch_size,share_prefixes", [(1, False), (1, True), (5, True), (32, True), (32, False)])
def test_batching_and_prefix_sharing_do_not_change_loglikelihoods(lm, batch_size, share_prefixes):
    model, tokenizer = lm
    requests = instances(choice_requests())
    reference = OpenELMLM(model, tokenizer, batch_size=1, share_prefixes=False).loglikelihood(requests, True)
    got = OpenELMLM(model, tokenizer, batch_size=batch_size, share_prefixes=share_prefixes).loglikelihood(
        requests, True)
    for (a, greedy_a), (b, greedy_b) in zip(reference, got):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b


def test_long_requests_keep_their_last_tokens(lm):
    """A context longer than the model's is cut from the left, as the harness's HF model does."""
    model, tokenizer = lm
    context = " ".join(doc["question"] for doc in DOCS[:12])
    (log_prob, _), = OpenELMLM(model, tokenizer).loglikelihood(instances([(context, " def")]), True)
    context_ids, continuation_ids = harness_encoding(tokenizer, context, " def")
    assert len(context_ids) + len(continuation_ids) > CONTEXT + 1
    whole = (context_ids + continuation_ids)[-(CONTEXT + 1):]
    expected = direct_log_prob(model, whole[:-len(continuation_ids)], continuation_ids)
    assert abs(log_prob - expected) < 1e-4


def test_loglikelihood_rolling_sums_disjoint_windows(lm):
    model, tokenizer = lm
    texts = ["The quick brown fox.", " ".join(doc["question"] for doc in DOCS[:16])]
    got = OpenELMLM(model, tokenizer, batch_size=2).loglikelihood_rolling(
        instances([(t,) for t in texts], "loglikelihood_rolling"), True)
    for text, total in zip(texts, got):
        tokens = tokenizer.encode(text, add_bos=False)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, tokenizer.bos_id, CONTEXT, 1)]
        assert sum(len(cont) for _, cont in windows) == len(tokens)
        # float32 sums over hundreds of tokens: the tolerance grows with the token count
        assert abs(total - sum(direct_log_prob(model, c, x) for c, x in windows)) < 1e-4 + 1e-6 * len(tokens)
    short = tokenizer.encode(texts[0], add_bos=False)
    assert abs(got[0] - direct_log_prob(model, [tokenizer.bos_id], short)) < 1e-4


def test_generate_until_is_greedy_generate_cut_at_until(lm):
    model, tokenizer = lm
    harness_lm = OpenELMLM(model, tokenizer)
    prompt = "Once upon a time"
    full = om.generate(model, tokenizer, prompt, om.GenerationOptions(max_tokens=12, temperature=0.0)).text
    assert len(full) > 4
    stop = full[3:5]
    (plain, cut) = harness_lm.generate_until(instances([(prompt, {"max_gen_toks": 12}),
                                                        (prompt, {"until": [stop], "max_gen_toks": 12})],
                                                       "generate_until"), True)
    assert plain == full
    assert cut == full[:full.index(stop)]


@pytest.mark.slow  # an unknown name is looked up in the harness's full index (~15,000 tasks, a minute)
def test_unknown_task_is_a_one_line_error(capsys, checkpoint, offline):
    code, out, err = run_main(capsys, ["eval", "--model", str(checkpoint), "--tasks", "no_such_task_xyz"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openelm-mlx eval: error: unknown task no_such_task_xyz"), err
    assert "--include-path" in err


@pytest.mark.parametrize("extra,needle", [
    (["--paper", "--num-fewshot", "5"], "zero-shot"),
    (["--tasks", TASK, "--batch-size", "0"], "--batch-size"),
    (["--tasks", TASK, "--limit", "0"], "--limit"),
    (["--tasks", " , "], "names no task"),
    (["--tasks", TASK, "--include-path", "no/such/dir"], "not a directory"),
])
def test_bad_options_are_one_line_errors(capsys, checkpoint, offline, extra, needle):
    code, out, err = run_main(capsys, ["eval", "--model", str(checkpoint), *extra])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_tasks_and_paper_exclude_each_other(capsys, checkpoint):
    code, _, err = run_main(capsys, ["eval", "--model", str(checkpoint), "--tasks", TASK, "--paper"])
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.slow
def test_offline_hub_task_names_the_dataset_and_include_path(checkpoint, tmp_path):
    """A hub task with the hub unreachable: one line naming the dataset and --include-path. In a fresh
    process, since `datasets` reads HF_DATASETS_OFFLINE when it is imported."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "openelm_mlx.cli", "eval", "--model", str(checkpoint),
                           "--tasks", "arc_easy", "--limit", "2"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("openelm-mlx eval: error: the data of allenai/ai2_arc could not be fetched"), proc.stderr
    assert "--include-path" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,size", [
    ("apple/OpenELM-270M", "270M"), ("apple/OpenELM-1_1B", "1_1B"), ("/models/OpenELM-3B/", "3B"),
    ("OpenELM-450M-4bit", "450M"), ("apple/OpenELM-270M-Instruct", None), ("openelm-docs-target", None),
    ("synthetic:270M", None), ("apple/OpenELM-2700M", None),
])
def test_paper_size_recognises_apple_base_checkpoints(name, size):
    assert paper_size(name) == size


def test_paper_numbers_and_comparison():
    assert PAPER_TASKS == ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
    for size, row in PAPER_ZERO_SHOT.items():
        assert set(row) == set(PAPER_TASKS)
    # The paper's averages (Apple's model cards): the seven numbers must reproduce them.
    averages = {"270M": 54.37, "450M": 57.56, "1_1B": 63.44, "3B": 67.39}
    for size, average in averages.items():
        assert np.mean(list(PAPER_ZERO_SHOT[size].values())) == pytest.approx(average, abs=0.006)
    results = {"results": {"piqa": {"acc,none": 0.7, "acc_norm,none": 0.71}},
               "paper_zero_shot": {"model": "OpenELM-270M", "source": "paper",
                                   "accuracy_percent": {"piqa": 69.75, "sciq": 84.70}}}
    text = paper_comparison(results)
    assert "piqa" in text and "70.00" in text and "71.00" in text and "69.75" in text
    assert [line.split()[1:] for line in text.splitlines() if line.strip().startswith("sciq")] == [["-", "-", "84.70"]]
