"""The OpenELM decoder in MLX. Module names equal Apple's checkpoint keys; no I/O here.

Every layer has its own head counts and FFN width (layer-wise scaling), taken from `ModelArgs`.
"""

from __future__ import annotations

from typing import List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, RowCaches
from .config import ModelArgs
from .cpu_math import silu_times, softmax
from . import cpu_attention, cpu_split
from .cpu_split import gated_matmul_t, matmul_t, on_streams, spread

Mask = Optional[Union[str, mx.array]]

# Causal float32 attention of cpu_attention.MIN_QUERIES or more queries on a CPU runs in the compiled
# kernel where it is built; the rest is written out as matmuls, in chunks of this many queries. MLX's CPU
# SDPA takes ~4.4 ms per 270M layer for 2-4 queries (a verify pass) against 0.5 ms for the same
# math; for a long prefill its softmax (one thread, slow exp) covers the whole T x T square, while
# each chunk here covers only the keys it can see: about half the square at 512 tokens.
ATTENTION_QUERY_CHUNK = 64


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.num_query_heads = args.num_query_heads[layer]
        self.num_kv_heads = args.num_kv_heads[layer]
        self.head_dim = args.head_dim
        self.scale = args.head_dim ** -0.5
        self.rope_base = float(args.rope_freq_constant)
        self.qkv_proj = nn.Linear(args.model_dim, args.qkv_out_dim(layer), bias=False)
        self.out_proj = nn.Linear(self.num_query_heads * args.head_dim, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Union[KVCache, RowCaches]],
                 positions: Union[int, mx.array], last: Optional[int] = None) -> mx.array:
        """The attention block's output for every position of x, or for its `last` positions only (the cache
        still takes every position's keys and values; not with RowCaches)."""
        B, T, _ = x.shape
        nq, nkv = self.num_query_heads, self.num_kv_heads
        # Fused projection output is head-major: nq query heads, then nkv key, then nkv value heads.
        qkv = _project(self.qkv_proj, x).reshape(B, T, nq + 2 * nkv, self.head_dim)
        q, k, v = mx.split(qkv, [nq, nq + nkv], axis=2)  # each [B, T, heads, hd]
        raw_q = q
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)  # per-head RMSNorm, before RoPE
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, T, hd]
        if isinstance(cache, RowCaches) and cache.lengths is not None:
            out = self._packed(q, k, v, cache)
        else:
            q, k = self._rope(q, positions), self._rope(k, positions)
            if isinstance(cache, RowCaches):  # a continuous batch: each row attends over its own cache
                out = mx.concatenate([_attention(q[b:b + 1], *row.update_and_fetch(k[b:b + 1], v[b:b + 1]),
                                                 self.scale, mask) for b, row in enumerate(cache.rows)])
            else:
                if cache is not None:
                    k, v = cache.update_and_fetch(k, v)
                if last is not None:  # the last queries still see every key ("causal" aligns them to the end)
                    q, mask = q[:, :, -last:], mask[..., -last:, :] if isinstance(mask, mx.array) else mask
                if last is None and isinstance(mask, str) and cpu_attention.applies(q, k):
                    # The kernel norms and rotates the queries itself: the normed, rotated q above is never evaluated.
                    out = cpu_attention.causal_attention(raw_q.transpose(0, 2, 1, 3), k, v, self.scale,
                                                         q_norm=self.q_norm if "q_norm" in self else None,
                                                         rope_base=self.rope_base, position=positions)
                else:
                    out = _attention(q, k, v, self.scale, mask)
        return _project(self.out_proj, out.transpose(0, 2, 1, 3).reshape(B, -1, nq * self.head_dim))

    def _rope(self, x: mx.array, positions: Union[int, mx.array]) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=positions)

    def _packed(self, q: mx.array, k: mx.array, v: mx.array, cache: RowCaches) -> mx.array:
        """Attention for a packed prefill: each row's segment of the sequence, at the row's positions, over
        the row's own cache (the projections around it ran over all the rows' tokens at once)."""
        parts, start = [], 0
        for row, length in zip(cache.rows, cache.lengths):
            end = start + length
            q_row, k_row = self._rope(q[:, :, start:end], row.offset), self._rope(k[:, :, start:end], row.offset)
            keys, values = row.update_and_fetch(k_row, v[:, :, start:end])
            parts.append(_attention(q_row, keys, values, self.scale, "causal" if length > 1 else None))
            start = end
        return mx.concatenate(parts, axis=2)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.ffn_dim = args.ffn_dims[layer]
        self.proj_1 = nn.Linear(args.model_dim, 2 * self.ffn_dim, bias=False)
        self.proj_2 = nn.Linear(self.ffn_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # The gate is the FIRST half of proj_1's output.
        if type(self.proj_1) is nn.Linear and "bias" not in self.proj_1:
            hidden = gated_matmul_t(x, self.proj_1.weight, silu_times)
        else:
            hidden = silu_times(*mx.split(self.proj_1(x), 2, axis=-1))
        return _project(self.proj_2, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Union[KVCache, RowCaches]], positions,
                 last: Optional[int] = None) -> mx.array:
        h = (x if last is None else x[:, -last:]) + self.attn(self.attn_norm(x), mask, cache, positions, last)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, ids: mx.array, cache: Optional[List[Union[KVCache, RowCaches]]],
                 last: Optional[int] = None) -> mx.array:
        h = self.token_embeddings(ids)
        first = cache[0] if cache else None
        if last is not None and (last < 1 or isinstance(first, RowCaches)):
            raise ValueError(f"last must be a positive count of positions, and not with RowCaches (got {last})")
        positions = _positions(first)
        mask = _attention_mask(ids.shape[1], first)
        for i, layer in enumerate(self.layers):
            # Only the last layer can skip rows: every layer's keys and values of every position are cached.
            h = layer(h, mask, cache[i] if cache else None, positions, last if i == len(self.layers) - 1 else None)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM causal LM. `model(ids, cache=None)` maps [B, T] token ids to [B, T, vocab] logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = Transformer(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, ids: mx.array, cache: Optional[List[KVCache]] = None) -> mx.array:
        return self.logits(self.hidden(ids, cache))

    def hidden(self, ids: mx.array, cache: Optional[List[KVCache]] = None, last: Optional[int] = None) -> mx.array:
        """Final-normed hidden states [B, T, model_dim]; prefill uses it to skip unneeded logits. With `last`,
        those of the last `last` positions only [B, min(last, T), model_dim]: the last layer then runs its
        attention output and FFN for those rows only (the cache still gets every position)."""
        return self.transformer(ids, cache, last)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.share_input_output_layers:
            embedding = self.transformer.token_embeddings
            if type(embedding) is nn.Embedding:
                return matmul_t(hidden, embedding.weight)  # tied
            return embedding.as_linear(hidden)  # tied and quantized
        return _project(self.lm_head, hidden)

    @property
    def layers(self) -> List[DecoderLayer]:
        return self.transformer.layers


