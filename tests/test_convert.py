"""`openelm-mlx convert`: every input format against the PyTorch reference, dtypes, quantization
(uniform and mixed) read back by openelm_mlx and by mlx-lm, the quality report, the output layout.

Checkpoints are written by tests/helpers.py and tests/convert_helpers.py with torch (as
save_pretrained / torch.save / CoreNet write them), never by openelm_mlx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import openelm_mlx
from openelm_mlx.cli import main
from openelm_mlx.convert import ConvertOptions, convert
from openelm_mlx.loading import load_model

from convert_helpers import corenet_config, write_bin_checkpoint, write_corenet_checkpoint
from helpers import LLAMA2_TOKENIZER, random_state_dict, tensor_shapes, tiny_config, write_hf_checkpoint
from reference import reference_logits

IDS = [[1, 5, 9, 200, 3, 7, 42, 319, 13, 2, 77, 150]]
# bfloat16 keeps 8 mantissa bits: weights and activations rounded to it move these tiny models'
# logits (|logit| up to 2.9) by at most a few hundredths (measured 0.038).
BF16_ATOL = 0.08


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def state(config):
    return random_state_dict(config, seed=3)


@pytest.fixture(scope="module")
def expected(config, state):
    """float64 PyTorch reference logits."""
    return reference_logits(config, state, IDS)


def rounded(state, dtype="bfloat16"):
    import torch

    torch_dtype = getattr(torch, dtype)
    return {k: torch.from_numpy(v).to(torch_dtype).float().numpy() for k, v in state.items()}


def run_convert(source, out, **options):
    return convert(ConvertOptions(source=str(source), out=Path(out), **options), log=lambda message: None)


def logits_of(out, dtype="float32"):
    model = load_model(Path(out), dtype=dtype)
    return np.array(model(mx.array(IDS)).astype(mx.float32))


# ------------------------------------------------------------------ every input format, float32 exact


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_safetensors_float32(tmp_path, config, state, expected, spm_model, shards):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, shards=shards, tokenizer=spm_model)
    run_convert(source, tmp_path / "out", dtype="float32")
    np.testing.assert_allclose(logits_of(tmp_path / "out"), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_float32(tmp_path, config, state, expected, spm_model, shards):
    source = write_bin_checkpoint(tmp_path / "bin", config, state, shards=shards)
    run_convert(source, tmp_path / "out", dtype="float32", tokenizer=spm_model)
    np.testing.assert_allclose(logits_of(tmp_path / "out"), expected, rtol=0, atol=1e-4)


def test_pytorch_bin_file_as_source(tmp_path, config, state, expected, spm_model):
    source = write_bin_checkpoint(tmp_path / "bin", config, state)
    run_convert(source / "pytorch_model.bin", tmp_path / "out", dtype="float32", tokenizer=spm_model)
    np.testing.assert_allclose(logits_of(tmp_path / "out"), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("writer", ["bin", "safetensors"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_sources_are_read_bit_exactly(tmp_path, config, state, spm_model, writer, dtype):
    # 16-bit storages (torch's BFloat16Storage/HalfStorage, safetensors BF16/F16) widened losslessly.
    write = write_bin_checkpoint if writer == "bin" else write_hf_checkpoint
    source = write(tmp_path / "src", config, state, dtype=dtype)
    run_convert(source, tmp_path / "out", dtype="float32", tokenizer=spm_model)
    params = dict(tree_flatten(load_model(tmp_path / "out", dtype="float32").parameters()))
    for name, value in rounded(state, dtype).items():
        np.testing.assert_array_equal(np.array(params[name]), value, err_msg=name)
    np.testing.assert_allclose(logits_of(tmp_path / "out"), reference_logits(config, rounded(state, dtype), IDS),
                               rtol=0, atol=1e-4)


# ------------------------------------------------------------------ CoreNet


@pytest.fixture(scope="module")
def corenet_state():
    return random_state_dict(corenet_config(32128), seed=5, std=0.05)


@pytest.mark.parametrize("wrap", [False, True])
def test_corenet_checkpoint_drops_padding_rows(tmp_path, corenet_state, wrap):
    checkpoint = write_corenet_checkpoint(tmp_path / "corenet", corenet_state, wrap=wrap)
    messages = []
    convert(ConvertOptions(source=str(checkpoint), out=tmp_path / "out", dtype="float32"), log=messages.append)
    assert any("dropped vocabulary rows 32000..32127" in m for m in messages)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vocab_size"] == 32000 and saved["num_query_heads"] == [1] and saved["max_context_length"] == 512
    trimmed = {k: (v[:32000] if k == "transformer.token_embeddings.weight" else v) for k, v in corenet_state.items()}
    np.testing.assert_allclose(logits_of(tmp_path / "out"), reference_logits(corenet_config(32000), trimmed, IDS),
                               rtol=0, atol=1e-4)


def test_corenet_keep_vocab_padding_and_directory_source(tmp_path, corenet_state):
    checkpoint = write_corenet_checkpoint(tmp_path / "corenet", corenet_state, dtype="bfloat16")
    run_convert(checkpoint.parent, tmp_path / "out", dtype="float32", keep_vocab_padding=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 32128
    np.testing.assert_allclose(logits_of(tmp_path / "out"),
                               reference_logits(corenet_config(32128), rounded(corenet_state), IDS), rtol=0, atol=1e-4)


# ------------------------------------------------------------------ MLX directories as sources


def test_mlx_directory_requantized_and_dequantized(tmp_path, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    run_convert(source, tmp_path / "q4", dtype="float32", bits=4, group_size=32, report=False)
    quantized = logits_of(tmp_path / "q4")
    # Dequantizing an MLX 4-bit directory gives back exactly the weights it holds.
    run_convert(tmp_path / "q4", tmp_path / "plain", dtype="float32")
    assert "quantization" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    np.testing.assert_allclose(logits_of(tmp_path / "plain"), quantized, rtol=0, atol=1e-5)
    # Re-quantizing at 8 bits starts from the dequantized 4-bit weights: close to the 4-bit model.
    run_convert(tmp_path / "q4", tmp_path / "q8", dtype="float32", bits=8, group_size=32, report=False)
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    np.testing.assert_allclose(logits_of(tmp_path / "q8"), quantized, rtol=0, atol=0.05)
    assert (tmp_path / "q8" / "tokenizer.model").is_file()  # carried over from the source directory


# ------------------------------------------------------------------ dtypes


def test_default_output_is_bfloat16_within_tolerance(tmp_path, config, state, expected, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    run_convert(source, tmp_path / "out")
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.bfloat16}
    np.testing.assert_allclose(logits_of(tmp_path / "out", dtype="bfloat16"), expected, rtol=0, atol=BF16_ATOL)


def test_float16_output(tmp_path, config, state, expected, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    run_convert(source, tmp_path / "out", dtype="float16")
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.float16}


def sparse_checkpoint(directory: Path, preset: str) -> Path:
    """A real-size checkpoint whose data is a hole in a sparse file: headers are real, nothing is read."""
    from openelm_mlx.config import ModelArgs  # only to size the header; the test checks the refusal

    args = ModelArgs.from_preset(preset)
    shapes = tensor_shapes(args.to_dict())
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    (directory / "config.json").write_text(json.dumps(args.to_dict()))
    return directory


def test_float16_refused_for_3b_unless_forced(tmp_path):
    source = sparse_checkpoint(tmp_path / "3b", "3B")
    with pytest.raises(openelm_mlx.ConfigError, match="float16 is refused.*65504"):
        run_convert(source, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ quantization


def test_uniform_quantization_layout_report_and_kl(tmp_path, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    report = run_convert(source, tmp_path / "out", bits=4, group_size=32)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "openelm"
    assert saved["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert len(saved["num_query_heads"]) == config["num_transformer_layers"]  # expanded per-layer lists
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "mlx"}
    assert "transformer.token_embeddings.scales" in header  # the tied embedding is quantized too
    assert "transformer.layers.0.attn.q_norm.scales" not in header

    on_disk = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    (text,) = report["texts"]
    assert text["text"] == "built-in" and text["tokens"] > 100
    assert 0 < text["mean_kl"] < 0.05  # 4-bit on a random tiny model: small but not zero
    assert 0.5 < text["top1_agreement"] <= 1.0  # flat random-weight distributions: far above chance (1/320)
    assert report["parameters"] == openelm_mlx.ModelArgs.from_dict(config).num_parameters()
    assert report["bytes"] == sum(v.nbytes for v in mx.load(str(tmp_path / "out" / "model.safetensors")).values())
    assert 4.5 < report["bits_per_weight"] < 6  # 4 bits + 1 for scales at group 32, plus 16-bit norms

    model, _ = openelm_mlx.load(tmp_path / "out", dtype="float32")
    assert isinstance(model.transformer.token_embeddings, nn.QuantizedEmbedding)
    logits = model(mx.array(IDS)).astype(mx.float32)
    reference = mx.array(reference_logits(config, state, IDS), dtype=mx.float32)
    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean().item()
    assert kl < 0.05


def test_eight_bits_beat_four(tmp_path, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    kl = {bits: run_convert(source, tmp_path / f"q{bits}", bits=bits, group_size=32)["texts"][0]["mean_kl"]
          for bits in (4, 8)}
    assert kl[8] < kl[4] / 20


def test_calibration_file_adds_a_report_row(tmp_path, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("Once upon a time there was a model. Hello world! " * 5)
    report = run_convert(source, tmp_path / "out", bits=4, group_size=32, calibration_file=calibration)
    assert [t["text"] for t in report["texts"]] == ["built-in", "calib.txt"]


def test_no_report_without_tokenizer_and_with_no_report(tmp_path, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    assert run_convert(source, tmp_path / "out", bits=4, group_size=32) is None
    assert not (tmp_path / "out" / "quantization_report.json").exists()
    assert not (tmp_path / "out" / "tokenizer.model").exists()


# ------------------------------------------------------------------ mixed recipe, read by both loaders


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, config, state, spm_model):
    root = tmp_path_factory.mktemp("mixed")
    source = write_hf_checkpoint(root / "hf", config, state, tokenizer=spm_model)
    report = run_convert(source, root / "out", dtype="float32", bits=4, group_size=32, recipe="mixed")
    uniform = run_convert(source, root / "uniform", dtype="float32", bits=4, group_size=32)
    return root / "out", report, uniform


@pytest.mark.slow
def test_mixed_recipe_recorded_and_within_budget(mixed_dir):
    out, report, uniform = mixed_dir
    saved = json.loads((out / "config.json").read_text())
    block = saved["quantization"]
    overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
    assert overrides, "the mixed recipe should move bits between modules"
    assert {v["bits"] for v in overrides.values()} <= {3, 5, 6, 8}
    assert saved["quantization_recipe"]["name"] == "mixed"
    assert report["bytes"] <= uniform["bytes"]  # never larger than uniform 4-bit...
    # ...and closer to the unquantized model on the evaluation text (not the one it calibrated on).
    assert report["texts"][0]["mean_kl"] < uniform["texts"][0]["mean_kl"]
    model, _ = openelm_mlx.load(out, dtype="float32")
    modules = dict(model.named_modules())
    for path, spec in overrides.items():
        assert (modules[path].bits, modules[path].group_size) == (spec["bits"], spec["group_size"]), path


@pytest.mark.slow
def test_mixed_output_loads_in_mlx_lm_with_the_same_logits(mixed_dir):
    pytest.importorskip("mlx_lm")
    import mlx_lm

    out, _, _ = mixed_dir
    ours, tokenizer = openelm_mlx.load(out, dtype="float32")
    theirs, their_tokenizer = mlx_lm.load(str(out))  # model and tokenizer, as users call it
    ids = mx.array([tokenizer.encode("Hello world")])
    assert their_tokenizer.encode("Hello world") == tokenizer.encode("Hello world")  # BOS added by both
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), rtol=0, atol=1e-4)
    their_modules = dict(theirs.named_modules())
    for path, module in ours.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            assert (their_modules[path].bits, their_modules[path].group_size) == (module.bits, module.group_size)


def test_recipe_puts_bits_where_the_measured_error_is(monkeypatch):
    # The allocation alone, on made-up sensitivities: the most sensitive module gets the most bits,
    # and the total never exceeds uniform 4-bit.
    from openelm_mlx.convert import recipe
    from openelm_mlx.convert.quantize import QuantSpec

    sizes = {"a": 1000, "b": 1000, "c": 1000, "d": 4000}
    sens = {"a": 1.0, "b": 0.01, "c": 0.001, "d": 0.002}

    class Weight:
        def __init__(self, n):
            self.size = n

    monkeypatch.setattr(recipe, "_sensitivities", lambda *a, **k: sens)
    monkeypatch.setattr(recipe, "_weight", lambda model, m: Weight(sizes[m]))
    default = QuantSpec(4, 64)
    result = recipe.mixed_plan(None, [1, 2], {m: default for m in sizes}, default=default, dtype=mx.bfloat16)
    bits = {m: s.bits for m, s in result.plan.items()}
    assert bits["a"] == 8 and bits["a"] > bits["b"] >= bits["c"]
    assert sum(sizes[m] * b for m, b in bits.items()) <= 4 * sum(sizes.values())


# ------------------------------------------------------------------ output layout


def test_sharded_output_loads_everywhere(tmp_path, config, state, spm_model, expected):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    run_convert(source, tmp_path / "out", dtype="float32", max_shard_gb=40_000 / (1 << 30))  # ~40 kB shards
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(logits_of(tmp_path / "out"), expected, rtol=0, atol=1e-4)
    pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(tmp_path / "out")
    np.testing.assert_allclose(np.array(theirs(mx.array(IDS))), expected, rtol=0, atol=1e-4)


def test_tokenizer_shipped_with_bos_config(tmp_path, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    run_convert(source, tmp_path / "out", tokenizer=spm_model)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_eos_token"] is False


def test_cli_subcommand_and_progress(tmp_path, config, state, spm_model, capsys):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    assert main(["convert", str(source), str(tmp_path / "out"), "--bits", "4", "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "converting: 1/" in err and f"converting: {len(state)}/{len(state)} tensors" in err
    assert "quality report" in err and "mean KL" in err
    assert (tmp_path / "out" / "quantization_report.json").is_file()


@pytest.mark.slow
def test_conversion_imports_neither_torch_nor_mlx_lm(tmp_path, config, state, spm_model):
    # A .bin source with quantization and a report: the widest code path, in a fresh interpreter.
    source = write_bin_checkpoint(tmp_path / "bin", config, state, dtype="bfloat16")
    argv = ["convert", str(source), str(tmp_path / "out"), "--bits", "4", "--group-size", "32",
            "--recipe", "mixed", "--tokenizer", str(spm_model)]
    code = (f"import sys; from openelm_mlx.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'mlx_lm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == ["0", "False", "False"], run.stderr


# ------------------------------------------------------------------ mlx-lm's flag spellings


def parsed_options(*argv):
    from openelm_mlx.commands import build_parser
    from openelm_mlx.convert.cli import options_from_args

    return options_from_args(build_parser().parse_args(["convert", *argv]))


@pytest.mark.parametrize("ours,theirs", [
    (["src", "out"], ["--hf-path", "src", "--mlx-path", "out"]),
    (["src", "out"], ["src", "--mlx-path", "out"]),
    (["src", "out", "--bits", "4"], ["--hf-path", "src", "--mlx-path", "out", "-q"]),
    (["src", "out", "--bits", "4"], ["src", "out", "--quantize"]),
    (["src", "out", "--bits", "8"], ["src", "out", "-q", "--q-bits", "8"]),
    (["src", "out", "--bits", "3", "--group-size", "32"], ["src", "out", "--q-bits", "3", "--q-group-size", "32"]),
    (["src", "out", "--bits", "4", "--group-size", "128"], ["--hf-path", "src", "--mlx-path", "out", "-q",
                                                            "--q-group-size", "128"]),
])
def test_mlx_lm_spellings_give_the_same_settings(ours, theirs):
    assert parsed_options(*theirs) == parsed_options(*ours)


def test_mlx_lm_quantize_flag_without_bits_uses_the_default_bits():
    assert parsed_options("src", "out").bits is None
    assert parsed_options("src", "out", "-q").bits == 4  # mlx-lm's default
    assert parsed_options("src", "out", "-q").group_size == parsed_options("src", "out").group_size == 64


@pytest.mark.parametrize("argv,says", [
    (["src", "out", "--hf-path", "other"], "SOURCE was given twice"),
    (["src", "out", "--mlx-path", "other"], "OUT was given twice"),
    (["--mlx-path", "out"], "SOURCE is missing"),
    (["--hf-path", "src"], "OUT is missing"),
])
def test_source_or_out_given_twice_or_never_is_one_clear_line(capsys, argv, says):
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


def test_mlx_lm_spellings_convert(tmp_path, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    argv = ["--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "-q", "--q-group-size", "32", "--no-report"]
    assert main(["convert", *argv]) == 0
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 32)


# ------------------------------------------------------------------ the shipped tokenizer files vs our runtime's ids

needs_llama2 = pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="shared Llama-2 tokenizer absent")
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."}
CONVERSATIONS = {
    "one turn": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "several turns": [SYSTEM, {"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris, on the Seine."},
                      {"role": "user", "content": "And of Italy? Keep it short:\none word, please."}],
    "no system prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                         {"role": "user", "content": "Tell me a joke about café owners."}],
    # Runs of spaces: Hugging Face's own conversion of tokenizer.model splits "a  b" as "a ▁▁ b", SentencePiece
    # as "a ▁ ▁b"; the shipped tokenizer.json ranks the merges as SentencePiece does.
    "code with indentation": [SYSTEM, {"role": "user", "content": "Fix this:\ndef f(x):\n    return x  +  1"}],
}


@pytest.fixture(scope="module")
def converted_llama2(tmp_path_factory):
    """A tiny Instruct-named checkpoint with the real Llama-2 tokenizer, converted (unquantized), and a base one."""
    config = tiny_config(num_layers=1, vocab_size=32000)
    state = random_state_dict(config, seed=5)
    root = tmp_path_factory.mktemp("llama2")
    outs = {}
    for name in ("OpenELM-tiny-Instruct", "OpenELM-tiny"):
        source = write_hf_checkpoint(root / name, config, state)
        outs[name] = root / f"{name}-mlx"
        run_convert(source, outs[name], tokenizer=LLAMA2_TOKENIZER, dtype="float32")
    return outs


@pytest.fixture(scope="module")
def hf_tokenizer(converted_llama2):
    """Hugging Face's tokenizer as read from the Instruct output's own files."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(converted_llama2["OpenELM-tiny-Instruct"]))


