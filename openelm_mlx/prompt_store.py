"""PrefixStore: an LRU of cached prompt prefixes (token ids and their KV caches), bounded in bytes and in
count, so several conversations keep their caches at once and each request prefills only what the
longest matching prefix does not hold.

One owner at a time (the server's worker, an engine's thread) calls `lookup` before a sequence and
`insert` after it; nothing here is thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

from .cache import KVCache
from .generation import GenerationOptions, cache_window, new_cache, quantized_as_asked
from .model import Model

DEFAULT_PROMPT_CACHE_BYTES = 1 << 30  # 1 GiB: ~7 full 2048-token contexts of the 270M in float32
DEFAULT_PROMPT_CACHE_ENTRIES = 16


@dataclass
class StoredPrefix:
    tokens: Tuple[int, ...]
    cache: List[KVCache]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.cache)


class PrefixStore:
    """Cached prefixes of one model, least recently used evicted first.

    `lookup(prompt, options)` returns a cache of its own (the caller may extend it) holding the longest
    prefix of `prompt` that any entry with the same KV quantization holds, and `insert(ids, cache)`
    hands a sequence's cache over to the store (the caller must not touch it afterwards).
    """

    def __init__(self, model: Model, *, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 max_entries: int = DEFAULT_PROMPT_CACHE_ENTRIES):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("the prompt cache's byte and entry limits must be >= 0")
        self.model = model
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: "OrderedDict[Tuple[int, ...], StoredPrefix]" = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[StoredPrefix]:
        """The entries, most recently used first."""
        return iter(reversed(list(self._entries.values())))

    @property
    def nbytes(self) -> int:
        """Bytes held by every entry's cache (spare capacity included)."""
        return sum(entry.nbytes for entry in self._entries.values())

    def lookup(self, prompt: Sequence[int], options: GenerationOptions) -> Tuple[List[KVCache], int]:
        """(a cache sized for `options` holding prompt[:n], n): n is the longest prefix an entry shares
        with `prompt`, at most len(prompt) - 1 (generation starts by feeding a token); 0 with a fresh cache."""
        best, common = None, 0
        for entry in self._entries.values():
            if not quantized_as_asked(entry.cache, options):
                continue
            shared = _common_prefix(entry.tokens, prompt)
            if shared > common:
                best, common = entry, shared
        common = min(common, len(prompt) - 1)
        if best is None or common <= 0:
            return new_cache(self.model, options), 0
        self._entries.move_to_end(best.tokens)
        return copy_prefix(best.cache, common, cache_window(self.model, options)), common

    def insert(self, ids: Sequence[int], cache: List[KVCache]) -> None:
        """Keep `cache`, which holds exactly `ids` (not stored otherwise: a sliding window that dropped
        positions, an empty cache). An entry that `ids` extends is replaced; one that extends `ids` is
        kept instead (it serves every lookup this one would). Then the least recently used entries go
        until the limits hold."""
        tokens = tuple(int(t) for t in ids)
        first = cache[0]
        if not tokens or first.size != first.offset or first.offset != len(tokens):
            return
        for key in list(self._entries):
            entry = self._entries[key]
            if not _same_quantization_as(entry.cache, first):
                continue
            if key[:len(tokens)] == tokens:  # an entry already holds all of it
                self._entries.move_to_end(key)
                return
            if tokens[:len(key)] == key:
                del self._entries[key]
        self._entries[tokens] = StoredPrefix(tokens, cache)
        self._evict()

    def _evict(self) -> None:
        total = self.nbytes
        while self._entries and (total > self.max_bytes or len(self._entries) > self.max_entries):
            _, oldest = self._entries.popitem(last=False)
            total -= oldest.nbytes

    def stats(self) -> Dict[str, int]:
        """Entries, cached tokens and bytes, for logs."""
        return {"entries": len(self._entries), "tokens": sum(len(k) for k in self._entries),
                "bytes": self.nbytes}


def copy_prefix(cache: List[KVCache], length: int, max_size) -> List[KVCache]:
    """New cache objects holding the first `length` positions of `cache` (which dropped none), with the
    sliding window `max_size`. They share no array that either side writes to: a write grows a copy."""
    copies = []
    for layer in cache:
        state = tuple(part[..., :length, :] for part in layer.state)
        meta = {**layer.meta_state, "offset": length, "size": length, "max_size": max_size}
        copies.append(type(layer).from_state(state, meta))
    return copies


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _same_quantization_as(cache: List[KVCache], other: KVCache) -> bool:
    return cache[0].kv_bits == other.kv_bits and cache[0].kv_group_size == other.kv_group_size
