"""`openelm-mlx eval`: lm-evaluation-harness tasks on an OpenELM model.

The parser is built without lm-eval (an optional extra); the harness is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

from .cli_args import add_model_options, load_from_args
from .errors import InvalidOptionError, OpenELMError
from .paper import PAPER_TASKS, PAPER_ZERO_SHOT, paper_size
from .scoring import DEFAULT_BATCH_SIZE

PAPER_SOURCE = "OpenELM paper (arXiv 2404.14619), zero-shot table, as in Apple's model cards"


def register(subparsers) -> None:
    """Add `openelm-mlx eval`."""
    p = subparsers.add_parser(
        "eval", help="lm-evaluation-harness tasks (needs the eval extra)",
        description="Run lm-evaluation-harness tasks through its Python API with this runtime as the model "
                    "(prompts get BOS, as Apple's model cards run the harness). Prints the harness's results "
                    "table; --output writes its JSON. Task data comes from the Hugging Face hub, or from local "
                    "task YAMLs under --include-path. Needs: pip install 'openelm-mlx[eval]'.")
    add_model_options(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated task names, e.g. arc_easy,piqa")
    which.add_argument("--paper", action="store_true",
                       help="the paper's seven zero-shot tasks (" + ", ".join(PAPER_TASKS) + "), with the "
                            "paper's numbers beside ours for Apple's base checkpoints")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, metavar="N",
                   help="at most N examples per task (a fraction of each task when below 1)")
    p.add_argument("--include-path", type=Path, metavar="DIR", help="directory of extra task YAMLs (local tasks)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help="requests per forward pass (default %(default)s)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write the harness's results JSON here")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """`openelm-mlx eval`: the harness's table (and ours beside the paper's) to stdout."""
    tasks = list(PAPER_TASKS) if args.paper else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise InvalidOptionError("--tasks names no task: give comma-separated names, e.g. arc_easy,piqa")
    if args.paper and args.num_fewshot:
        raise InvalidOptionError("--paper runs the paper's zero-shot setting: drop --num-fewshot")
    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise InvalidOptionError(f"--limit must be positive, got {args.limit:g}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise InvalidOptionError(f"--include-path {args.include_path} is not a directory")
    try:
        from .evaluation import evaluate  # the optional lm-eval, imported only when it is needed
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise OpenELMError(f"openelm-mlx eval needs lm-evaluation-harness ({e.name} is missing): "
                           "pip install 'openelm-mlx[eval]'") from None
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    model, tokenizer = load_from_args(args)
    results = evaluate(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=limit,
                       include_path=args.include_path, batch_size=args.batch_size)
    if results is None:  # not the main process of a distributed run: never the case here
        return 0
    size = paper_size(args.model)
    shots = args.num_fewshot or 0
    if size is not None and shots == 0 and any(t in PAPER_TASKS for t in tasks):
        results["paper_zero_shot"] = {"model": f"OpenELM-{size}", "source": PAPER_SOURCE,
                                      "accuracy_percent": {t: PAPER_ZERO_SHOT[size][t] for t in tasks
                                                           if t in PAPER_TASKS}}
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if "paper_zero_shot" in results:
        print(paper_comparison(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return 0


def paper_comparison(results: Dict[str, Any]) -> str:
    """Our accuracies (acc and acc_norm, in percent) beside the paper's, one line per paper task."""
    paper = results["paper_zero_shot"]
    lines = [f"beside the paper ({paper['source']}; {paper['model']}):",
             f"  {'task':<14} {'acc':>7} {'acc_norm':>9} {'paper':>7}"]
    for task, published in paper["accuracy_percent"].items():
        ours = results["results"].get(task, {})
        lines.append(f"  {task:<14} {_percent(ours.get('acc,none')):>7} {_percent(ours.get('acc_norm,none')):>9} "
                     f"{published:>7.2f}")
    return "\n".join(lines)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
