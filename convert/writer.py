"""Write the MLX output directory atomically: a hidden directory beside OUT, renamed into place on success.

A conversion that fails or is interrupted leaves no OUT; one that is killed outright leaves only its
hidden `.OUT.partial-PID` directory, which the next conversion to the same OUT removes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import INDEX_FILE
from openelm_mlx.tokenizer import TOKENIZER_FILE

DEFAULT_SHARD_GB = 5.0  # mlx-lm's shard size
SAFETENSORS_METADATA = {"format": "mlx"}


class OutputExistsError(OpenELMError):
    """OUT exists and --force was not given."""


class AtomicDirectory:
    """`with AtomicDirectory(out, force=...) as tmp:` write into tmp; OUT appears only if the block succeeds."""

    def __init__(self, out: Path, *, force: bool):
        """Refuses an existing OUT (without --force) at once, before any slow work."""
        self.out = Path(out)
        self.force = force
        self.tmp: Optional[Path] = None
        self._check_free()

    def _check_free(self) -> None:
        if self.out.exists() and not self.force:
            raise OutputExistsError(f"{self.out} already exists: choose another OUT, or pass --force to replace it")

    def __enter__(self) -> Path:
        self._check_free()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_partials()
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():  # --force: swap, then delete the old one
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def _remove_stale_partials(self) -> None:
        for path in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard(tensors: Dict[str, mx.array], max_bytes: int) -> List[Dict[str, mx.array]]:
    """Split into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: List[Dict[str, mx.array]] = []
    size = 0
    for name in sorted(tensors):
        value = tensors[name]
        if not shards or size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def write_weights(directory: Path, tensors: Dict[str, mx.array], *, max_shard_bytes: int) -> List[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when above the limit."""
    shards = shard(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, part in zip(names, shards):
        mx.save_safetensors(str(directory / name), part, metadata=SAFETENSORS_METADATA)
        weight_map.update({tensor: name for tensor in part})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def write_json(path: Path, data: Dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tokenizer(directory: Path, tokenizer: Path, *, max_context_length: int) -> None:
    """tokenizer.model plus a tokenizer_config.json that says BOS is added (for Hugging Face / mlx-lm)."""
    shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_context_length,
    })
