"""Speculative decoding: drafters that guess the next tokens, and the rule that accepts or rejects them.

A drafter proposes up to k tokens after the sequence so far; the decode loop (generation.py) has the
target score them all in one forward pass and keeps the longest run it agrees with. Greedy keeps a
draft while it equals the target's argmax, so the output is exactly plain greedy decoding. Sampling
uses speculative sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft d with probability
min(1, p(d) / q(d)), else draw from the normalised max(0, p - q); p and q are both after the same
repetition penalty, temperature and top-k / top-p / min-p filters, so the output distribution is the
target's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Protocol, Sequence, Tuple, Union

import mlx.core as mx

from .cache import KVCache, make_cache
from .errors import InvalidOptionError, LoadError
from .model import Model
from .sampling import filter_logits, make_repetition_penalty

# The longest n-gram prompt lookup tries to match (it falls back to shorter ones down to 1).
PROMPT_LOOKUP_NGRAM = 3
# Draft-model prompt tokens per forward pass when it catches up with the sequence.
DRAFT_PREFILL_STEP = 512
# The smallest OpenELM drafts for the larger ones of the same variant (base or Instruct).
AUTO_DRAFT_SIZE = "270M"
# `num_draft_tokens` value that lets the draft length adapt to the acceptance (AdaptiveDraftLength).
ADAPTIVE = "auto"
# The adaptive draft length starts here and stays within 1..ADAPTIVE_MAX_DRAFT_TOKENS.
ADAPTIVE_START_DRAFT_TOKENS = 2
ADAPTIVE_MAX_DRAFT_TOKENS = 8
_OPENELM_NAME = re.compile(r"OpenELM-(270M|450M|1_1B|3B)(-Instruct)?")


@dataclass(frozen=True)
class Scoring:
    """How the logits at a position become the next token's distribution: the repetition penalty over
    that position's own window, then temperature and the top-k / top-p / min-p filters. The target and
    a draft model score with the same instance, so p and q are comparable. Made by
    `GenerationOptions.scoring()`, where the defaults live."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    repetition_context_size: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def penalise(self, logits: mx.array, windows: Sequence[Sequence[int]]) -> mx.array:
        """Apply the repetition penalty to each row of `logits` [N, V] with that row's window of ids."""
        if self.repetition_penalty == 1.0:
            return logits
        size = self.repetition_context_size
        recent = [list(w)[-size:] for w in windows]
        width = max(len(w) for w in recent)
        # Rows are padded by repeating their first id: penalising an id twice writes the same value.
        padded = mx.array([w + w[:1] * (width - len(w)) for w in recent])
        return make_repetition_penalty(self.repetition_penalty, size)(padded, logits)

    def probabilities(self, logits: mx.array) -> mx.array:
        """The sampling distribution [N, V] of penalised logits [N, V] (not for greedy)."""
        return mx.softmax(filter_logits(logits, self.temperature, self.top_k, self.top_p, self.min_p), axis=-1)


class Drafter(Protocol):
    """Proposes the tokens that follow a sequence; the target then verifies them."""

    def propose(self, ids: Sequence[int], k: int, scoring: Scoring,
                key: Optional[mx.array]) -> Tuple[List[int], Optional[mx.array]]:
        """Up to `k` tokens after `ids` (the whole sequence so far), and their draft distributions
        q [len, V] when the drafter samples (None: each proposal is certain, q is one-hot)."""
        ...