def _project(layer: nn.Module, x: mx.array) -> mx.array:
    """A bias-free Linear via `matmul_t` (split across CPU cores where that pays); quantized ones as they are."""
    if type(layer) is nn.Linear and "bias" not in layer:
        return matmul_t(x, layer.weight)
    return layer(x)


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """Grouped-query attention of q [B, nq, T, hd] over k, v [B, nkv, S, hd]; kv heads are never tiled."""
    if not isinstance(mask, str) or mx.default_device().type != mx.DeviceType.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if cpu_attention.applies(q, k):
        return cpu_attention.causal_attention(q, k, v, scale)
    T, past = q.shape[2], k.shape[2] - q.shape[2]

    def queries(first: int, stop: int) -> mx.array:
        """Queries first..stop-1; each sees the keys up to the end of its chunk, however the range is cut."""
        parts = []
        while first < stop:
            chunk_end = min((first // ATTENTION_QUERY_CHUNK + 1) * ATTENTION_QUERY_CHUNK, T)
            end = min(chunk_end, stop)
            keys = past + chunk_end
            parts.append(_causal_attention(q[:, :, first:end], k[:, :, :keys], v[:, :, :keys], scale, past + first))
            first = end
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    if T < 2 * ATTENTION_QUERY_CHUNK or not spread(q.dtype):  # fewer queries: measured to lose
        return queries(0, T)
    # MLX runs the softmax and masking on one thread: query ranges of equal work over the CPU streams.
    cuts = _balanced_cuts(T, past)
    return mx.concatenate(on_streams(queries, cuts[:-1], cuts[1:]), axis=2)


def _balanced_cuts(T: int, past: int) -> List[int]:
    """Query boundaries [0, ..., T] that split causal attention into `cpu_split.SPLITS` ranges of about
    equal work (query i sees past + i + 1 keys)."""
    parts = cpu_split.SPLITS
    total = T * past + T * (T + 1) // 2
    cuts, work = [0], 0
    for i in range(T - 1):
        work += past + i + 1
        if len(cuts) < parts and work >= total * len(cuts) / parts:
            cuts.append(i + 1)
    return cuts + [T]


def _causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, first: int) -> mx.array:
    """Causal attention as matmuls; query i is at key position first + i (and sees the keys up to it)."""
    B, nq, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    group = nq // nkv
    # Query head j reads kv head j // group: fold each group's queries into one matmul per kv head.
    scores = ((q * scale).reshape(B, nkv, group * T, hd) @ k.swapaxes(-1, -2)).reshape(B, nkv, group, T, S)
    causal = mx.arange(S)[None] <= mx.arange(first, first + T)[:, None]
    weights = softmax(mx.where(causal, scores, -mx.inf))
    return (weights.reshape(B, nkv, group * T, S) @ v).reshape(B, nq, T, hd)


def _positions(cache: Optional[Union[KVCache, RowCaches]]) -> Union[int, mx.array]:
    """RoPE offset of the first new token: the cache's position, per row when left-padded or rows (a packed
    prefill finds each row's in the row's cache)."""
    if cache is None:
        return 0
    if isinstance(cache, RowCaches):
        return 0 if cache.lengths is not None else cache.positions
    if cache.left_padding is None:
        return cache.offset
    return cache.offset - cache.left_padding  # [B]; pad tokens get negative positions and are masked


def _attention_mask(num_new: int, cache: Optional[Union[KVCache, RowCaches]]) -> Mask:
    if isinstance(cache, RowCaches):
        if cache.lengths is None and num_new != 1:
            raise ValueError("a continuous batch steps one token per row; pass the rows' lengths to pack a prefill")
        return None  # per row: a packed prefill masks each row's segment itself
    if cache is None or cache.left_padding is None:
        return "causal" if num_new > 1 else None  # "causal" aligns the last query with the last key
    # Left-padded batch: row b may not attend to its first left_padding[b] positions. A pad
    # query still sees itself, so no softmax row is empty (an empty row would give NaN values
    # that leak into real rows through 0 * NaN).
    total = cache.size + num_new
    key_pos = mx.arange(total)[None, :]  # [1, S]
    query_pos = mx.arange(cache.size, total)[:, None]  # [T, 1]
    causal = key_pos <= query_pos  # [T, S]
    not_pad = key_pos >= cache.left_padding[:, None]  # [B, S]
    allowed = causal[None] & (not_pad[:, None, :] | (key_pos == query_pos)[None])  # [B, T, S]
    return allowed[:, None]  # [B, 1, T, S]
