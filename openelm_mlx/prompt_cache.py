"""A KV cache that remembers which token ids it holds, so a prompt sharing a prefix with the last one
prefills only the rest (a chat's next turn). The server keeps several conversations at once in a
`PrefixStore` instead (engine.py)."""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

from .cache import KVCache
from .drafting import Drafter
from .generation import GenerationOptions, GenerationResponse, cache_fits, new_cache
from .jobs import ReuseStats
from .model import Model
from .streaming import stream_generate
from .tokenizer import Tokenizer


class PromptCache:
    """One sequence's KV cache plus the ids of the positions it holds.

    Not thread-safe: one owner (the chat loop, the server's worker) uses it.
    """

    def __init__(self, model: Model):
        """Each `generate` sizes the cache for its own options (`new_cache`: sliding window, KV
        quantization), starting over when they change."""
        self.model = model
        self.cache: List[KVCache] = []
        self.tokens: List[int] = []
        self.reset()

    def reset(self, options: Optional[GenerationOptions] = None) -> None:
        """Forget everything; the next positions go into a cache built for `options` (default: plain)."""
        self.cache = new_cache(self.model, options or GenerationOptions())
        self.tokens = []

    def reuse(self, prompt: Sequence[int]) -> List[int]:
        """Trim the cache to the longest prefix it shares with `prompt`; return the ids still to prefill
        (at least one: generation starts by feeding a token)."""
        common = 0
        for cached, new in zip(self.tokens, prompt):
            if cached != new:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        for layer_cache in self.cache:
            layer_cache.trim(layer_cache.offset - common)
        self.tokens = self.tokens[:common]
        return list(prompt[common:])

    def sync(self, fed: Sequence[int], options: GenerationOptions) -> None:
        """Record what the cache holds after `fed` (the prefilled ids, then the generated ones) went through
        stream_generate, which leaves every layer holding a prefix of them, however generation ended."""
        held = self.cache[0].offset
        if self.cache[0].size != held:
            self.reset(options)  # a sliding window dropped positions: the ids no longer map
            return
        self.tokens = (self.tokens + list(fed))[:held]

    def generate(self, tokenizer: Tokenizer, prompt: Sequence[int], options: GenerationOptions,
                 stats: Optional["ReuseStats"] = None, *, continues_text: bool = False,
                 draft: Optional[Drafter] = None) -> Iterator[GenerationResponse]:
        """`stream_generate` for the whole `prompt`, prefilling only what the cache does not hold
        (with `draft`, speculatively: the drafter sees every id the cache holds).

        Stop consuming (or close the iterator) at any time: the cache stays consistent.
        """
        if not cache_fits(self.cache, self.model, options):
            self.reset(options)
        new = self.reuse(prompt)
        if stats is not None:
            stats.cached_tokens, stats.prefilled_tokens = len(prompt) - len(new), len(new)
        generated: List[int] = []
        responses = stream_generate(self.model, tokenizer, new, options, cache=self.cache, context_ids=self.tokens,
                                    continues_text=continues_text, draft=draft)
        try:
            for response in responses:
                if response.token >= 0:
                    generated.append(response.token)
                yield response
        finally:
            responses.close()  # settles the cache first
            self.sync(new + generated, options)
