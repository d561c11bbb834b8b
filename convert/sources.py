"""Find out what a SOURCE is and list its tensors lazily, in Apple's HF names, checked against the config.

Formats: Apple's HF safetensors (single or sharded), pytorch_model.bin (single or sharded), CoreNet
*.pt with its YAML, and MLX directories (mlx-lm / mlx-community, quantized or not). Nothing is read
beyond headers here; each tensor is read when its `load()` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from openelm_mlx.config import ModelArgs
from openelm_mlx.errors import LoadError
from openelm_mlx.loading import HUB_FILES, INDEX_FILE, indexed_files, read_json_object, resolve_model_dir
from openelm_mlx.model import Model

from . import corenet
from .safe_pickle import PickledTensor, read_torch_zip
from .safetensors_io import read_header

BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# A hub repo may hold only PyTorch weights: fetch those too (they are read without unpickling code).
CONVERT_HUB_FILES = HUB_FILES + ["pytorch_model*.bin", BIN_INDEX_FILE]
YAML_SUFFIXES = (".yaml", ".yml")


class TensorRef(Protocol):
    shape: Tuple[int, ...]

    def load(self) -> mx.array: ...


@dataclass
class _RowSlice:
    """The first `rows` rows of a tensor (CoreNet's padded vocabulary trimmed)."""

    inner: TensorRef
    rows: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.rows, *self.inner.shape[1:])

    def load(self) -> mx.array:
        return self.inner.load()[: self.rows]


@dataclass
class _Dequantized:
    """An MLX-quantized weight, dequantized on load (for re-quantizing or changing dtype)."""

    weight: TensorRef
    scales: TensorRef
    biases: TensorRef
    shape: Tuple[int, ...]
    group_size: int
    bits: int

    def load(self) -> mx.array:
        return mx.dequantize(self.weight.load(), self.scales.load(), self.biases.load(),
                             group_size=self.group_size, bits=self.bits)


@dataclass
class Source:
    """A checkpoint ready to convert: its config, its tensors (lazy) and where they came from."""

    kind: str  # "safetensors", "pytorch-bin", "corenet", "mlx"
    path: Path
    args: ModelArgs
    tensors: Dict[str, TensorRef]
    origins: Dict[str, Path]  # tensor name -> file, for error messages
    model_dir: Optional[Path] = None  # where a tokenizer may be found
    notes: List[str] = field(default_factory=list)

    @property
    def source_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.origins.values()))


def open_source(source: str | Path, *, config: Optional[Path] = None, keep_vocab_padding: bool = False) -> Source:
    """Detect SOURCE's format (directory, file or hub repo id) and list its tensors, validated."""
    path = Path(source).expanduser()
    if config is not None and not Path(config).is_file():
        raise LoadError(f"no such config file: {config}")
    if path.is_file():
        return _open_file(path, config, keep_vocab_padding)
    if not path.is_dir():
        path = resolve_model_dir(str(source), allow_patterns=CONVERT_HUB_FILES)
    return _open_dir(path, config, keep_vocab_padding)


def _open_file(path: Path, config: Optional[Path], keep_padding: bool) -> Source:
    if path.suffix == ".safetensors":
        tensors, origins, metadata = _safetensors_tensors([path])
        return _hf_or_mlx(path, path.parent, _config_beside(path, config), tensors, origins, metadata)
    if path.suffix == ".bin":
        tensors, origins = _torch_tensors([path])
        return _finish("pytorch-bin", path, path.parent, _config_beside(path, config), tensors, origins)
    if path.suffix in (".pt", ".pth"):
        return _corenet(path, config or _find_yaml(path.parent), keep_padding)
    raise LoadError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin, or a CoreNet .pt "
                    "with its YAML)")


def _open_dir(path: Path, config: Optional[Path], keep_padding: bool) -> Source:
    safetensors = indexed_files(path, INDEX_FILE, "model*.safetensors")
    if safetensors:
        tensors, origins, metadata = _safetensors_tensors(safetensors)
        return _hf_or_mlx(path, path, _config_beside(path / "config.json", config), tensors, origins, metadata)
    bins = indexed_files(path, BIN_INDEX_FILE, "pytorch_model*.bin")
    if bins:
        tensors, origins = _torch_tensors(bins)
        return _finish("pytorch-bin", path, path, _config_beside(path / "config.json", config), tensors, origins)
    checkpoints = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    if len(checkpoints) == 1:
        return _corenet(checkpoints[0], config or _find_yaml(path), keep_padding)
    if len(checkpoints) > 1:
        raise LoadError(f"{path} holds several .pt checkpoints ({', '.join(p.name for p in checkpoints)}): "
                        "pass the one to convert as SOURCE")
    raise LoadError(f"{path} holds no checkpoint: expected model*.safetensors, pytorch_model*.bin, or a CoreNet "
                    ".pt with its YAML")


def _safetensors_tensors(files: List[Path]):
    tensors, origins, metadata = {}, {}, {}
    for file in files:
        found, meta = read_header(file)
        metadata.update(meta)
        _merge(tensors, origins, found, file)
    return tensors, origins, metadata


