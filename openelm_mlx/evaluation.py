"""lm-evaluation-harness on our models: an `lm_eval` LM class and `evaluate`, the harness run.

Needs the `eval` extra (lm-eval). Prompts are encoded the way Apple's model cards run the harness
for OpenELM: BOS added (`add_bos_token=True`). `loglikelihood` goes through `scoring`, batched, with a
multiple-choice question's shared context run once through the KV cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .errors import OpenELMError, TaskDataError
from .generation import GenerationOptions
from .loading import load
from .model import Model
from .scoring import DEFAULT_BATCH_SIZE, score_continuations
from .streaming import generate
from .tokenizer import Tokenizer

# generate_until's length when a task gives no max_gen_toks (the harness's own default).
DEFAULT_MAX_GEN_TOKS = 256


@register_model("openelm-mlx")
class OpenELMLM(TemplateLM):
    """An OpenELM model for lm-evaluation-harness.

    Give a loaded `Model` and its `Tokenizer`, or (as `lm_eval --model openelm-mlx --model_args
    pretrained=PATH,dtype=float32,tokenizer=FILE`) a path or repo id to load.
    """

    def __init__(self, pretrained: Model | str, tokenizer: Tokenizer | str | None = None, *,
                 dtype: Optional[str] = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 share_prefixes: bool = True, **_harness_options: Any):
        super().__init__()
        if isinstance(pretrained, Model):
            if not isinstance(tokenizer, Tokenizer):
                raise ValueError("a Model needs its Tokenizer")
            self.model, self.tokenizer = pretrained, tokenizer
        else:
            self.model, self.tokenizer = load(pretrained, dtype=dtype, tokenizer=tokenizer)
        self.batch_size = int(batch_size)
        self.share_prefixes = share_prefixes

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # what an empty context is scored after

    @property
    def max_length(self) -> int:
        return self.model.args.max_context_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **_: Any) -> List[int]:
        """SentencePiece ids; BOS first unless add_special_tokens is False (add_bos_token=True)."""
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests: List[Tuple[Tuple[str, str], List[int], List[int]]],
                              disable_tqdm: bool = False, **_: Any) -> List[Tuple[float, bool]]:
        pairs = [_truncate(context, continuation, self.max_length) for _, context, continuation in requests]
        with tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm or None) as bar:
            scores = score_continuations(self.model, pairs, batch_size=self.batch_size,
                                         share_prefixes=self.share_prefixes, progress=bar.update)
        answers = [(score.log_prob, score.greedy) for score in scores]
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Summed log-probability of whole texts: disjoint windows of the model's context, each text's
        first token predicted from BOS (the harness's own windowing)."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        with tqdm(total=len(windows), desc="loglikelihood_rolling", disable=disable_tqdm or None) as bar:
            scores = score_continuations(self.model, windows, batch_size=self.batch_size, progress=bar.update)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, when the task asks) completions through `generate`, stopped at `until`."""
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm or None):
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens):]
            options = GenerationOptions(max_tokens=max_tokens, temperature=temperature, stop=tuple(until))
            text = generate(self.model, self.tokenizer, ids, options).text
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out


def _truncate(context: List[int], continuation: List[int], max_length: int) -> Tuple[List[int], List[int]]:
    """Keep the last max_length + 1 tokens of context + continuation (the model sees all but the last),
    as the harness's Hugging Face model does."""
    if len(continuation) > max_length:
        raise OpenELMError(f"a continuation of {len(continuation)} tokens does not fit the "
                           f"{max_length}-token context")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    return whole[:len(whole) - len(continuation)], list(continuation)


def evaluate(model: Model, tokenizer: Tokenizer, tasks: Sequence[str], *, num_fewshot: Optional[int] = None,
             limit: Optional[float] = None, include_path: Optional[Path] = None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> Dict[str, Any]:
    """Run lm-evaluation-harness's `simple_evaluate` on `tasks`; returns its results dict.

    Unknown task names and task data that cannot be fetched (offline) raise TaskDataError.
    """
    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskDataError(f"unknown task {', '.join(unknown)}: the harness's names are listed by "
                            "`lm-eval ls tasks`; local YAML tasks need --include-path DIR")
    lm = OpenELMLM(model, tokenizer, batch_size=batch_size)
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                               task_manager=manager, log_samples=False)
    except OpenELMError:
        raise
    except (OSError, ValueError) as e:  # datasets' and the hub's fetch errors are OSError/ConnectionError
        dataset = _dataset_named(e, manager, tasks)
        if dataset is None:
            raise
        raise TaskDataError(
            f"the data of {dataset} could not be fetched from the Hugging Face hub ({type(e).__name__}); "
            "offline, run a task from the local cache, or point --include-path at a directory of task YAMLs "
            "whose dataset_path is a local loader (json, csv) with data_files (see docs/eval.md)") from None


def _task_manager(tasks: Sequence[str], include_path: Optional[Path]) -> TaskManager:
    """The harness's task index: only --include-path's when it holds every task (indexing the harness's
    ~15,000 built-in tasks takes a minute on a small CPU), else the built-in tasks and include_path's."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def _dataset_named(error: BaseException, manager: TaskManager, tasks: Sequence[str]) -> Optional[str]:
    """The dataset (a requested task's dataset_path) a fetch error is about; None if it is about none."""
    text = f"{error} {error.__cause__ or ''} {error.__context__ or ''}"
    paths = [str((manager.task_index[t].cfg or {}).get("dataset_path", "")) for t in tasks]
    named = [p for p in paths if p and re.search(rf"(?<![\w/-]){re.escape(p)}(?![\w/-])", text)]
    if named:
        return named[0]
    if re.search(r"offline|couldn't reach|connection|on the hub|huggingface\.co", text, re.IGNORECASE):
        return ", ".join(p for p in paths if p) or "a task"
    return None
