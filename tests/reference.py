"""An independent PyTorch reference of OpenELM's forward pass, written from the spec
(/work/shared/docs/openelm-spec.md, section 1), not from the MLX code.

Input: an Apple-style config.json dict (expanded per-layer lists, as helpers.tiny_config writes)
and a state dict in Apple's key names (name -> numpy array). Output: logits [B, T, vocab] as numpy.
Everything is computed in float64 by default. Nothing here imports openelm_mlx.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

EPS = 1e-6


def _make_divisible(v: float, d: int) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return int(n + d if n < 0.9 * v else n)


def _ffn_dims(config: dict) -> list:
    return [_make_divisible(m * config["model_dim"], config["ffn_dim_divisor"]) for m in config["ffn_multipliers"]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean of squares in at least float32, cast back to x's dtype, then times the weight."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split (NeoX) RoPE over all hd dims. x: [B, H, T, hd]; positions: [B, T] absolute positions."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [hd/2]
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, hd]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def reference_hidden(config: dict, state: Dict[str, np.ndarray], ids, *, dtype=torch.float64,
                     left_padding: Optional[Sequence[int]] = None, allowed=None) -> torch.Tensor:
    """Final-normed hidden states [B, T, model_dim].

    left_padding (optional, one count per row): row b's first left_padding[b] tokens are padding,
    never attended to by real tokens, and real tokens are numbered from position 0.
    allowed (optional, bool [T, T] or [B, T, T]): replaces the causal mask; allowed[.., i, j] says
    whether query i may attend to key j (RoPE positions stay absolute). For sliding-window checks.
    """
    W = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dtype) for k, v in state.items()}
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    B, T = ids.shape
    hd = config["head_dim"]
    base = float(config.get("rope_freq_constant", 10000))
    pads = torch.zeros(B, dtype=torch.long) if left_padding is None else torch.as_tensor(list(left_padding))
    positions = torch.arange(T)[None, :] - pads[:, None]  # [B, T]
    q_pos = torch.arange(T)[:, None]
    k_pos = torch.arange(T)[None, :]
    if allowed is None:
        allowed = (k_pos <= q_pos)[None] & (k_pos[None] >= pads[:, None, None])  # [B, T, T]
        allowed = allowed | torch.eye(T, dtype=torch.bool)[None]  # a pad query sees itself (no empty rows)
    else:
        allowed = torch.as_tensor(np.asarray(allowed), dtype=torch.bool).expand(B, T, T)

    x = W["transformer.token_embeddings.weight"][ids]  # no scaling, no position embedding
    for i, (nq, nkv, f) in enumerate(zip(config["num_query_heads"], config["num_kv_heads"], _ffn_dims(config))):
        p = f"transformer.layers.{i}."
        # --- attention
        h = rms_norm(x, W[p + "attn_norm.weight"])
        qkv = h @ W[p + "attn.qkv_proj.weight"].T  # [B, T, (nq + 2 nkv) hd]
        qkv = qkv.view(B, T, nq + 2 * nkv, hd)  # head-major: q heads, then k heads, then v heads
        q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        if config.get("normalize_qk_projections", True):
            q = rms_norm(q, W[p + "attn.q_norm.weight"])
            k = rms_norm(k, W[p + "attn.k_norm.weight"])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        q, k = rope(q, positions, base), rope(k, positions, base)
        group = nq // nkv
        k = k.repeat_interleave(group, dim=1)  # query head j reads kv head j // group
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, nq, T, T]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # [B, nq, T, hd]
        attn = attn.transpose(1, 2).reshape(B, T, nq * hd)
        x = x + attn @ W[p + "attn.out_proj.weight"].T
        # --- SwiGLU FFN: the first half of proj_1 is the gate
        h = rms_norm(x, W[p + "ffn_norm.weight"])
        y = h @ W[p + "ffn.proj_1.weight"].T
        gate, up = y[..., :f], y[..., f:]
        x = x + (silu(gate) * up) @ W[p + "ffn.proj_2.weight"].T
    return rms_norm(x, W["transformer.norm.weight"])


def reference_logits(config: dict, state: Dict[str, np.ndarray], ids, *, dtype=torch.float64,
                     left_padding: Optional[Sequence[int]] = None, allowed=None) -> np.ndarray:
    """Logits [B, T, vocab] (numpy, float64 unless dtype says otherwise); see reference_hidden."""
    h = reference_hidden(config, state, ids, dtype=dtype, left_padding=left_padding, allowed=allowed)
    if config.get("share_input_output_layers", True):
        out = torch.as_tensor(np.asarray(state["transformer.token_embeddings.weight"], dtype=np.float64)).to(dtype)
    else:
        out = torch.as_tensor(np.asarray(state["lm_head.weight"], dtype=np.float64)).to(dtype)
    return (h @ out.T).numpy()