class PromptLookup:
    """Drafts by n-gram match: finds the latest earlier occurrence of the sequence's last n ids (n from
    `max_ngram` down to 1) and proposes the ids that followed it. No model; pays off when the answer
    repeats its input (editing, summarising, code, retrieval)."""

    def __init__(self, max_ngram: int = PROMPT_LOOKUP_NGRAM):
        if not (isinstance(max_ngram, int) and max_ngram >= 1):
            raise InvalidOptionError(f"the prompt-lookup n-gram size must be a positive integer, got {max_ngram!r}")
        self.max_ngram = max_ngram

    def propose(self, ids: Sequence[int], k: int, scoring: Scoring,
                key: Optional[mx.array]) -> Tuple[List[int], Optional[mx.array]]:
        ids = list(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest match first, never the suffix itself
                if ids[start:start + n] == suffix:
                    return ids[start + n:start + n + k], None
        return [], None


class DraftModel:
    """Drafts with a smaller OpenELM of the same vocabulary (the 270M for the 1.1B or 3B). It keeps its
    own KV cache and the ids it holds; each proposal first trims it to the prefix it shares with the
    sequence (rolling back rejected drafts, or following a new prompt), then catches up."""

    def __init__(self, model: Model):
        self.model = model
        self.cache: List[KVCache] = make_cache(len(model.layers))
        self.tokens: List[int] = []  # the ids self.cache holds

    def check_target(self, target: Model) -> None:
        """Refuse a target whose vocabulary differs: draft ids would mean other tokens."""
        ours, theirs = self.model.args.vocab_size, target.args.vocab_size
        if ours != theirs:
            raise InvalidOptionError(
                f"the draft model's vocabulary has {ours} tokens but the target's has {theirs}: use a draft from "
                "the same model family (OpenELM models share the Llama-2 tokenizer)")

    def propose(self, ids: Sequence[int], k: int, scoring: Scoring,
                key: Optional[mx.array]) -> Tuple[List[int], Optional[mx.array]]:
        ids = list(ids)
        common = 0
        for held, new in zip(self.tokens, ids):
            if held != new:
                break
            common += 1
        common = min(common, len(ids) - 1)  # feed at least one id to get logits
        for layer_cache in self.cache:
            layer_cache.trim(layer_cache.offset - common)
        feed = ids[common:]
        for start in range(0, len(feed) - 1, DRAFT_PREFILL_STEP):  # all but the last chunk, no logits
            chunk = feed[start:min(start + DRAFT_PREFILL_STEP, len(feed) - 1)]
            self.model.hidden(mx.array([chunk]), self.cache, last=1)
            mx.eval([layer_cache.state for layer_cache in self.cache])
        feed = feed[-1:] if len(feed) > 1 else feed
        inputs = mx.array([feed])
        drafted: List[mx.array] = []  # [1] each; read once at the end unless the penalty needs them
        distributions = []
        penalised = scoring.repetition_penalty != 1.0
        for _ in range(k):
            hidden = self.model.hidden(inputs, self.cache)
            logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)
            if penalised:
                logits = scoring.penalise(logits, [ids + [int(t.item()) for t in drafted]])
            if scoring.greedy:
                token = mx.argmax(logits, axis=-1)
            else:
                q = scoring.probabilities(logits)
                sub = None
                if key is not None:
                    key, sub = mx.random.split(key)
                token = mx.random.categorical(mx.log(q), key=sub)
                distributions.append(q[0])
            drafted.append(token)
            inputs = token[:, None]
            mx.async_eval(token)
        drafts = mx.concatenate(drafted).tolist() if drafted else []
        self.tokens = ids + drafts[:-1]  # the last draft was never fed
        return drafts, (mx.stack(distributions) if distributions else None)


class AdaptiveDraftLength:
    """How many tokens to draft next, following the acceptance: one more after a round whose drafts
    were all accepted (up to `most`), one fewer after a round with a rejection (down to 1); a round
    with nothing drafted (prompt lookup found no match) changes nothing. It settles where about half
    the rounds are accepted whole, near ln(1/2) / ln(a) drafts for a per-token acceptance a (1 at
    a = 0.5, 2 at 0.7, 6-7 at 0.9). It looks only at accept/reject outcomes, never at timings, so a
    seeded run is reproducible and the output is unchanged (each round is exact whatever its length)."""

    def __init__(self, start: int = ADAPTIVE_START_DRAFT_TOKENS, most: int = ADAPTIVE_MAX_DRAFT_TOKENS):
        self.most = most
        self.current = max(1, min(start, most))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.current = min(self.current + 1, self.most) if accepted == drafted else max(self.current - 1, 1)


def check_num_draft_tokens(value: Union[int, str]) -> None:
    """Refuse a `num_draft_tokens` that is neither a positive integer nor ADAPTIVE."""
    if value != ADAPTIVE and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise InvalidOptionError(f"num_draft_tokens must be a positive integer or {ADAPTIVE!r} (adapts to the "
                                 f"acceptance), got {value!r}")


