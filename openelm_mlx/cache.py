"""Per-layer KV cache: preallocated in steps, written in place, each layer with its own kv-head count.

`QuantizedKVCache` stores keys and values quantized (4 or 8 bits, groups along head_dim) and hands
attention dequantized copies, so the model's attention code is the same for both."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

# Capacity grows in blocks of this many positions (mlx-lm uses the same step).
CACHE_STEP = 256
# Sliding window: positions dropped at once when the window is full, so the copy is amortised.
EVICT_CHUNK = 256
# Sliding window: leading positions always kept (BOS and the start of the system prompt).
DEFAULT_KEEP = 4
# Quantized KV cache: the bit widths offered, and the default group size along head_dim.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
DEFAULT_KV_GROUP_SIZE = 64


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
        for part in self._stored():
            part[..., keep : size - drop, :] = part[..., keep + drop : size, :]
        self.size -= drop

    def _stored(self) -> List[mx.array]:
        """The arrays holding the positions (axis 2), which the sliding window shifts together."""
        return [self.keys, self.values]

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
        """Bytes held, spare capacity included."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def kv_bits(self) -> Optional[int]:
        """Bits per stored key/value element when quantized; None: the model's dtype."""
        return None

    @property
    def kv_group_size(self) -> Optional[int]:
        """Elements of head_dim sharing one scale and bias when quantized; None: not quantized."""
        return None


class QuantizedKVCache(KVCache):
    """A KVCache whose keys and values are stored quantized: `bits` per element plus a float scale and
    bias per `group_size` elements of head_dim (mx.quantize's affine scheme, as mlx-lm's QuantizedKVCache).

    `update_and_fetch` quantizes the new positions and returns every stored one dequantized (in the
    dtype of the incoming keys), so attention, the sliding window, trimming and left-padded batches
    work as with KVCache. `keys` and `values` are (packed uint32, scales, biases) triples.
    """

    def __init__(self, max_size: Optional[int] = None, keep: int = DEFAULT_KEEP,
                 left_padding: Optional[mx.array] = None, *, bits: int = 8,
                 group_size: int = DEFAULT_KV_GROUP_SIZE):
        super().__init__(max_size=max_size, keep=keep, left_padding=left_padding)
        if bits not in KV_BITS:
            raise ValueError(f"kv bits must be one of {KV_BITS}, got {bits}")
        if group_size not in KV_GROUP_SIZES:
            raise ValueError(f"kv group size must be one of {KV_GROUP_SIZES}, got {group_size}")
        self.bits = bits
        self.group_size = group_size

    @property
    def kv_bits(self) -> Optional[int]:
        return self.bits

    @property
    def kv_group_size(self) -> Optional[int]:
        return self.group_size

    def _quantize(self, x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"head_dim {x.shape[-1]} is not a multiple of the kv group size {self.group_size}: "
                             f"pick a group size that divides it ({', '.join(map(str, KV_GROUP_SIZES))})")
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def _dequantize(self, parts: Tuple[mx.array, ...], end: int) -> mx.array:
        packed, scales, biases = (p[..., :end, :] for p in parts)
        return mx.dequantize(packed, scales, biases, group_size=self.group_size, bits=self.bits)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Quantize and append [B, n_kv, T, hd] keys/values; return all stored ones, dequantized."""
        new = keys.shape[2]
        if self.max_size is not None and self.size + new > self.max_size:
            self._evict(self.size + new - self.max_size)
        end = self.size + new
        new_keys, new_values = self._quantize(keys), self._quantize(values)
        if self.keys is None or end > self.keys[0].shape[2]:
            self._grow(new_keys, new_values, end)
        for stored, fresh in zip(self.keys + self.values, new_keys + new_values):
            stored[..., self.size:end, :] = fresh
        self.size = end
        self.offset += new
        return self._dequantize(self.keys, end), self._dequantize(self.values, end)

    def _grow(self, keys: Tuple[mx.array, ...], values: Tuple[mx.array, ...], needed: int) -> None:
        capacity = -(-needed // CACHE_STEP) * CACHE_STEP
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)

        def grown(old: Optional[Tuple[mx.array, ...]], like: Tuple[mx.array, ...]) -> Tuple[mx.array, ...]:
            parts = []
            for i, part in enumerate(like):
                B, n_kv, _, width = part.shape
                bigger = mx.zeros((B, n_kv, capacity, width), part.dtype)
                if old is not None and self.size:
                    bigger[..., : self.size, :] = old[i][..., : self.size, :]
                parts.append(bigger)
            return tuple(parts)

        self.keys, self.values = grown(self.keys, keys), grown(self.values, values)

    def _stored(self) -> List[mx.array]:
        # Each position's groups are its own, so shifting positions keeps them whole.
        return list(self.keys + self.values)

    @property
    def state(self) -> Tuple[mx.array, ...]:
        """(packed keys, key scales, key biases, packed values, value scales, value biases), without spare
        capacity."""
        if self.keys is None:
            return ()
        return tuple(part[..., : self.size, :] for part in self._stored())

    @property
    def meta_state(self) -> dict:
        return {**super().meta_state, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state(cls, state: Tuple[mx.array, ...], meta_state: dict) -> "QuantizedKVCache":
        pads = meta_state.get("left_padding")
        cache = cls(max_size=meta_state["max_size"], keep=meta_state["keep"],
                    left_padding=None if pads is None else mx.array(pads, dtype=mx.int32),
                    bits=meta_state["bits"], group_size=meta_state["group_size"])
        if meta_state["size"]:
            cache.keys, cache.values = tuple(state[:3]), tuple(state[3:])
        cache.offset, cache.size = meta_state["offset"], meta_state["size"]
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(part.nbytes for part in self._stored())


def make_cache(num_layers: int, *, max_size: Optional[int] = None, keep: int = DEFAULT_KEEP,
               left_padding: Optional[Sequence[int]] = None, kv_bits: Optional[int] = None,
               kv_group_size: int = DEFAULT_KV_GROUP_SIZE) -> List[KVCache]:
    """One cache per layer. `max_size` turns on the sliding window; `left_padding` marks a padded batch;
    `kv_bits` (4 or 8) stores keys and values quantized in groups of `kv_group_size` (QuantizedKVCache)."""
    pads = None if left_padding is None else mx.array(list(left_padding), dtype=mx.int32)
    if kv_bits is None:
        return [KVCache(max_size=max_size, keep=keep, left_padding=pads) for _ in range(num_layers)]
    return [QuantizedKVCache(max_size=max_size, keep=keep, left_padding=pads, bits=kv_bits, group_size=kv_group_size)
            for _ in range(num_layers)]


class RowCaches:
    """One layer's caches for a step of a continuous batch: row b of the batch is one sequence with its
    own KVCache (B = 1) of its own length. The model attends each row over its own cache, exactly as
    when that sequence runs alone, so no row is padded and none waits for another's prompt."""

    def __init__(self, rows: Sequence[KVCache], lengths: Optional[Sequence[int]] = None):
        """`lengths` None: a decode step, one token per row ([B, 1] ids). Else a packed prefill: the rows'
        new tokens one after another in one sequence ([1, sum(lengths)] ids), row b's `lengths[b]` of them
        attending only over row b's cache and each other (causally), at row b's positions."""
        self.rows = list(rows)
        self.lengths = None if lengths is None else list(lengths)

    @property
    def positions(self) -> mx.array:
        """[B] int32: each row's RoPE position for its next token."""
        return mx.array([row.offset for row in self.rows], dtype=mx.int32)
