"""Per-layer KV cache: preallocated in steps, written in place, each layer with its own kv-head count."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

# Capacity grows in blocks of this many positions (mlx-lm uses the same step).
CACHE_STEP = 256
# Sliding window: positions dropped at once when the window is full, so the copy is amortised.
EVICT_CHUNK = 256
# Sliding window: leading positions always kept (BOS and the start of the system prompt).
DEFAULT_KEEP = 4


class KVCache:
    """Keys and values of one attention layer, shape [B, n_kv_heads, capacity, head_dim].

    `offset` is the absolute position of the next token (it drives RoPE); `size` is how many
    positions are stored. They differ only after a sliding window dropped old positions.
    With `max_size` set, a full cache keeps its first `keep` positions and drops the oldest
    of the rest, so generation can go on past the context (opt-in: quality degrades gracefully).
    """

    def __init__(self, max_size: Optional[int] = None, keep: int = DEFAULT_KEEP,
                 left_padding: Optional[mx.array] = None):
        if max_size is not None and max_size <= keep:
            raise ValueError(f"sliding window size {max_size} must exceed the kept prefix ({keep})")
        self.max_size = max_size
        self.keep = keep
        # [B] int32: pad positions at the start of each row of a left-padded batch.
        self.left_padding = left_padding
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.size = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append [B, n_kv, T, hd] keys/values; return all stored ones."""
        new = keys.shape[2]
        if self.max_size is not None and self.size + new > self.max_size:
            self._evict(self.size + new - self.max_size)
        end = self.size + new
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.size:end, :] = keys
        self.values[..., self.size:end, :] = values
        self.size = end
        self.offset += new
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        capacity = -(-needed // CACHE_STEP) * CACHE_STEP
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)
        B, n_kv, _, hd = keys.shape
        new_keys = mx.zeros((B, n_kv, capacity, hd), keys.dtype)
        new_values = mx.zeros((B, n_kv, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.size:
            new_keys[..., : self.size, :] = self.keys[..., : self.size, :]
            new_values[..., : self.size, :] = self.values[..., : self.size, :]
        self.keys, self.values = new_keys, new_values

    def _evict(self, at_least: int) -> None:
        """Drop the oldest positions after the kept prefix (at least `at_least`, in chunks)."""
        if self.left_padding is not None:
            raise ValueError("a sliding window cannot be combined with a left-padded batch")
        droppable = self.size - self.keep
        if at_least > droppable:
            raise ValueError(f"cannot fit {at_least} new positions in a sliding window of {self.max_size}")
        chunk = min(EVICT_CHUNK, max(1, droppable // 2))  # small windows keep at least half their history
        drop = min(max(at_least, chunk), droppable)
        keep, size = self.keep, self.size
        # Already-rotated keys keep their positions: RoPE only sees relative distances.
        self.keys[..., keep : size - drop, :] = self.keys[..., keep + drop : size, :]
        self.values[..., keep : size - drop, :] = self.values[..., keep + drop : size, :]
        self.size -= drop

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most what is stored); return how many were dropped."""
        n = max(0, min(n, self.size))
        self.size -= n
        self.offset -= n
        return n

    @property
    def state(self) -> Tuple[mx.array, mx.array]:
        """The stored keys and values (without spare capacity), for saving."""
        if self.keys is None:
            return mx.zeros((0,)), mx.zeros((0,))
        return self.keys[..., : self.size, :], self.values[..., : self.size, :]

    @property
    def meta_state(self) -> dict:
        pads = None if self.left_padding is None else self.left_padding.tolist()
        return {"offset": self.offset, "size": self.size, "max_size": self.max_size, "keep": self.keep,
                "left_padding": pads}

    @classmethod
    def from_state(cls, state: Tuple[mx.array, mx.array], meta_state: dict) -> "KVCache":
        pads = meta_state.get("left_padding")
        cache = cls(max_size=meta_state["max_size"], keep=meta_state["keep"],
                    left_padding=None if pads is None else mx.array(pads, dtype=mx.int32))
        if meta_state["size"]:
            cache.keys, cache.values = state
        cache.offset, cache.size = meta_state["offset"], meta_state["size"]
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int, *, max_size: Optional[int] = None, keep: int = DEFAULT_KEEP,
               left_padding: Optional[Sequence[int]] = None) -> List[KVCache]:
    """One KVCache per layer. `max_size` turns on the sliding window; `left_padding` marks a padded batch."""
    pads = None if left_padding is None else mx.array(list(left_padding), dtype=mx.int32)
    return [KVCache(max_size=max_size, keep=keep, left_padding=pads) for _ in range(num_layers)]


class RowCaches:
    """One layer's caches for a step of a continuous batch: row b of the batch is one sequence with its
    own KVCache (B = 1) of its own length. The model attends each row over its own cache, exactly as
    when that sequence runs alone, so no row is padded and none waits for another's prompt."""

    def __init__(self, rows: Sequence[KVCache]):
        self.rows = list(rows)

    @property
    def positions(self) -> mx.array:
        """[B] int32: each row's RoPE position for its next token."""
        return mx.array([row.offset for row in self.rows], dtype=mx.int32)
