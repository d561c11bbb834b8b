"""Tiny OpenELM checkpoints in Apple's exact Hugging Face layout, built from the spec.

Nothing here imports openelm_mlx: names, shapes and per-layer sizes are derived independently,
so a naming or sizing mistake in the runtime cannot hide behind a shared helper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"
DOCS_TARGET = SHARED_DATA / "openelm-docs-target"
DOCS_DRAFT = SHARED_DATA / "openelm-docs-draft"


def _make_divisible(v: float, d: int) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return int(n + d if n < 0.9 * v else n)


def tiny_config(num_layers: int = 3, model_dim: int = 64, head_dim: int = 16, num_query_heads=None,
                num_kv_heads=None, ffn_multipliers=None, vocab_size: int = 320, tied: bool = True,
                max_context_length: int = 2048, ffn_dim_divisor: int = 32, **extra) -> dict:
    """An Apple-style config.json dict (expanded per-layer lists), as save_pretrained writes it."""
    num_query_heads = num_query_heads or [4, 4, 8][:num_layers] + [8] * max(0, num_layers - 3)
    num_kv_heads = num_kv_heads or [max(1, q // 4) for q in num_query_heads]
    ffn_multipliers = ffn_multipliers or [round(float(v), 2) for v in np.linspace(0.5, 4.0, num_layers)]
    config = {
        "activation_fn_name": "swish",
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig",
                     "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": ffn_dim_divisor,
        "ffn_multipliers": ffn_multipliers,
        "ffn_with_glu": True,
        "head_dim": head_dim,
        "initializer_range": 0.02,
        "max_context_length": max_context_length,
        "model_dim": model_dim,
        "model_type": "openelm",
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": True,
        "num_gqa_groups": 4,
        "num_kv_heads": num_kv_heads,
        "num_query_heads": num_query_heads,
        "num_transformer_layers": num_layers,
        "qkv_multipliers": [0.5, 1.0],
        "rope_freq_constant": 10000,
        "rope_max_length": 4096,
        "share_input_output_layers": tied,
        "torch_dtype": "float32",
        "transformers_version": "4.44.2",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    config.update(extra)
    return config


def ffn_dims(config: dict) -> List[int]:
    return [_make_divisible(m * config["model_dim"], config["ffn_dim_divisor"]) for m in config["ffn_multipliers"]]


def tensor_shapes(config: dict) -> Dict[str, tuple]:
    """Apple's checkpoint keys and [out, in] shapes for `config`."""
    d, hd = config["model_dim"], config["head_dim"]
    shapes = {"transformer.token_embeddings.weight": (config["vocab_size"], d)}
    for i, (nq, nkv, f) in enumerate(zip(config["num_query_heads"], config["num_kv_heads"], ffn_dims(config))):
        p = f"transformer.layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.qkv_proj.weight"] = ((nq + 2 * nkv) * hd, d)
        shapes[p + "attn.q_norm.weight"] = (hd,)
        shapes[p + "attn.k_norm.weight"] = (hd,)
        shapes[p + "attn.out_proj.weight"] = (d, nq * hd)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "ffn.proj_1.weight"] = (2 * f, d)
        shapes[p + "ffn.proj_2.weight"] = (d, f)
    shapes["transformer.norm.weight"] = (d,)
    if not config["share_input_output_layers"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    return shapes


def random_state_dict(config: dict, seed: int = 0, std: float = 0.1) -> Dict[str, np.ndarray]:
    """float32 weights: N(0, std) matrices (large enough to exercise every op), norms near 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def text_only_state(config: dict, tokenizer_path: Path, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random weights whose untied head (config must be untied) only ever prefers text pieces,
    so greedy output is readable text rather than stray byte-fallback pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    state = random_state_dict(config, seed=seed)
    head = state["lm_head.weight"]
    text = np.array([not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)) for i in range(head.shape[0])])
    head[~text] = 0.0
    head[text] = 0.5 * np.random.default_rng(seed + 1).standard_normal((int(text.sum()), head.shape[1]))
    return state


def noisy_copy(state: Dict[str, np.ndarray], scale: float = 0.15, seed: int = 7) -> Dict[str, np.ndarray]:
    """`state` plus Gaussian noise of `scale` x each tensor's mean magnitude: a draft model that agrees
    with the original often, not always."""
    rng = np.random.default_rng(seed)
    return {k: v + scale * np.abs(v).mean() * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}


def write_hf_checkpoint(directory: Path, config: dict, state: Dict[str, np.ndarray], *,
                        dtype: str = "float32", shards: int = 1, tokenizer: Optional[Path] = None) -> Path:
    """Write config.json and safetensors as Apple's save_pretrained does (torch tensors, optional shards)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tensors = {k: torch.from_numpy(v).to(torch_dtype).contiguous() for k, v in state.items()}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in chunk}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in chunk})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return directory


def text_checkpoints(root: Path, tokenizer: Path, small_context: int):
    """Two untied float32 checkpoints with the same readable-text weights (`text_only_state`): the
    default context (2048) and a `small_context`-token one. Returns their directories."""
    config = tiny_config(tied=False)
    state = text_only_state(config, tokenizer)
    big = write_hf_checkpoint(root / "ctx2048", config, state)
    small = write_hf_checkpoint(root / f"ctx{small_context}", tiny_config(tied=False, max_context_length=small_context),
                                state)
    return big, small
