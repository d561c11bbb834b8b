"""The converter on bad input: malicious pickles run nothing, damaged files and contradicting configs get
one clear line naming the file or tensor (exit 2, no traceback), and OUT is all-or-nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import zipfile

import pytest

from openelm_mlx.cli import main

from convert_helpers import (CORENET_YAML, malicious_pickle, malicious_torch_zip, write_bin_checkpoint, write_corenet_checkpoint,
                             zip_bytes_truncated)
from helpers import random_state_dict, tiny_config, write_hf_checkpoint


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def state(config):
    return random_state_dict(config, seed=7)


def fails(capsys, *argv) -> str:
    """Run `openelm-mlx convert ARGV`; it must fail with exit 2 and one error line. Returns that line."""
    assert main(["convert", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("openelm-mlx convert: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ malicious pickles


@pytest.mark.parametrize("name", ["pytorch_model.bin", "checkpoint.pt"])
@pytest.mark.parametrize("via,global_name", [("system", "posix.system"), ("exec", "__builtin__.exec")])
def test_malicious_torch_zip_is_refused_and_runs_nothing(tmp_path, capsys, config, name, via, global_name):
    marker = tmp_path / "pwned"
    # Sanity: plain pickle WOULD run the payload (so the test below can fail).
    import pickle

    pickle.loads(malicious_pickle(marker, via))
    assert marker.exists()
    marker.unlink()

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.yaml").write_text(CORENET_YAML)
    evil = malicious_torch_zip(tmp_path / name, marker, via)
    line = fails(capsys, evil, tmp_path / "out")
    assert "was refused" in line and global_name in line and "nothing was executed" in line
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out").exists()


def test_legacy_raw_pickle_is_refused_unread(tmp_path, capsys, config):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    line = fails(capsys, tmp_path, tmp_path / "out")
    assert "not a zip-format PyTorch checkpoint" in line and "pytorch_model.bin" in line
    assert not marker.exists()


# ------------------------------------------------------------------ damaged files


def test_truncated_safetensors_names_the_file(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    file = source / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    line = fails(capsys, source, tmp_path / "out")
    assert "model.safetensors is truncated" in line
    assert not (tmp_path / "out").exists()


def test_garbage_safetensors_header(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    data = bytearray((source / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe\x01"
    (source / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors is corrupt" in fails(capsys, source, tmp_path / "out")


def test_truncated_bin_zip_names_the_file(tmp_path, capsys, config, state):
    source = write_bin_checkpoint(tmp_path / "bin", config, state)
    zip_bytes_truncated(source / "pytorch_model.bin")
    line = fails(capsys, source, tmp_path / "out")
    assert "pytorch_model.bin" in line and ("truncated" in line or "corrupt" in line)


def test_corrupted_storage_in_bin(tmp_path, capsys, config, state):
    # A storage entry cut short: found when that tensor is read, named with its file.
    source = write_bin_checkpoint(tmp_path / "bin", config, state)
    path = source / "pytorch_model.bin"
    with zipfile.ZipFile(path) as zf:
        entries = {info.filename: zf.read(info.filename) for info in zf.infolist()}
    storage = next(n for n in entries if "/data/" in n and len(entries[n]) > 1000)
    entries[storage] = entries[storage][:100]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    line = fails(capsys, source, tmp_path / "out")
    assert "pytorch_model.bin" in line and "truncated or corrupt" in line


def test_missing_tensor_is_named(tmp_path, capsys, config, state):
    partial = {k: v for k, v in state.items() if k != "transformer.layers.1.ffn.proj_2.weight"}
    source = write_hf_checkpoint(tmp_path / "hf", config, partial)
    assert "transformer.layers.1.ffn.proj_2.weight" in fails(capsys, source, tmp_path / "out")


def test_extra_tensor_is_named(tmp_path, capsys, config, state):
    import numpy as np

    source = write_bin_checkpoint(tmp_path / "bin", config, {**state, "transformer.layers.9.attn.bias": np.zeros(4, np.float32)})
    line = fails(capsys, source, tmp_path / "out")
    assert "transformer.layers.9.attn.bias (in pytorch_model.bin)" in line


def test_shape_contradicting_config_names_tensor_and_both_shapes(tmp_path, capsys, config, state):
    wrong = dict(config, num_query_heads=[8] + config["num_query_heads"][1:], num_kv_heads=[2] + config["num_kv_heads"][1:])
    source = write_hf_checkpoint(tmp_path / "hf", wrong, state)
    line = fails(capsys, source, tmp_path / "out")
    assert "transformer.layers.0.attn.out_proj.weight has shape (64, 64) but the config implies (64, 128)" in line


def test_corenet_without_yaml(tmp_path, capsys):
    from convert_helpers import corenet_config

    checkpoint = write_corenet_checkpoint(tmp_path / "c", random_state_dict(corenet_config(32128), std=0.05))
    (checkpoint.parent / "openelm_gpt_test.yaml").unlink()
    assert "pass --config with the training YAML" in fails(capsys, checkpoint, tmp_path / "out")


def test_no_checkpoint_at_all(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in fails(capsys, tmp_path / "empty", tmp_path / "out")


def test_hub_repo_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = {}

    def offline(repo_id, **kwargs):
        seen.update(kwargs)
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    line = fails(capsys, "apple/OpenELM-270M", tmp_path / "out")
    assert "Hugging Face Hub is unreachable" in line
    assert "pytorch_model*.bin" in seen["allow_patterns"]  # a .bin-only repo is fetched too


# ------------------------------------------------------------------ OUT is all or nothing


def tree(root) -> dict:
    """Every path under `root` (hidden ones too) with its bytes (None for a directory): to compare before/after."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def refused_untouched(capsys, root, *argv) -> str:
    """`convert ARGV --force` must fail with one line and leave everything under `root` byte-identical."""
    before = tree(root)
    line = fails(capsys, *argv, "--force")
    assert tree(root) == before
    return line


