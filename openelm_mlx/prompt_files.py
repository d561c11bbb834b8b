"""Prompt cache files: a prefilled KV cache on disk (safetensors), tied to the model that wrote it.

The metadata holds the format, the model's identity (`model_identity`), the compute dtype, the KV
quantization, the token ids and a checksum of the arrays; a file from another model or dtype, or one
that is truncated or altered, is refused with a `PromptCacheFileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import DEFAULT_KEEP, KVCache, QuantizedKVCache
from .errors import OpenELMError
from .generation import GenerationOptions, cache_window, quantized_as_asked
from .model import Model
from .prompt_store import PrefixStore, copy_prefix

FORMAT = "openelm-mlx-prompt-cache/1"
SUFFIX = ".safetensors"
# Values sampled from each weight for the identity: enough to tell trained checkpoints apart, cheap to read.
IDENTITY_SAMPLES = 16


class PromptCacheFileError(OpenELMError):
    """A prompt cache file is missing, corrupt, or was written for another model, dtype or quantization."""


def model_identity(model: Model) -> str:
    """A hex digest of the config, every parameter's name and shape, and a few of its values (upcast to
    float32, so the digest does not depend on the compute dtype; that is checked on its own)."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.args), sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.parameters())):
        digest.update(f"{name}:{tuple(value.shape)}".encode())
        sample = value.reshape(-1)[:IDENTITY_SAMPLES].astype(mx.float32)
        digest.update(np.array(sample).tobytes())
    return digest.hexdigest()


def model_dtype(model: Model) -> str:
    """The compute dtype's name (the final norm is always cast to it)."""
    return _dtype_name(model.transformer.norm.weight.dtype)