@pytest.fixture(scope="module")
def mlx_lm_tokenizer(converted_llama2):
    """The tokenizer `mlx_lm.load` returns for the Instruct output."""
    mlx_lm = pytest.importorskip("mlx_lm")
    return mlx_lm.load(str(converted_llama2["OpenELM-tiny-Instruct"]))[1]


def runtime_ids(messages, add_generation_prompt=True):
    from openelm_mlx.prompt_format import ZEPHYR, conversation_ids
    from openelm_mlx.tokenizer import Tokenizer

    return conversation_ids(Tokenizer(LLAMA2_TOKENIZER), ZEPHYR, messages, add_generation_prompt=add_generation_prompt)


def zephyr_text(messages) -> str:
    """The Zephyr rendering written out by hand (spec section 6), with the generation prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages) + "<|assistant|>\n"


@needs_llama2
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_hugging_face_tokenizer_of_the_output_encodes_chats_as_the_runtime(hf_tokenizer, name):
    # Hugging Face's Llama tokenizer read from the output's own files; </s> in the text is its EOS token.
    messages = CONVERSATIONS[name]
    expected = runtime_ids(messages)
    assert expected.count(2) == len(messages) and expected.count(29871) >= len(messages)  # the ▁ after each EOS
    hf = hf_tokenizer
    assert "Llama" in type(hf).__name__
    assert hf(zephyr_text(messages)).input_ids == expected
    # The chat template renders the same text and ids: as ids, and as text encoded without special tokens.
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>" + zephyr_text(messages)
    assert hf(rendered, add_special_tokens=False).input_ids == expected
    assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == expected
    history = hf.apply_chat_template(messages, add_generation_prompt=False, return_dict=True)["input_ids"]
    assert history == runtime_ids(messages, add_generation_prompt=False)


@needs_llama2
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_mlx_lm_tokenizer_of_the_output_encodes_chats_as_the_runtime(mlx_lm_tokenizer, name):
    messages = CONVERSATIONS[name]
    expected = runtime_ids(messages)
    tokenizer = mlx_lm_tokenizer
    assert tokenizer.encode(zephyr_text(messages)) == expected
    assert tokenizer.has_chat_template
    # mlx_lm.generate's chat path: the template rendered as text, then encoded without special tokens.
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == expected


@needs_llama2
def test_base_model_output_has_no_chat_template_and_plain_text_is_unchanged(converted_llama2):
    # A base model takes raw text (the runtime's default for it), so mlx-lm must not wrap prompts in a chat format.
    transformers = pytest.importorskip("transformers")
    from openelm_mlx.tokenizer import Tokenizer

    base = converted_llama2["OpenELM-tiny"]
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())
    ours, hf = Tokenizer(LLAMA2_TOKENIZER), transformers.AutoTokenizer.from_pretrained(str(base))
    # (Not text that starts with a space: transformers' Llama tokenizer then skips SentencePiece's dummy prefix.)
    for text in ("Hello world", "two\nlines\n\nand a gap", "café 日本 🙂", "x = f(1, 2)\nprint(x)", "a  b",
                 "def f():\n    return 1\n\tpass", "many     spaces   here"):
        assert hf(text).input_ids == ours.encode(text), text


def test_chat_template_errors_on_an_unknown_role():
    jinja2 = pytest.importorskip("jinja2")
    from openelm_mlx.convert.hf_tokenizer import jinja_chat_template
    from openelm_mlx.prompt_format import ZEPHYR

    def raise_exception(message):
        raise ValueError(message)

    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(jinja_chat_template(ZEPHYR))
    with pytest.raises(ValueError, match="roles must be system or user or assistant"):
        template.render(messages=[{"role": "tool", "content": "x"}], bos_token="<s>", raise_exception=raise_exception)