def test_existing_out_refused_unless_force(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    out = tmp_path / "out"
    out.mkdir()
    assert "already exists" in fails(capsys, source, out)
    assert main(["convert", str(source), str(out), "--force"]) == 0  # an empty directory may be replaced
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_force_replaces_an_earlier_output(tmp_path, capsys, config, state, spm_model):
    source = write_hf_checkpoint(tmp_path / "hf", config, state, tokenizer=spm_model)
    out = tmp_path / "out"
    # A sharded, quantized output with a report: every kind of file the converter writes.
    assert main(["convert", str(source), str(out), "--bits", "4", "--group-size", "32",
                 "--max-shard-size", "0.00002"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "quantization_report.json").is_file()
    assert main(["convert", str(source), str(out), "--force", "--dtype", "float32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no hidden leftovers


def test_force_refuses_a_folder_with_other_files(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    out = tmp_path / "some" / "dir"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    line = refused_untouched(capsys, tmp_path, source, out)
    assert "--force will not replace" in line and "did not write" in line
    # An earlier output with one foreign file in it is not an earlier output any more.
    earlier = tmp_path / "earlier"
    assert main(["convert", str(source), str(earlier)]) == 0
    (earlier / "notes.txt").write_text("mine")
    assert "did not write" in refused_untouched(capsys, tmp_path, source, earlier)


def test_force_refuses_a_directory_of_converter_names_that_is_not_openelm(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    out = tmp_path / "llama"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "did not write" in refused_untouched(capsys, tmp_path, source, out)


def test_force_refuses_a_plain_file(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    (tmp_path / "out").write_text("not a directory")
    assert "not a directory" in refused_untouched(capsys, tmp_path, source, tmp_path / "out")


@pytest.fixture
def source_in_cwd(tmp_path, monkeypatch, config, state):
    """A checkpoint at tmp_path/hf, with tmp_path (which also holds an empty `work`) as the current directory."""
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    return source


@pytest.mark.parametrize("cwd,spelling,says", [
    (".", ".", "is the current directory"), (".", "./", "is the current directory"),
    (".", "work/..", "is the current directory"), (".", "./work/../", "is the current directory"),
    ("work", "..", "contains the current directory"),
])
def test_force_refuses_the_current_directory_however_spelled(tmp_path, capsys, monkeypatch, source_in_cwd, cwd, spelling,
                                                            says):
    monkeypatch.chdir(cwd)
    assert says in refused_untouched(capsys, tmp_path, source_in_cwd, spelling)


def test_force_refuses_the_source_and_its_parents(tmp_path, capsys, config, state):
    source = write_hf_checkpoint(tmp_path / "models" / "hf", config, state)
    assert "is the source checkpoint" in refused_untouched(capsys, tmp_path, source, source)
    assert "contains the source checkpoint" in refused_untouched(capsys, tmp_path, source, tmp_path / "models")
    # The source given as a file: its directory is refused too.
    line = refused_untouched(capsys, tmp_path, source / "model.safetensors", source)
    assert "contains the source checkpoint" in line
    # Even when the source is itself an earlier conversion output (converting it in place).
    earlier = tmp_path / "earlier"
    assert main(["convert", str(source), str(earlier)]) == 0
    assert "is the source checkpoint" in refused_untouched(capsys, tmp_path, earlier, earlier, "--bits", "4")


def test_force_refuses_the_home_directory(tmp_path, capsys, monkeypatch, config, state):
    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    assert "is your home directory" in refused_untouched(capsys, tmp_path, source, "~")
    assert "contains your home directory" in refused_untouched(capsys, tmp_path, source, tmp_path / "users")


@pytest.mark.parametrize("spelling", ["new", "./new/", "work/../new", "new/."])
def test_out_spellings_name_the_work_directory_beside_out(tmp_path, source_in_cwd, spelling):
    assert main(["convert", str(source_in_cwd), spelling]) == 0
    assert (tmp_path / "new" / "model.safetensors").is_file()
    assert main(["convert", str(source_in_cwd), spelling, "--force"]) == 0  # and replaced under the same spelling
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "new", "work"]  # no hidden leftovers


def test_failure_midway_leaves_no_out(tmp_path, capsys, config, state):
    source = write_bin_checkpoint(tmp_path / "bin", config, state)
    zip_bytes_truncated(source / "pytorch_model.bin", keep=0.97)  # late storages are cut: fails while converting
    fails(capsys, source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


@pytest.mark.slow
def test_killed_conversion_leaves_no_out(tmp_path, spm_model):
    # A checkpoint big enough that converting it takes a few seconds; SIGKILL after the first tensor.
    config = tiny_config(num_layers=4, model_dim=512, head_dim=64, num_query_heads=[8] * 4, num_kv_heads=[2] * 4,
                         ffn_multipliers=[4.0] * 4, vocab_size=8192, ffn_dim_divisor=256)
    source = write_hf_checkpoint(tmp_path / "hf", config, random_state_dict(config), tokenizer=spm_model)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "openelm_mlx.convert", str(source), str(out), "--bits", "4", "--no-report"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("converting: 1/"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partials) == 1  # the hidden work directory of the killed run...
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # ...removed by the next run


# ------------------------------------------------------------------ index files (one parser: the loader's)


@pytest.mark.parametrize("index,says", [
    ('{"metadata": {}}', "not a valid index"),
    ("{not json", "not a valid index"),
    ("[1, 2]", "not a valid index"),
    ('{"weight_map": ["model.safetensors"]}', "not a valid index"),
    ('{"weight_map": {"transformer.norm.weight": ["model.safetensors"]}}', "not a valid index"),
    ('{"weight_map": {"transformer.norm.weight": 5}}', "must name files in"),
    ('{"weight_map": {"transformer.norm.weight": "../model.safetensors"}}', "must name files in"),
    ('{"weight_map": {"transformer.norm.weight": "model-00009-of-00009.safetensors"}}', "lists shards that are not in"),
])
def test_bad_index_is_the_same_clear_error_for_loader_and_converter(tmp_path, capsys, config, state, index, says):
    from openelm_mlx.errors import LoadError
    from openelm_mlx.loading import load_model

    source = write_hf_checkpoint(tmp_path / "hf", config, state)
    (source / "model.safetensors.index.json").write_text(index)
    with pytest.raises(LoadError) as loader:
        load_model(source)
    line = fails(capsys, source, tmp_path / "out")
    assert says in str(loader.value) and "model.safetensors.index.json" in str(loader.value)
    assert line == f"openelm-mlx convert: error: {loader.value}"


def test_bad_bin_index_names_the_bin_index(tmp_path, capsys, config, state):
    source = write_bin_checkpoint(tmp_path / "bin", config, state, shards=2)
    (source / "pytorch_model.bin.index.json").write_text('{"weight_map": []}')
    line = fails(capsys, source, tmp_path / "out")
    assert "pytorch_model.bin.index.json is not a valid index" in line