def save_prompt_cache(path: str | Path, model: Model, tokens: Sequence[int], cache: List[KVCache], *,
                      force: bool = False) -> Path:
    """Write `cache` (holding exactly `tokens`) to `path` atomically (a temporary file, then a rename);
    an existing file is replaced only with `force`."""
    path = Path(path)
    check_writable(path, force=force)
    first = cache[0]
    if first.size != first.offset or first.offset != len(tokens):
        raise PromptCacheFileError("the cache does not hold exactly the given tokens (a sliding window dropped "
                                   "some): nothing to save")
    arrays = {f"layers.{i}.{j}": part for i, layer in enumerate(cache) for j, part in enumerate(layer.state)}
    mx.eval(list(arrays.values()))
    metadata = {
        "format": FORMAT,
        "model": model_identity(model),
        "dtype": model_dtype(model),
        "kv_bits": str(first.kv_bits or ""),
        "kv_group_size": str(first.kv_group_size or ""),
        "layers": str(len(cache)),
        "tokens": json.dumps([int(t) for t in tokens]),
        "checksum": _checksum(arrays),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{SUFFIX}")
    try:
        mx.save_safetensors(str(temporary), arrays, metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse a file name without the safetensors suffix, and an existing file unless `force`."""
    if path.suffix != SUFFIX:
        raise PromptCacheFileError(f"a prompt cache file name must end in {SUFFIX}, got {path}")
    if path.exists() and not force:
        raise PromptCacheFileError(f"{path} already exists: pass --force to replace it")


def load_prompt_cache(path: str | Path, model: Model,
                      options: GenerationOptions) -> Tuple[List[int], List[KVCache]]:
    """(token ids, cache holding them) from a file `save_prompt_cache` wrote for this model, sized for
    `options` (sliding window); its KV quantization must be the one `options` ask for."""
    path = Path(path)
    if not path.is_file():
        raise PromptCacheFileError(f"no prompt cache file at {path}")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or garbled files
        raise PromptCacheFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                                   f"{_one_line(e)}") from None
    if metadata.get("format") != FORMAT:
        raise PromptCacheFileError(f"{path} is not an openelm-mlx prompt cache file: write one with "
                                   "openelm-mlx cache-prompt")
    if metadata.get("dtype") != model_dtype(model):
        raise PromptCacheFileError(f"{path} was written by a {metadata.get('dtype')} model, but this one runs in "
                                   f"{model_dtype(model)}: load it with --dtype {metadata.get('dtype')}, or "
                                   "rebuild the file")
    if metadata.get("model") != model_identity(model):
        raise PromptCacheFileError(f"{path} was written for another model (its config or weights differ): "
                                   "rebuild it with openelm-mlx cache-prompt for this model")
    try:
        tokens = [int(t) for t in json.loads(metadata["tokens"])]
        bits = int(metadata["kv_bits"]) if metadata["kv_bits"] else None
        group_size = int(metadata["kv_group_size"]) if metadata["kv_group_size"] else None
        cache = _cache_from_arrays(arrays, len(model.layers), tokens, bits, group_size)
        intact = metadata["checksum"] == _checksum(arrays)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise PromptCacheFileError(f"{path} is corrupt: {_one_line(e)}") from None
    if not intact:
        raise PromptCacheFileError(f"{path} is corrupt: its arrays do not match their checksum")
    if not quantized_as_asked(cache, options):
        held = f"{bits}-bit (group size {group_size})" if bits else "unquantized"
        wanted = f"--kv-bits {bits} --kv-group-size {group_size}" if bits else "no --kv-bits"
        raise PromptCacheFileError(f"{path} holds an {held} KV cache: generate with {wanted}, or rebuild the file")
    return tokens, copy_prefix(cache, len(tokens), cache_window(model, options))


def cached_prefix(path: str | Path, model: Model, prompt: Sequence[int],
                  options: GenerationOptions) -> Tuple[List[KVCache], int]:
    """(a cache holding the first n ids of `prompt`, n) from a prompt cache file whose ids `prompt` must
    start with; n stops one short of the whole prompt (generation starts by feeding a token)."""
    tokens, cache = load_prompt_cache(path, model, options)
    if list(prompt[:len(tokens)]) != tokens:
        at = next((i for i, (a, b) in enumerate(zip(tokens, prompt)) if a != b), None)
        how = f"they differ from token {at} on" if at is not None else f"the prompt is only {len(prompt)} tokens"
        raise PromptCacheFileError(f"the prompt does not start with the {len(tokens)} tokens cached in {path} "
                                   f"({how}): begin the prompt with the cached text")
    held = min(len(tokens), len(prompt) - 1)
    for layer in cache:
        layer.trim(layer.offset - held)
    return cache, held


def load_cache_dir(directory: str | Path, store: PrefixStore, options: GenerationOptions) -> List[str]:
    """Put every prompt cache file in `directory` into `store` (oldest file first, so the newest end up
    most recently used); returns one line per file that was refused, saying why."""
    refused = []
    files = sorted(Path(directory).glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
    for path in files:
        try:
            tokens, cache = load_prompt_cache(path, store.model, options)
        except PromptCacheFileError as e:
            refused.append(str(e))
            continue
        store.insert(tokens, cache)
    return refused


def save_store(store: PrefixStore, directory: str | Path) -> List[Path]:
    """Write the store's entries to `directory` as prefix-<hash of the ids>.safetensors (replacing
    files of the same prefix), most recently used last so its file is the newest."""
    written = []
    for entry in reversed(list(store)):
        name = "prefix-" + hashlib.sha256(json.dumps(entry.tokens).encode()).hexdigest()[:16] + SUFFIX
        written.append(save_prompt_cache(Path(directory) / name, store.model, entry.tokens, entry.cache,
                                         force=True))
    return written


def _cache_from_arrays(arrays: Dict[str, mx.array], num_layers: int, tokens: List[int],
                       bits: Optional[int], group_size: Optional[int]) -> List[KVCache]:
    parts_per_layer = 2 if bits is None else 6
    expected = {f"layers.{i}.{j}" for i in range(num_layers) for j in range(parts_per_layer)}
    if set(arrays) != expected:
        raise ValueError(f"expected {len(expected)} arrays for {num_layers} layers, found {len(arrays)}")
    cache = []
    for i in range(num_layers):
        state = tuple(arrays[f"layers.{i}.{j}"] for j in range(parts_per_layer))
        if any(part.ndim != 4 or part.shape[2] != len(tokens) for part in state):
            raise ValueError(f"layer {i}'s arrays do not hold {len(tokens)} positions")
        meta = {"offset": len(tokens), "size": len(tokens), "max_size": None, "keep": DEFAULT_KEEP}
        if bits is None:
            cache.append(KVCache.from_state(state, meta))
        else:
            cache.append(QuantizedKVCache.from_state(state, {**meta, "bits": bits, "group_size": group_size}))
    return cache


def _checksum(arrays: Dict[str, mx.array]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = arrays[name]
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(np.array(value.view(mx.uint8) if value.dtype.size > 1 else value).tobytes())
    return digest.hexdigest()


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _one_line(error: Exception) -> str:
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
