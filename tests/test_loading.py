"""Loading checkpoints: Apple's HF layout (single/sharded, float32/bfloat16), mlx-lm's MLX layout
(plain and 4-bit quantized), dtype handling, and a clear error for every bad input.

Checkpoints are written by tests/helpers.py (torch + safetensors, as save_pretrained does) or by
mlx-lm itself, never by openelm_mlx.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import openelm_mlx
from openelm_mlx import ConfigError, LoadError, Model, ModelArgs, TokenizerNotFoundError
from openelm_mlx import loading
from openelm_mlx.loading import check_float16, load_model

from helpers import DOCS_TARGET, LLAMA2_TOKENIZER, random_state_dict, tiny_config, write_hf_checkpoint

IDS = mx.array([[1, 5, 9, 200, 3, 7, 42, 319, 13, 2]])


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def state(config):
    return random_state_dict(config, seed=1)


def direct_model(config: dict, state: dict, source_dtype=mx.float32) -> Model:
    """The same weights assigned by hand (no file I/O), computing in float32."""
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v).astype(source_dtype).astype(mx.float32)) for k, v in state.items()])
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def reference_logits(config, state):
    return direct_model(config, state)(IDS)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, config, state, spm_model):
    """Apple-layout checkpoints keyed by (dtype, shards), each with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    return {(dtype, shards): write_hf_checkpoint(root / f"{dtype}-{shards}", config, state, dtype=dtype,
                                                 shards=shards, tokenizer=spm_model)
            for dtype in ("float32", "bfloat16") for shards in (1, 3)}


@pytest.fixture
def hf_copy(tmp_path, hf_dirs):
    """A writable copy of the float32 single-file checkpoint, to damage."""
    def copy(key=("float32", 1)):
        return Path(shutil.copytree(hf_dirs[key], tmp_path / "ckpt"))
    return copy


def params(model) -> dict:
    return dict(tree_flatten(model.parameters()))


# ------------------------------------------------------------------ Apple's HF layout


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_float32_logits_equal_direct_assignment(hf_dirs, reference_logits, config, state, shards):
    model, tok = openelm_mlx.load(hf_dirs[("float32", shards)], dtype="float32")
    assert tok.vocab_size == 320
    loaded = params(model)
    assert set(loaded) == {k for k in state}
    for name, value in state.items():
        assert loaded[name].dtype == mx.float32
        np.testing.assert_array_equal(np.array(loaded[name]), value, err_msg=name)
    logits = model(IDS)
    assert logits.shape == (1, IDS.shape[1], config["vocab_size"]) and logits.dtype == mx.float32
    np.testing.assert_array_equal(np.array(logits), np.array(reference_logits))


def test_hf_single_and_sharded_agree(hf_dirs):
    single = load_model(hf_dirs[("float32", 1)], dtype="float32")(IDS)
    sharded = load_model(hf_dirs[("float32", 3)], dtype="float32")(IDS)
    np.testing.assert_array_equal(np.array(single), np.array(sharded))


def test_sharded_checkpoint_really_has_shards(hf_dirs):
    directory = hf_dirs[("float32", 3)]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (directory / "model.safetensors").exists()


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_bfloat16_source_loaded_as_float32(hf_dirs, config, state, shards):
    model = load_model(hf_dirs[("bfloat16", shards)], dtype="float32")
    loaded = params(model)
    for name, value in state.items():
        expected = mx.array(value).astype(mx.bfloat16).astype(mx.float32)
        assert loaded[name].dtype == mx.float32
        assert mx.array_equal(loaded[name], expected).item(), name
    reference = direct_model(config, state, source_dtype=mx.bfloat16)(IDS)
    np.testing.assert_allclose(np.array(model(IDS)), np.array(reference), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["float32", "bfloat16"])
