"""Checkpoints in the formats the converter reads, written the way their own tools write them
(torch.save for pytorch_model.bin and CoreNet .pt, a CoreNet-style YAML), plus malicious pickles.
Nothing here imports openelm_mlx."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np

# CoreNet's own tiny architecture ("gpt-test" in corenet/modeling/models/language_modeling/general_gpt.py):
# 1 layer, model_dim 128, head_dim 64, 1 GQA group, qkv (0.25, 0.5) -> 1 query head, ffn (0.25, 0.75)
# with divisor 256 -> ffn_dim 256; its OpenELM YAMLs use vocab 32128 with padding index 32000.
CORENET_YAML = """\
# pytest: disable

taskname: '+ [gpt-test]'

_anchor_context_length: &_anchor_context_length 512
_anchor_vocab_size: &_anchor_vocab_size 32128
_anchor_padding_index: &_anchor_padding_index 32000

common:
  run_label: "train"
  mixed_precision: true
  mixed_precision_dtype: "bfloat16"

text_tokenizer:
  name: "sentence_piece"
  sentence_piece:
    enable_nfc_normalization: true
    append_sot_token: true
    append_eot_token: true

model:
  activation_checkpointing: false
  language_modeling:
    name: "general_gpt"
    general_gpt:
      model_name: "gpt-test"
      vocab_size: *_anchor_vocab_size
      max_context_length: *_anchor_context_length
      padding_index: *_anchor_padding_index
"""


def corenet_config(vocab_size: int) -> dict:
    """gpt-test as an Apple-style config.json (for the reference and the expected output)."""
    from helpers import tiny_config

    return tiny_config(num_layers=1, model_dim=128, head_dim=64, num_query_heads=[1], num_kv_heads=[1],
                       ffn_multipliers=[0.25], vocab_size=vocab_size, ffn_dim_divisor=256, max_context_length=512,
                       num_gqa_groups=1, qkv_multipliers=[0.25, 0.5])


def torch_tensors(state: Dict[str, np.ndarray], dtype: str):
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return {k: torch.from_numpy(v).to(torch_dtype).contiguous() for k, v in state.items()}


def write_bin_checkpoint(directory: Path, config: dict, state: Dict[str, np.ndarray], *, dtype: str = "float32",
                         shards: int = 1) -> Path:
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json) as save_pretrained(safe_serialization=False)."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    tensors = torch_tensors(state, dtype)
    if shards == 1:
        torch.save(tensors, directory / "pytorch_model.bin")
        return directory
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.array(list(tensors), dtype=object), shards)):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: tensors[k] for k in chunk}, directory / name)
        weight_map.update({k: name for k in chunk})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_corenet_checkpoint(directory: Path, state: Dict[str, np.ndarray], *, dtype: str = "float32",
                             wrap: bool = False) -> Path:
    """A CoreNet *.pt (names without `transformer.`) and its YAML beside it. wrap: a training
    checkpoint dict holding model_state_dict (plus optimizer-free bookkeeping)."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k.removeprefix("transformer."): v for k, v in torch_tensors(state, dtype).items()}
    obj = {"iterations": 1000, "epoch": 0, "model_state_dict": tensors} if wrap else tensors
    torch.save(obj, directory / "checkpoint_last.pt")
    (directory / "openelm_gpt_test.yaml").write_text(CORENET_YAML)
    return directory / "checkpoint_last.pt"


class _RunsCode:
    """Unpickling this with plain pickle creates `marker`: through a shell command (os.system) or
    through Python code (builtins.exec). That is the attack being tested."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        import os

        if self.via == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


def malicious_pickle(marker: Path, via: str = "system") -> bytes:
    return pickle.dumps({"transformer.norm.weight": _RunsCode(marker, via)}, protocol=2)


def malicious_torch_zip(path: Path, marker: Path, via: str = "system") -> Path:
    """A file laid out exactly like torch.save's zip, whose data.pkl would run code."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", malicious_pickle(marker, via))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


def zip_bytes_truncated(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
