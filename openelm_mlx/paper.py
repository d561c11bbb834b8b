"""The OpenELM paper's zero-shot results, to print beside ours (`openelm-mlx eval --paper`).

Source: Mehta et al., "OpenELM: An Efficient Language Model Family with Open Training and Inference
Framework", arXiv 2404.14619, zero-shot table (Table 4(a)), as reproduced in the "Zero-Shot" table of
Apple's model cards (huggingface.co/apple/OpenELM-*). Accuracy in percent, lm-evaluation-harness,
0-shot, BOS added (add_bos_token=True). Base models only: the Instruct rows are a different claim.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Dict, Optional

# lm-evaluation-harness task names of the paper's seven zero-shot tasks, in the paper's order.
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")

PAPER_ZERO_SHOT: Dict[str, Dict[str, float]] = {
    "270M": dict(zip(PAPER_TASKS, (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91))),
    "450M": dict(zip(PAPER_TASKS, (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01))),
    "1_1B": dict(zip(PAPER_TASKS, (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72))),
    "3B": dict(zip(PAPER_TASKS, (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51))),
}

# "apple/OpenELM-270M", "OpenELM-1_1B", "OpenELM-450M-4bit" (a conversion keeps the name); not Instruct.
_APPLE_NAME = re.compile(r"^OpenELM-(270M|450M|1_1B|3B)(?:$|[-_.](?!Instruct))", re.IGNORECASE)


def paper_size(model: str) -> Optional[str]:
    """The Apple size ("270M", ...) a --model argument names, from its last path component; None otherwise."""
    match = _APPLE_NAME.match(PurePath(str(model).rstrip("/")).name)
    if match is None or "instruct" in PurePath(str(model)).name.lower():
        return None
    return next(size for size in PAPER_ZERO_SHOT if size.lower() == match.group(1).lower())
