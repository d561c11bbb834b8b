"""Write the MLX output directory atomically: a hidden directory beside OUT, renamed into place on success.

A conversion that fails or is interrupted leaves no OUT; one that is killed outright leaves only its
hidden `.OUT.partial-PID` directory, which the next conversion to the same OUT removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import INDEX_FILE
from openelm_mlx.tokenizer import TOKENIZER_FILE

from .hf_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_JSON_FILE

DEFAULT_SHARD_GB = 5.0  # mlx-lm's shard size
SAFETENSORS_METADATA = {"format": "mlx"}
REPORT_FILE = "quantization_report.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
# Every name the converter writes (plus model-0000i-of-0000n.safetensors shards): what --force may replace.
OUTPUT_FILES = {"config.json", SINGLE_WEIGHTS_FILE, INDEX_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                TOKENIZER_JSON_FILE, REPORT_FILE}


class OutputExistsError(OpenELMError):
    """OUT exists and --force was not given, or --force may not replace what is there."""


class AtomicDirectory:
    """`with AtomicDirectory(out, force=...) as tmp:` write into tmp; OUT appears only if the block succeeds.

    --force replaces only an empty directory or an earlier conversion output (see `is_conversion_output`);
    anything else at OUT is refused before any work, and nothing is touched.
    """

    def __init__(self, out: Path, *, force: bool, source: Optional[Path] = None):
        """Refuses an existing OUT (without --force, or one --force may not replace) at once, before any
        slow work. `source`: the local checkpoint being converted, which OUT may neither be nor contain."""
        self.given = Path(out)
        self.out = absolute_path(out)
        self.source = absolute_path(source) if source is not None else None
        self.force = force
        self.tmp: Optional[Path] = None
        self._check_free()

    def _check_free(self) -> None:
        if not os.path.lexists(self.out):
            return
        if not self.force:
            raise OutputExistsError(f"{self.given} already exists: choose another OUT, or pass --force to replace it")
        refusal = self._why_not_replaceable()
        if refusal:
            raise OutputExistsError(f"--force will not replace {self.given}: {refusal}; choose another OUT")

    def _why_not_replaceable(self) -> Optional[str]:
        out = self.out
        if out.is_symlink() or not out.is_dir():
            return "it is not a directory"
        protected = [(Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")]
        if self.source is not None:
            protected.append((self.source, "the source checkpoint"))
        for path, what in protected:
            if out == path:
                return f"it is {what}"
            if out in path.parents:
                return f"it contains {what}"
        if any(out.iterdir()) and not is_conversion_output(out):
            return ("it holds files this converter did not write (only an empty directory or an earlier output "
                    "is replaced)")
        return None

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
        if self.out.exists():  # --force (checked): swap, then delete the old one
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)

    def _remove_stale_partials(self) -> None:
        for path in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def absolute_path(path: Path) -> Path:
    """`path` made absolute with `.` and `..` folded and its parent's symlinks resolved, but not its own
    last component (a symlink at OUT stays a symlink): so `.`, `./x/` and `x/..` all get a real name."""
    folded = Path(os.path.abspath(Path(path).expanduser()))
    return folded if folded == folded.parent else folded.parent.resolve() / folded.name


def is_conversion_output(directory: Path) -> bool:
    """True when every entry of `directory` is a file this converter writes and its config.json is OpenELM's."""
    entries = list(directory.iterdir())
    if not all(entry.is_file() and not entry.is_symlink() and _written_here(entry.name) for entry in entries):
        return False
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "openelm"


def _written_here(name: str) -> bool:
    return name in OUTPUT_FILES or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


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
    names = ([SINGLE_WEIGHTS_FILE] if len(shards) == 1 else
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