@dataclass
class Speculation:
    """Speculative decoding for one sequence: the drafter, how many tokens it drafts per round (a fixed
    K, or ADAPTIVE: AdaptiveDraftLength), and the counters the decode loop keeps (drafted and accepted
    tokens, target passes, where the last token came from)."""

    drafter: Drafter
    num_draft_tokens: Union[int, str]
    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0  # verify passes (each also yields one token of the target's own)
    last_from_draft: bool = False
    adaptive: Optional[AdaptiveDraftLength] = field(init=False)  # the policy with ADAPTIVE, else None

    def __post_init__(self) -> None:
        check_num_draft_tokens(self.num_draft_tokens)
        self.adaptive = AdaptiveDraftLength() if self.num_draft_tokens == ADAPTIVE else None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_length(self) -> int:
        """How many tokens the next round drafts."""
        return self.adaptive.current if self.adaptive else self.num_draft_tokens

    def record_round(self, drafted: int, accepted: int) -> None:
        """Count one verify pass that checked `drafted` drafts and accepted `accepted` of them."""
        self.drafted += drafted
        self.accepted += accepted
        self.target_passes += 1
        if self.adaptive:
            self.adaptive.update(drafted, accepted)


def accept_drafts(p: mx.array, q: Optional[mx.array], drafts: Sequence[int],
                  key: Optional[mx.array]) -> Tuple[int, int]:
    """Speculative sampling over one verify pass: p [k+1, V] are the target's distributions at the k
    drafts and after them, q [k, V] the draft's (None: one-hot on the drafts). Returns (how many drafts
    are accepted, the token that follows them): a draw from the normalised max(0, p - q) at the first
    rejection, else from p after the last draft. One host sync."""
    k = len(drafts)
    accept_key = draw_key = None
    if key is not None:
        accept_key, draw_key = mx.random.split(key)
    if k:
        rows, chosen = mx.arange(k), mx.array(list(drafts))
        p_draft = p[rows, chosen]
        if q is None:
            q_draft = mx.ones_like(p_draft)
            residual = p[:k] * (mx.arange(p.shape[-1])[None, :] != chosen[:, None])
        else:
            q_draft = q[rows, chosen]
            residual = mx.maximum(p[:k] - q, 0.0)
        # u < p/q happens with probability min(1, p/q); written without the division.
        accepted = mx.random.uniform(shape=(k,), key=accept_key) * q_draft < p_draft
        choices = mx.concatenate([residual, p[k:]], axis=0)
    else:
        accepted = mx.zeros((0,), dtype=mx.bool_)
        choices = p
    draws = mx.random.categorical(mx.log(choices), key=draw_key)  # log 0 = -inf: never drawn
    accepted, draws = accepted.tolist(), draws.tolist()
    n = next((i for i, ok in enumerate(accepted) if not ok), k)
    return n, draws[n]


def auto_draft_source(target: str) -> str:
    """Where `--draft-model auto` finds the draft for `target` (an apple/OpenELM-* repo id or a directory
    named like one): the 270M of the same variant (Instruct for Instruct), as a sibling directory of a
    local target, else from the Hugging Face cache. Never downloads; a clear error when it is missing."""
    name = Path(target.rstrip("/")).name
    match = _OPENELM_NAME.fullmatch(name)
    if match is None:
        raise InvalidOptionError(
            f"--draft-model auto works for apple/OpenELM-* models (or directories named like them), not {target}: "
            "pass --draft-model PATH, or use --prompt-lookup")
    size, instruct = match.group(1), match.group(2) or ""
    if size == AUTO_DRAFT_SIZE:
        raise InvalidOptionError(f"{name} is already the smallest OpenELM: there is no smaller draft for it "
                                 "(use --prompt-lookup)")
    draft_name = f"OpenELM-{AUTO_DRAFT_SIZE}{instruct}"
    local = Path(target).expanduser()
    if local.is_dir() and (local.parent / draft_name / "config.json").is_file():
        return str(local.parent / draft_name)
    repo = f"apple/{draft_name}"
    from huggingface_hub import snapshot_download  # a slow import, only when needed (as in loading.py)
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, allow_patterns=["config.json", "*.safetensors", "*.json"],
                                 local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise LoadError(
            f"--draft-model auto needs {repo}, which is neither next to {target} nor in the Hugging Face cache: "
            f"download it once (huggingface-cli download {repo}) or pass --draft-model PATH") from None
