"""CoreNet training checkpoints: the YAML config, tensor names, and the padded vocabulary.

CoreNet (Apple's training library) names an architecture in its YAML
(`model.language_modeling.general_gpt.model_name: OpenELM-270M`) and keeps the architecture table
in code (`general_gpt.py`, `gpt_configs`); the YAML adds vocab_size (32128: 32000 pieces plus a
pad id and rows for hardware-friendly sizes), max_context_length and padding_index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from openelm_mlx.errors import ConfigError, LoadError

# CoreNet's gpt_configs (general_gpt.py) for the names its OpenELM YAMLs use. "gpt-test" is
# CoreNet's own tiny test architecture. Every entry sets qk norms and tied embeddings; _DEFAULTS holds
# the values the OpenELM entries share (and GPTConfig's ffn_dim_divisor).
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "gpt-test": dict(num_transformer_layers=1, model_dim=128, head_dim=64, num_gqa_groups=1,
                     ffn_multipliers=(0.25, 0.75), qkv_multipliers=(0.25, 0.5)),
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}
_DEFAULTS = dict(num_gqa_groups=4, ffn_multipliers=(0.5, 4.0), qkv_multipliers=(0.5, 1.0),
                         normalize_qk_projections=True, share_input_output_layers=True, ffn_dim_divisor=256)
_GPT_KEY = ("model", "language_modeling", "general_gpt")
# Token ids past this are CoreNet's padding rows, never produced by the Llama-2 tokenizer.
REAL_VOCAB = 32000


def read_yaml_config(path: Path, *, keep_padding: bool) -> Tuple[Dict[str, Any], Optional[int]]:
    """(Apple-style config dict with the YAML's vocab_size, vocabulary rows to keep or None for all)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    gpt = raw
    for key in _GPT_KEY:
        gpt = gpt.get(key) if isinstance(gpt, dict) else None
    if not isinstance(gpt, dict):
        raise ConfigError(f"{path} has no model.language_modeling.general_gpt section: is it a CoreNet OpenELM config?")
    name = gpt.get("model_name")
    if name not in ARCHITECTURES:
        raise ConfigError(f"{path}: model_name {name!r} is not a known CoreNet architecture "
                          f"({', '.join(ARCHITECTURES)})")
    for key in ("vocab_size", "max_context_length"):
        if not isinstance(gpt.get(key), int):
            raise ConfigError(f"{path}: general_gpt.{key} must be an integer, got {gpt.get(key)!r}")
    config = {**_DEFAULTS, **ARCHITECTURES[name], "vocab_size": gpt["vocab_size"],
              "max_context_length": gpt["max_context_length"], "model_type": "openelm"}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    keep_rows = None
    padding = gpt.get("padding_index")
    if not keep_padding and gpt["vocab_size"] > REAL_VOCAB and (padding is None or padding >= REAL_VOCAB):
        keep_rows = REAL_VOCAB
    return config, keep_rows


def hf_name(corenet_name: str) -> Optional[str]:
    """Apple's HF tensor name for a CoreNet one; None for buffers that are not weights."""
    name = corenet_name.removeprefix("module.")  # saved from a DistributedDataParallel wrapper
    if ".pos_embedding." in name:
        return None  # rotary tables, recomputed at run time
    if name.startswith("classifier."):
        return "lm_head." + name[len("classifier."):]
    return "transformer." + name
