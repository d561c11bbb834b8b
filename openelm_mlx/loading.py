"""Load OpenELM checkpoints: Apple's Hugging Face layout, MLX (mlx-lm / mlx-community) directories
with optional quantization, and hub repo ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .blas import optimized_blas
from .config import ModelArgs
from .errors import ConfigError, LoadError
from .model import Model
from .synthetic import PREFIX as SYNTHETIC_PREFIX, synthetic_model
from .tokenizer import TOKENIZER_FILE, Tokenizer, find_tokenizer

# The compute dtype on GPUs (Metal, CUDA); `default_dtype` decides per backend.
DEFAULT_DTYPE = "bfloat16"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# Files a hub download needs; nothing else (no PyTorch .bin, no remote code).
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", TOKENIZER_FILE,
             "tokenizer_config.json", "generation_config.json"]
INDEX_FILE = "model.safetensors.index.json"


def load(path_or_repo: str | Path, *, dtype: Optional[str] = None, tokenizer: Optional[str | Path] = None,
         force_float16: bool = False) -> Tuple[Model, Tokenizer]:
    """Load a model and its tokenizer from a local directory or a Hugging Face repo id, or build
    `synthetic:SIZE` (random weights of a released architecture: '270M', '450M', '1_1B', '3B').

    dtype: 'bfloat16', 'float16' or 'float32'; floating weights are cast on load. Default:
    `default_dtype()` (bfloat16 on GPUs; float32 on the CPU where that is faster).
    float16 is refused for models whose activations overflow it (the 3B) unless force_float16.
    tokenizer: a tokenizer.model file (or its directory) when the checkpoint has none; a synthetic
    model always needs it.
    """
    if str(path_or_repo).startswith(SYNTHETIC_PREFIX):
        return _load_synthetic(str(path_or_repo)[len(SYNTHETIC_PREFIX):], dtype=dtype, tokenizer=tokenizer,
                               force_float16=force_float16)
    model_dir = resolve_model_dir(path_or_repo)
    args = read_config(model_dir)  # cheap checks first: not a checkpoint directory, or a bad config.json
    tokenizer_path = find_tokenizer(model_dir, tokenizer)  # and before reading gigabytes of weights
    model = load_model(model_dir, dtype=dtype, force_float16=force_float16, args=args)
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size > model.args.vocab_size:
        raise LoadError(
            f"the tokenizer {tok.path} has {tok.vocab_size} pieces but the model only {model.args.vocab_size}: "
            "it is not OpenELM's tokenizer (the Llama-2 SentencePiece model)"
        )
    return model, tok


def _load_synthetic(size: str, *, dtype: Optional[str], tokenizer: Optional[str | Path],
                    force_float16: bool) -> Tuple[Model, Tokenizer]:
    """A random-weight model of a released size, with the tokenizer found or given."""
    tok = Tokenizer(find_tokenizer(None, tokenizer))  # cheap checks first, before the build
    target = compute_dtype(ModelArgs.from_preset(size), dtype, force_float16)
    return synthetic_model(size, dtype=target), tok


def default_dtype(*, quantized: bool = False) -> str:
    """The compute dtype used when none is asked for: the one place this default is decided.

    bfloat16 on GPUs. On MLX's CPU backend bfloat16 matmuls have no fast kernel, so float32 is
    used where it is faster: always for quantized weights (float32 activations decode ~8x faster),
    and for the rest when an optimized BLAS serves float32 matmuls (see `blas`).
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return DEFAULT_DTYPE
    return "float32" if quantized or optimized_blas() else DEFAULT_DTYPE