def _torch_tensors(files: List[Path]):
    tensors, origins = {}, {}
    for file in files:
        state = read_torch_zip(file)
        if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
            state = state["model_state_dict"]  # a full training checkpoint: only the weights matter
        if not isinstance(state, dict) or not all(isinstance(v, PickledTensor) for v in state.values()):
            raise LoadError(f"{file} does not hold a state dict of tensors")
        _merge(tensors, origins, state, file)
    return tensors, origins


def _merge(tensors: dict, origins: dict, found: dict, file: Path) -> None:
    for name, ref in found.items():
        if name in tensors:
            raise LoadError(f"tensor {name} appears in both {origins[name]} and {file}")
        tensors[name], origins[name] = ref, file


def _config_beside(path: Path, config: Optional[Path]) -> Dict:
    config_path = Path(config) if config is not None else path.parent / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{path.parent} has no config.json: pass --config with the model's config.json")
    return read_json_object(config_path)


def _find_yaml(directory: Path) -> Path:
    found = sorted(p for p in directory.iterdir() if p.suffix in YAML_SUFFIXES)
    if len(found) != 1:
        what = "no YAML config" if not found else f"{len(found)} YAML files"
        raise LoadError(f"{directory} has {what} beside the CoreNet checkpoint: pass --config with the "
                        "training YAML (it names the architecture)")
    return found[0]


def _corenet(path: Path, yaml_path: Path, keep_padding: bool) -> Source:
    if Path(yaml_path).suffix not in YAML_SUFFIXES:
        raise LoadError(f"a CoreNet checkpoint needs its training YAML as --config, got {yaml_path}")
    config, keep_rows = corenet.read_yaml_config(Path(yaml_path), keep_padding=keep_padding)
    raw, origins = _torch_tensors([path])
    tensors, dropped = {}, []
    for name, ref in raw.items():
        new = corenet.hf_name(name)
        if new is None:
            dropped.append(name)
            continue
        tensors[new], origins[new] = ref, origins.pop(name)
    source = _finish("corenet", path, path.parent, config, tensors, origins)
    if dropped:
        source.notes.append(f"skipped {len(dropped)} rotary-embedding buffer(s) (recomputed at run time)")
    if keep_rows is not None and source.args.vocab_size > keep_rows:
        for name in ("transformer.token_embeddings.weight", "lm_head.weight"):
            if name in source.tensors:
                source.tensors[name] = _RowSlice(source.tensors[name], keep_rows)
        source.notes.append(f"dropped vocabulary rows {keep_rows}..{source.args.vocab_size - 1} (CoreNet's padding; "
                            f"the tokenizer has {keep_rows} pieces); --keep-vocab-padding keeps them")
        source.args = ModelArgs.from_dict({**source.args.to_dict(), "vocab_size": keep_rows})
    return source


def _hf_or_mlx(path: Path, model_dir: Path, config: Dict, tensors: Dict, origins: Dict, metadata: Dict) -> Source:
    quantized = {name[: -len(".scales")] for name in tensors if name.endswith(".scales")}
    is_mlx = metadata.get("format") == "mlx" or bool(quantized) or "quantization" in config
    if not quantized:
        return _finish("mlx" if is_mlx else "safetensors", path, model_dir, config, tensors, origins)
    plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    expected = _expected_shapes(ModelArgs.from_dict(plain))
    for module in sorted(quantized):
        parts = [tensors.pop(f"{module}.{p}", None) for p in ("weight", "scales", "biases")]
        if any(p is None for p in parts):
            raise LoadError(f"{origins[module + '.scales']}: quantized module {module} lacks its weight or biases")
        shape = expected.get(module + ".weight")
        if shape is None:
            raise LoadError(f"{origins[module + '.scales']} has tensor {module}.scales, which this config does not have")
        group_size = shape[-1] // parts[1].shape[-1]
        bits = parts[0].shape[-1] * 32 // shape[-1]
        tensors[module + ".weight"] = _Dequantized(*parts, shape=tuple(shape), group_size=group_size, bits=bits)
        origins[module + ".weight"] = origins.pop(module + ".scales")
        origins.pop(module + ".biases", None)
    return _finish("mlx", path, model_dir, plain, tensors, origins)


def _expected_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    # Model(args) only builds lazy arrays: no weights are allocated to read their shapes.
    return {name: tuple(p.shape) for name, p in tree_flatten(Model(args).parameters())}


def _finish(kind: str, path: Path, model_dir: Optional[Path], config: Dict, tensors: Dict, origins: Dict) -> Source:
    args = ModelArgs.from_dict({k: v for k, v in config.items() if k not in ("quantization", "quantization_config")})
    expected = _expected_shapes(args)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise LoadError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs: "
                        f"{', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if extra:
        raise LoadError(f"{path}: tensor(s) the config does not have: "
                        + ", ".join(f"{n} (in {origins[n].name})" for n in extra[:6])
                        + (" ..." if len(extra) > 6 else ""))
    for name, ref in tensors.items():
        if tuple(ref.shape) != expected[name]:
            raise LoadError(f"{origins[name]}: tensor {name} has shape {tuple(ref.shape)} but the config implies "
                            f"{expected[name]}")
    return Source(kind, path, args, tensors, origins, model_dir)