def test_default_dtype_is_bfloat16(hf_dirs, state, source):
    model, _ = openelm_mlx.load(hf_dirs[(source, 1)])
    loaded = params(model)
    assert {v.dtype for v in loaded.values()} == {mx.bfloat16}
    for name, value in state.items():
        assert mx.array_equal(loaded[name], mx.array(value).astype(mx.bfloat16)).item(), name
    logits = model(IDS)
    assert logits.dtype == mx.bfloat16
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_float16_allowed_for_a_small_model(hf_dirs):
    model, _ = openelm_mlx.load(hf_dirs[("bfloat16", 1)], dtype="float16")
    assert {v.dtype for v in params(model).values()} == {mx.float16}
    assert bool(mx.all(mx.isfinite(model(IDS))).item())


def test_unknown_dtype(hf_dirs):
    with pytest.raises(ConfigError, match="'int8'.*bfloat16"):
        load_model(hf_dirs[("float32", 1)], dtype="int8")


def test_load_accepts_str_and_tokenizer_directory(hf_dirs, spm_model):
    model, tok = openelm_mlx.load(str(hf_dirs[("float32", 1)]), dtype="float32", tokenizer=spm_model.parent)
    assert tok.path == spm_model
    assert tok.encode("Hello world")[0] == 1


def test_smaller_tokenizer_than_model_vocab_is_fine(tmp_path, spm_model):
    # CoreNet checkpoints pad the vocab (32128 rows for 32000 pieces).
    config = tiny_config(vocab_size=384)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    model, tok = openelm_mlx.load(tmp_path, tokenizer=spm_model)
    assert (model.args.vocab_size, tok.vocab_size) == (384, 320)


def test_tokenizer_larger_than_model_vocab_rejected(tmp_path, spm_model):
    config = tiny_config(vocab_size=300)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    with pytest.raises(LoadError, match=r"320 pieces.*300.*Llama-2"):
        openelm_mlx.load(tmp_path, tokenizer=spm_model)


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="Llama-2 tokenizer not present")
def test_llama2_tokenizer_with_a_32000_vocab_model(tmp_path):
    config = tiny_config(vocab_size=32000)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config), dtype="bfloat16")
    model, tok = openelm_mlx.load(tmp_path, tokenizer=LLAMA2_TOKENIZER)
    assert tok.vocab_size == model.args.vocab_size == 32000
    ids = tok.encode("Hello world")
    assert ids == [1, 15043, 3186]
    assert model(mx.array([ids])).shape == (1, 3, 32000)


# ------------------------------------------------------------------ MLX layout (mlx-lm / mlx-community)


@pytest.fixture(scope="module")
def mlx_lm_api():
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import openelm as mlx_lm_openelm
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    return mlx_lm_openelm, mlx_lm_load_model, quantize_model, save_config, save_model


def mlx_lm_model(api, config, state, dtype=mx.float32):
    mlx_lm_openelm = api[0]
    model = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in state.items()])
    mx.eval(model.parameters())
    return model


def test_mlx_lm_saved_checkpoint(tmp_path, mlx_lm_api, config, state, reference_logits):
    _, _, _, save_config, save_model = mlx_lm_api
    reference = mlx_lm_model(mlx_lm_api, config, state)
    save_model(tmp_path, reference)
    save_config(dict(config), tmp_path / "config.json")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # mlx-lm writes an index even for one file
    model = load_model(tmp_path, dtype="float32")
    for name, value in state.items():
        np.testing.assert_array_equal(np.array(params(model)[name]), value, err_msg=name)
    logits = model(IDS)
    np.testing.assert_array_equal(np.array(logits), np.array(reference_logits))
    np.testing.assert_allclose(np.array(logits), np.array(reference(IDS)), rtol=0, atol=1e-5)


def test_mlx_single_file_bfloat16(tmp_path, config, state):
    # As mlx-community uploads are often stored: bfloat16, "format": "mlx", config with model_type openelm.
    weights = {k: mx.array(v).astype(mx.bfloat16) for k, v in state.items()}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights, metadata={"format": "mlx"})
    mlx_config = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "torch_dtype")}
    (tmp_path / "config.json").write_text(json.dumps(mlx_config))
    model = load_model(tmp_path, dtype="float32")
    for name, value in weights.items():
        assert mx.array_equal(params(model)[name], value.astype(mx.float32)).item(), name
    model = load_model(tmp_path)
    assert {v.dtype for v in params(model).values()} == {mx.bfloat16}