def resolve_model_dir(path_or_repo: str | Path, *, allow_patterns: Optional[list] = None) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (only the files matching
    `allow_patterns`, by default those the loader reads)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path} is a file: pass the directory that holds config.json and the weights")
    text = str(path_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise LoadError(f"no such directory: {text} (pass a model directory or a Hugging Face repo id like apple/OpenELM-270M)")
    return _download(text, allow_patterns or HUB_FILES)


def _download(repo_id: str, allow_patterns: list) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise LoadError(f"{repo_id} is gated: accept its license on the Hub, then run `huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise LoadError(
            f"{repo_id} is neither a local directory nor a repo on the Hugging Face Hub (or it is private): "
            "check the path or repo id, or log in with `huggingface-cli login`"
        ) from None
    except LocalEntryNotFoundError:
        raise LoadError(
            f"could not download {repo_id}: the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE is set) "
            "and the repo is not in the local cache. Connect to the network once, or pass a local directory."
        ) from None
    except HFValidationError as e:  # e.g. a mistyped local path with spaces in it
        raise LoadError(f"no such directory: {repo_id}, and it is not a valid Hugging Face repo id either ({e})") from None
    except (OSError, ValueError) as e:  # network failures surface as OSError subclasses
        raise LoadError(f"could not download {repo_id} from the Hugging Face Hub: {e}. Pass a local directory "
                        "if you have the files.") from None


def read_config(model_dir: Path) -> ModelArgs:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LoadError(f"{model_dir} has no config.json: is it an OpenELM checkpoint directory?")
    return ModelArgs.from_dict(read_json_object(path))


def read_json_object(path: Path) -> dict:
    """A config file's JSON object; ConfigError naming the file when it is not one."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def indexed_files(directory: Path, index_name: str, pattern: str) -> List[Path]:
    """The shard files an index (`index_name`, e.g. model.safetensors.index.json) maps tensors to, all
    checked present; without an index, every file matching `pattern`. Used by the loader and the converter."""
    index = directory / index_name
    if not index.is_file():
        return sorted(directory.glob(pattern))
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{index} is not a valid index (needs a 'weight_map' from tensor names to file names): "
                        f"{type(e).__name__}: {e}") from None
    strange = sorted(repr(n) for n in names if not isinstance(n, str) or not n or Path(n).name != n)
    if strange:
        raise LoadError(f"{index} maps tensors to {', '.join(strange[:3])}: the 'weight_map' must name files "
                        f"in {directory}")
    files = sorted(directory / name for name in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LoadError(f"{index} lists shards that are not in {directory}: {', '.join(missing)}")
    return files


def read_weights(model_dir: Path) -> Dict[str, mx.array]:
    """All tensors of the checkpoint: sharded (index file) or every model*.safetensors."""
    files = indexed_files(model_dir, INDEX_FILE, "model*.safetensors")
    if not files:
        has_torch = any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))
        hint = (" (PyTorch .bin/.pt checkpoints are not loaded directly: convert them with "
                f"`openelm-mlx convert {model_dir} OUT`)") if has_torch else ""
        raise LoadError(f"no model*.safetensors in {model_dir}{hint}")
    weights: Dict[str, mx.array] = {}
    for file in files:
        try:
            shard = mx.load(str(file))
        except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or corrupt files
            raise LoadError(f"cannot read {file}: {e} (the file is truncated or not safetensors)") from None
        for name in shard:
            if name in weights:
                raise LoadError(f"tensor {name} appears in more than one shard ({file.name})")
        weights.update(shard)
    return weights


def check_float16(args: ModelArgs, dtype: mx.Dtype, force: bool) -> None:
    """OpenELM's hidden states reach ~1e5 in the larger models: float16 (max 65504) overflows."""
    if dtype == mx.float16 and args.model_dim >= 3072 and not force:
        raise ConfigError(
            "float16 is refused for this model: OpenELM-3B's hidden states grow past float16's range "
            "(65504) and it then prints only garbage (mlx-examples issue 730). Use bfloat16 (the default), "
            "or force float16 (--force-float16 / force_float16=True) if you know better."
        )


def quantize_tree(model: Model, quantization: dict, quantized_names: Optional[set] = None) -> None:
    """Replace Linear/Embedding modules with quantized ones: those named in `quantized_names`
    (read from a checkpoint's `.scales`), or all eligible ones when it is None. Per-module
    overrides in `quantization` ({"path": {"bits", "group_size"}} or {"path": false}) win, as in mlx-lm."""
    defaults = {"group_size": quantization.get("group_size", 64), "bits": quantization.get("bits", 4)}
    if "mode" in quantization:
        defaults["mode"] = quantization["mode"]

    def predicate(path: str, module: nn.Module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        override = quantization.get(path)
        if override is False:
            return False
        if quantized_names is not None and path not in quantized_names:
            return False
        if isinstance(override, dict):
            return {**defaults, **override}
        return defaults

    nn.quantize(model, class_predicate=predicate, **defaults)


def compute_dtype(args: ModelArgs, dtype: Optional[str], force_float16: bool) -> mx.Dtype:
    """The dtype to compute in: `dtype` by name, else `default_dtype()`; float16 checked for overflow."""
    target = DTYPES.get(dtype or default_dtype(quantized=bool(args.quantization)))
    if target is None:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_float16(args, target, force_float16)
    return target


def load_model(model_dir: Path, *, dtype: Optional[str] = None, force_float16: bool = False,
               args: Optional[ModelArgs] = None) -> Model:
    """Build the model from config.json (or `args`, already read from it) and load its weights
    strictly (names, shapes, nothing missing)."""
    args = args or read_config(model_dir)
    target = compute_dtype(args, dtype, force_float16)
    weights = read_weights(model_dir)
    model = Model(args)
    if args.quantization:
        quantized = {name[: -len(".scales")] for name in weights if name.endswith(".scales")}
        quantize_tree(model, args.quantization, quantized)
    assign_weights(model, weights, target)
    return model


def assign_weights(model: Model, weights: Dict[str, mx.array], dtype: mx.Dtype) -> None:
    """Strict load: every tensor named, shaped and present; floating tensors cast to `dtype`."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise LoadError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        hint = (" (the checkpoint is quantized but config.json has no 'quantization' block)"
                if any(name.endswith(".scales") for name in unexpected) else "")
        raise LoadError(f"checkpoint has {len(unexpected)} unexpected tensor(s) for this config: "
                        f"{', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "") + hint)
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise LoadError(f"tensor {name} has shape {tuple(value.shape)} but config.json implies "
                            f"{tuple(expected[name].shape)}")
        if mx.issubdtype(value.dtype, mx.floating):
            weights[name] = value.astype(dtype)
        elif value.dtype != expected[name].dtype:
            raise LoadError(f"tensor {name} has dtype {value.dtype} but {expected[name].dtype} is expected")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
