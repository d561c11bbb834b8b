"""The quantization quality report: a quantized model against the unquantized one on a text.

Both models run in float32 on the same token ids: the quantized one with weights equal to what the
checkpoint holds (dequantized), so the figures isolate the weight quantization (and the dtype
rounding of the other tensors) from activation precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List

import mlx.core as mx

from openelm_mlx.scoring import target_log_probs

# Built-in evaluation text: documentation-style English and Python (written for this project), a
# few hundred tokens so a report takes seconds on small models.
EVAL_TEXT = """\
Built-in types
==============

The following sections describe the standard types that are built into the interpreter.
The principal built-in types are numerics, sequences, mappings, classes, instances and
exceptions. Some collection classes are mutable. The methods that add, subtract, or
rearrange their members in place, and don't return a specific item, never return the
collection instance itself but ``None``.

.. function:: len(s)

   Return the length (the number of items) of an object. The argument may be a sequence
   (such as a string, bytes, tuple, list, or range) or a collection (such as a dictionary,
   set, or frozen set).

   .. versionchanged:: 3.8
      The function raises :exc:`OverflowError` on lengths larger than :data:`sys.maxsize`.

For example::

   >>> words = ["apple", "banana", "cherry"]
   >>> for index, word in enumerate(words):
   ...     print(index, word.upper())
   0 APPLE
   1 BANANA
   2 CHERRY

A dictionary maps hashable values to arbitrary objects. Mappings are mutable objects, and
there is currently only one standard mapping type, the :class:`dict`.
"""

# Built-in calibration text for the mixed recipe: different from EVAL_TEXT, so the report does
# not grade the recipe on the text it was tuned on.
CALIBRATION_TEXT = """\
The :mod:`os.path` module implements some useful functions on pathnames. To read or write
files see :func:`open`, and for accessing the filesystem see the :mod:`os` module.

.. function:: join(path, *paths)

   Join one or more path segments intelligently. The return value is the concatenation of
   *path* and all members of *paths*, with exactly one directory separator following each
   non-empty part except the last.

   >>> import os
   >>> os.path.join("home", "user", "notes.txt")
   'home/user/notes.txt'

If the argument is not a string, a :exc:`TypeError` is raised. Use :meth:`str.split` to cut
a string into a list of words, and :meth:`str.join` to glue them together again.
"""


@dataclass
class TextQuality:
    text: str
    tokens: int
    mean_kl: float  # KL(unquantized || quantized) of next-token distributions, nats, mean over positions
    top1_agreement: float
    perplexity_unquantized: float
    perplexity_quantized: float


def mean_kl(reference: mx.array, candidate: mx.array) -> float:
    """Mean over positions of KL(reference || candidate), both log-probabilities [T, vocab]."""
    return (mx.exp(reference) * (reference - candidate)).sum(axis=-1).mean().item()


def compare(reference: mx.array, candidate: mx.array, ids: List[int], name: str) -> TextQuality:
    """Quality of `candidate` against `reference` (log-probabilities of `ids` from scoring.log_probs)."""
    ref, cand = reference[:-1], candidate[:-1]  # the last position predicts nothing in the text

    def perplexity(lp: mx.array) -> float:
        return math.exp(-target_log_probs(lp, ids[1:]).mean().item())

    agree = (ref.argmax(axis=-1) == cand.argmax(axis=-1)).astype(mx.float32).mean().item()
    return TextQuality(name, len(ids), mean_kl(ref, cand), agree, perplexity(ref), perplexity(cand))


def build_report(*, qualities: List[TextQuality], parameters: int, nbytes: int, quantization: Dict) -> Dict:
    return {
        "quantization": quantization,
        "parameters": parameters,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / parameters,
        "texts": [asdict(q) for q in qualities],
        "compute": "float32 for both models; the quantized model's weights are exactly the stored ones, dequantized",
    }


def format_report(report: Dict) -> str:
    q = report["quantization"]
    w = max(12, *(len(t["text"]) for t in report["texts"]))
    lines = [f"quality report ({q.get('recipe', 'uniform')}, {q['bits']}-bit default, group {q['group_size']}): "
             f"{report['parameters']:,} parameters, {report['bytes']:,} bytes, "
             f"{report['bits_per_weight']:.3f} bits/weight",
             f"  {'text':<{w}} {'tokens':>6} {'mean KL':>10} {'top-1':>7} {'ppl (orig)':>11} {'ppl (quant)':>11}"]
    for t in report["texts"]:
        lines.append(f"  {t['text']:<{w}} {t['tokens']:>6} {t['mean_kl']:>10.5f} {t['top1_agreement']:>7.3f} "
                     f"{t['perplexity_unquantized']:>11.2f} {t['perplexity_quantized']:>11.2f}")
    return "\n".join(lines)