@pytest.mark.parametrize("group_size", [32, 64])
def test_quantized_mlx_checkpoint_matches_mlx_lm(tmp_path, mlx_lm_api, config, state, spm_model, group_size):
    _, mlx_lm_load_model, quantize_model, save_config, save_model = mlx_lm_api
    reference, qconfig = quantize_model(mlx_lm_model(mlx_lm_api, config, state), dict(config), group_size, 4)
    save_model(tmp_path, reference)
    save_config(qconfig, tmp_path / "config.json")
    shutil.copy(spm_model, tmp_path / "tokenizer.model")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization"]["bits"] == 4 and saved["quantization"]["group_size"] == group_size
    names = set(mx.load(str(tmp_path / "model.safetensors")))
    assert "transformer.token_embeddings.scales" in names and "transformer.token_embeddings.biases" in names

    model, tok = openelm_mlx.load(tmp_path, dtype="float32")  # the tokenizer comes from the directory
    assert tok.path == tmp_path / "tokenizer.model"
    embedding = model.transformer.token_embeddings
    assert isinstance(embedding, nn.QuantizedEmbedding)
    assert (embedding.group_size, embedding.bits) == (group_size, 4)
    assert isinstance(model.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    # Layer 1's FFN width is 160: not a multiple of 64, so mlx-lm leaves its proj_2 unquantized.
    assert isinstance(model.layers[1].ffn.proj_2, nn.QuantizedLinear if group_size == 32 else nn.Linear)
    # Norms are never quantized.
    assert isinstance(model.layers[0].attn.q_norm, nn.RMSNorm)

    logits = model(IDS)
    np.testing.assert_allclose(np.array(logits), np.array(reference(IDS)), rtol=0, atol=1e-5)
    reloaded, _ = mlx_lm_load_model(tmp_path)  # mlx-lm reading the very same files
    np.testing.assert_allclose(np.array(logits), np.array(reloaded(IDS)), rtol=0, atol=1e-5)

    default = load_model(tmp_path)  # scales and biases in the default dtype; packed weights stay uint32
    assert default.transformer.token_embeddings.weight.dtype == mx.uint32
    expected_dtype = loading.DTYPES[loading.default_dtype(quantized=True)]  # float32 on the CPU, else bfloat16
    assert default.transformer.token_embeddings.scales.dtype == expected_dtype
    assert bool(mx.all(mx.isfinite(default(IDS))).item())


def test_quantized_weights_without_quantization_config(tmp_path, mlx_lm_api, config, state):
    _, _, quantize_model, save_config, save_model = mlx_lm_api
    quantized, _ = quantize_model(mlx_lm_model(mlx_lm_api, config, state), dict(config), 32, 4)
    save_model(tmp_path, quantized)
    save_config(dict(config), tmp_path / "config.json")  # the 'quantization' block lost
    with pytest.raises(LoadError, match=r"unexpected tensor.*\.scales.*no 'quantization' block"):
        load_model(tmp_path)


def test_quantization_block_without_scales_loads_plain(tmp_path, hf_dirs):
    # config.json says quantized but no tensor carries .scales: as in mlx-lm, nothing is quantized.
    directory = Path(shutil.copytree(hf_dirs[("float32", 1)], tmp_path / "ckpt"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    model = load_model(directory, dtype="float32")
    assert isinstance(model.transformer.token_embeddings, nn.Embedding)


# ------------------------------------------------------------------ bad inputs: weights


def rewrite(directory: Path, mutate) -> None:
    from safetensors.numpy import load_file, save_file

    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    mutate(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_copy):
    directory = hf_copy()
    rewrite(directory, lambda t: t.pop("transformer.layers.1.attn.k_norm.weight"))
    with pytest.raises(LoadError, match=r"missing 1 tensor.*transformer\.layers\.1\.attn\.k_norm\.weight"):
        load_model(directory)


def test_many_missing_tensors_are_summarised(hf_copy):
    directory = hf_copy()
    rewrite(directory, lambda t: [t.pop(k) for k in list(t) if k.startswith("transformer.layers.2.")])
    with pytest.raises(LoadError, match=r"missing 8 tensor") as info:
        load_model(directory)
    assert "transformer.layers.2.attn.qkv_proj.weight" in str(info.value)


def test_unexpected_tensor_is_named(hf_copy, config):
    directory = hf_copy()
    extra = np.zeros((config["vocab_size"], config["model_dim"]), np.float32)
    rewrite(directory, lambda t: t.update({"lm_head.weight": extra}))
    with pytest.raises(LoadError, match=r"unexpected tensor.*lm_head\.weight"):
        load_model(directory)


def test_tensors_for_more_layers_than_config(hf_copy):
    # A config that lost a layer: the leftover layer's tensors are named.
    directory = hf_copy()
    config = json.loads((directory / "config.json").read_text())
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        config[key] = config[key][:2]
    config["num_transformer_layers"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"unexpected tensor.*transformer\.layers\.2\."):
        load_model(directory)


def test_misshaped_tensor_names_it_and_both_shapes(hf_copy, config):
    directory = hf_copy()
    # Layer 2 has 8 query and 2 kv heads of 16: (8 + 4) * 16 = 192 rows; give it layer 0's 96.
    rewrite(directory, lambda t: t.update({"transformer.layers.2.attn.qkv_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(LoadError, match=r"transformer\.layers\.2\.attn\.qkv_proj\.weight.*\(96, 64\).*\(192, 64\)"):
        load_model(directory)


def test_config_heads_disagreeing_with_tensors(hf_copy):
    # A config edited to other head counts than the checkpoint was saved with.
    directory = hf_copy()
    config = json.loads((directory / "config.json").read_text())
    config["num_query_heads"], config["num_kv_heads"] = [8, 8, 8], [2, 2, 2]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"transformer\.layers\.0\.attn\.(qkv|out)_proj\.weight has shape"):
        load_model(directory)


def test_integer_tensor_where_float_expected(hf_copy, state):
    directory = hf_copy()
    name = "transformer.norm.weight"
    rewrite(directory, lambda t: t.update({name: np.ones(state[name].shape, np.int32)}))
    with pytest.raises(LoadError, match=rf"{name}.*dtype.*int32"):
        load_model(directory)


def test_truncated_safetensors_names_the_file(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors.*truncated"):
        load_model(directory)


def test_garbage_safetensors_names_the_file(hf_copy):
    directory = hf_copy()
    (directory / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(LoadError, match=r"model\.safetensors"):
        load_model(directory)


def test_empty_safetensors_names_the_file(hf_copy):
    directory = hf_copy()
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match=r"model\.safetensors"):
        load_model(directory)


def test_truncated_shard_names_the_shard(tmp_path, hf_dirs):
    directory = Path(shutil.copytree(hf_dirs[("float32", 3)], tmp_path / "ckpt"))
    shard = directory / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LoadError, match=r"model-00002-of-00003\.safetensors"):
        load_model(directory)


def test_index_listing_a_missing_shard(tmp_path, hf_dirs):
    directory = Path(shutil.copytree(hf_dirs[("float32", 3)], tmp_path / "ckpt"))
    (directory / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(LoadError, match=r"model-00003-of-00003\.safetensors") as info:
        load_model(directory)
    assert "index" in str(info.value)


def test_invalid_index(tmp_path, hf_dirs):
    directory = Path(shutil.copytree(hf_dirs[("float32", 3)], tmp_path / "ckpt"))
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(LoadError, match=r"model\.safetensors\.index\.json.*weight_map"):
        load_model(directory)
    (directory / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"model\.safetensors\.index\.json"):
        load_model(directory)


def test_no_safetensors(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="no model.*safetensors") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_pytorch_bin_only_gets_a_hint(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(LoadError, match=r"\.bin/\.pt checkpoints are not loaded directly: convert them"):
        load_model(tmp_path)


# ------------------------------------------------------------------ bad inputs: config, paths, tokenizer


def test_no_config_json(tmp_path, hf_dirs):
    shutil.copy(hf_dirs[("float32", 1)] / "model.safetensors", tmp_path)
    with pytest.raises(LoadError, match="no config.json"):
        openelm_mlx.load(tmp_path)


def test_invalid_json_config(hf_copy):
    directory = hf_copy()
    (directory / "config.json").write_text('{"model_type": "openelm", "model_dim": 64,')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        openelm_mlx.load(directory)


def test_config_json_not_an_object(hf_copy):
    directory = hf_copy()
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        openelm_mlx.load(directory)


def test_config_of_another_model_type(hf_copy):
    directory = hf_copy()
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type.*llama.*openelm"):
        openelm_mlx.load(directory)


def test_missing_tokenizer_explains_where_to_get_one(tmp_path, config, state):
    write_hf_checkpoint(tmp_path, config, state)  # no tokenizer.model, like Apple's repos
    with pytest.raises(TokenizerNotFoundError) as info:
        openelm_mlx.load(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, LoadError)
    assert "tokenizer.model" in message and str(tmp_path) in message
    assert "Llama-2" in message and "meta-llama/Llama-2-7b-hf" in message
    assert "--tokenizer" in message and "tokenizer=" in message


def test_missing_tokenizer_reported_before_the_weights_are_read(tmp_path, config):
    # Only config.json: the missing tokenizer is reported first, without reading (gigabytes of) weights.
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerNotFoundError):
        openelm_mlx.load(tmp_path)


def test_tokenizer_path_that_does_not_exist(hf_dirs, tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(LoadError, match=r"tokenizer not found.*nowhere.*does not exist"):
        openelm_mlx.load(hf_dirs[("float32", 1)], tokenizer=missing)
    # A directory without tokenizer.model in it names the file it looked for.
    with pytest.raises(LoadError, match=r"tokenizer not found.*tokenizer\.model"):
        openelm_mlx.load(hf_dirs[("float32", 1)], tokenizer=tmp_path)


def test_tokenizer_that_is_not_sentencepiece(hf_dirs, tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_text("not a sentencepiece model")
    with pytest.raises(LoadError, match=r"tokenizer\.model.*SentencePiece"):
        openelm_mlx.load(hf_dirs[("float32", 1)], tokenizer=bogus)


@pytest.mark.parametrize("path", ["/nonexistent/openelm-270m", "./no-such-model", "no-such-model-dir", "~/no/such"])
def test_nonexistent_local_path(path):
    with pytest.raises(LoadError, match="no such directory") as info:
        openelm_mlx.load(path)
    assert path in str(info.value)


def test_file_instead_of_directory(hf_dirs):
    with pytest.raises(LoadError, match="is a file.*directory"):
        openelm_mlx.load(hf_dirs[("float32", 1)] / "model.safetensors")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache. huggingface_hub reads its env vars at import time, so the
    already-imported constants are patched too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"), raising=False)
    monkeypatch.chdir(tmp_path)  # so the repo id is not a local directory by accident


def test_hub_repo_id_while_offline(offline_hub):
    with pytest.raises(LoadError) as info:
        openelm_mlx.load("apple/OpenELM-270M")
    message = str(info.value)
    assert "apple/OpenELM-270M" in message
    assert "offline" in message or "HF_HUB_OFFLINE" in message
    assert "local directory" in message


def test_local_looking_relative_path_while_offline(offline_hub):
    # "models/openelm" could be a typo'd local path or a repo id: the error must cover both readings.
    with pytest.raises(LoadError) as info:
        openelm_mlx.load("models/openelm")
    message = str(info.value)
    assert "models/openelm" in message and "local directory" in message


def test_invalid_repo_id_is_reported_as_a_missing_directory(offline_hub):
    with pytest.raises(LoadError, match="no such directory: my models/openelm 270m.*not a valid") as info:
        openelm_mlx.load("my models/openelm 270m")
    assert "download" not in str(info.value)


def _hub_error(cls):
    """An instance of a huggingface_hub HTTP error without a real HTTP response."""
    class Fake(cls):
        def __init__(self):
            Exception.__init__(self, "fake hub error")
    return Fake()


@pytest.mark.parametrize("error,expected", [
    ("RepositoryNotFoundError", r"apple/OpenELM-9B is neither a local directory nor a repo.*huggingface-cli login"),
    ("GatedRepoError", r"apple/OpenELM-9B is gated.*license.*huggingface-cli login"),
    ("ConnectionError", r"could not download apple/OpenELM-9B.*network down.*local directory"),
])
def test_hub_errors_become_load_errors(monkeypatch, tmp_path, error, expected):
    import huggingface_hub
    from huggingface_hub import errors

    def fake_snapshot_download(repo_id, **kwargs):
        assert "*.safetensors" in kwargs["allow_patterns"] and "*.bin" not in kwargs["allow_patterns"]
        if error == "ConnectionError":
            raise ConnectionError("network down")
        raise _hub_error(getattr(errors, error))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match=expected):
        openelm_mlx.load("apple/OpenELM-9B")


def test_hub_download_result_is_loaded(monkeypatch, hf_dirs):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(hf_dirs[("float32", 1)]))
    model, tok = openelm_mlx.load("apple/OpenELM-tiny", dtype="float32")
    assert model.args.num_transformer_layers == 3 and tok.vocab_size == 320


# ------------------------------------------------------------------ float16 and the 3B


def test_float16_refused_for_3b():
    args = ModelArgs.from_preset("3B")
    with pytest.raises(ConfigError, match="float16") as info:
        check_float16(args, mx.float16, force=False)
    assert "bfloat16" in str(info.value) and "force" in str(info.value)
    check_float16(args, mx.float16, force=True)
    check_float16(args, mx.bfloat16, force=False)
    check_float16(args, mx.float32, force=False)


@pytest.mark.parametrize("name", ["270M", "450M", "1_1B"])
def test_float16_allowed_for_smaller_presets(name):
    check_float16(ModelArgs.from_preset(name), mx.float16, force=False)


def test_float16_refused_before_reading_3b_shaped_weights(tmp_path, spm_model):
    # A 3B-wide config (model_dim 3072); no weights needed: the check comes first.
    config = tiny_config(num_layers=1, model_dim=3072, head_dim=128, num_query_heads=[12], num_kv_heads=[3],
                         ffn_multipliers=[0.5], vocab_size=32, ffn_dim_divisor=256)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="float16"):
        load_model(tmp_path, dtype="float16")
    with pytest.raises(ConfigError, match="float16"):
        openelm_mlx.load(tmp_path, dtype="float16", tokenizer=spm_model)
    # Forced, it gets past the check (and stops at the absent weights).
    with pytest.raises(LoadError, match="no model.*safetensors"):
        load_model(tmp_path, dtype="float16", force_float16=True)


# ------------------------------------------------------------------ the trained docs-target model


@pytest.mark.skipif(not (DOCS_TARGET / "model.safetensors").is_file() or not LLAMA2_TOKENIZER.is_file(),
                    reason="docs-target model or Llama-2 tokenizer not present")
def test_docs_target_model_loads():
    model, tok = openelm_mlx.load(DOCS_TARGET, dtype="float32", tokenizer=LLAMA2_TOKENIZER)
    assert model.args.num_parameters() == 12_964_608
    assert sum(v.size for v in params(model).values()) == 12_964_608
    assert {v.dtype for v in params(model).values()} == {mx.float32}
    # Prompt + greedy continuation from the model's README (Apple's code, float32): teacher-forced,
    # every next token must be the argmax (smallest top-1/top-2 margin there: 0.048).
    prompt = tok.encode("The Python interpreter")
    assert prompt == [1, 450, 5132, 26997]
    greedy = [13, 259, 338, 1304, 304, 278, 584, 1990, 18078, 30022, 5269, 29889, 10736, 29889, 2605, 29889,
              2605, 29943, 4995, 29952, 770, 29889, 13, 13, 259, 6317, 1873, 23959, 1057, 29871, 29941, 29889]
    ids = mx.array([prompt + greedy])
    logits = model(ids)
    assert logits.shape == (1, len(prompt) + len(greedy), 32000)
    assert bool(mx.all(mx.isfinite(logits)).item())
    predicted = mx.argmax(logits[0, len(prompt) - 1:-1], axis=-1).tolist()
    assert predicted == greedy
