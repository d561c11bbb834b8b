"""What structured output costs and what it buys, measured on one model.

    python -m openelm_mlx.bench.structured --model DIR|synthetic:270M --tokenizer tokenizer.model \
        [--samples 100] [--max-tokens 96] [--json out.json]

- compile: building a Constraint from a realistic nested schema (llguidance's grammar and its check),
  and the first `start` with a tokenizer, which builds llguidance's view of the 32k vocabulary once.
- mask: the time `ConstraintState.allowed` takes per token, replayed along a constrained greedy answer,
  against the decode step of the same model (the mean ms/token of an unconstrained greedy run), and the
  end-to-end decode ms/token with and without the constraint (the constraint also costs the pipelining:
  the next mask needs the sampled token on the host).
- validity: the share of `--samples` sampled answers (temperature 1, top-p 0.95, seeds 0..N-1) that are
  JSON matching the schema, with the constraint and without it (same prompt; without it, the first JSON
  value found anywhere in the text counts too). Needs the jsonschema package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List, Optional

from ..constraints import Constraint
from ..generation import GenerationOptions
from ..loading import load
from ..streaming import generate

# Realistic and nested, with every feature the docs promise (bounded, so an answer ends).
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 40},
                "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z0-9]{1,12}\\.[a-z]{2,4}$"},
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 60},
                                   "city": {"type": "string", "maxLength": 30},
                                   "country": {"type": "string", "enum": ["US", "KR", "DE", "FR", "JP"]}},
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 1, "maxItems": 5,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                     "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                                     "price": {"type": "number", "minimum": 0, "maximum": 10000}},
                      "required": ["sku", "quantity", "price"], "additionalProperties": False},
        },
        "status": {"type": "string", "enum": ["pending", "paid", "shipped"]},
        "gift": {"type": "boolean"},
    },
    "required": ["id", "customer", "items", "status"],
    "additionalProperties": False,
}
# What the validity rate is measured on: small enough that a free answer could get it right.
RECORD_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "version": {"type": "integer", "minimum": 0, "maximum": 99},
                   "stable": {"type": "boolean"}},
    "required": ["name", "version", "stable"],
    "additionalProperties": False,
}
PROMPT = ('A module described as a JSON object with the keys "name" (a string), "version" (an integer) and '
          '"stable" (true or false):\n')


def measure_compile(tokenizer) -> Dict[str, float]:
    Constraint.any_json()  # imports llguidance, which is not what is measured
    start = time.perf_counter()
    constraint = Constraint.json_schema(NESTED_SCHEMA)
    compiled = time.perf_counter()
    constraint.start(tokenizer)  # the first start also builds the vocabulary view
    first = time.perf_counter()
    constraint.start(tokenizer)
    again = time.perf_counter()
    return {"schema_compile_ms": 1000 * (compiled - start), "first_start_ms": 1000 * (first - compiled),
            "start_ms": 1000 * (again - first)}


def measure_mask(model, tokenizer, max_tokens: int, repeats: int = 3) -> Dict[str, float]:
    constraint = Constraint.json_schema(NESTED_SCHEMA)
    generate(model, tokenizer, PROMPT, GenerationOptions(max_tokens=8))  # warm-up
    free_ms, constrained_ms = [], []
    for _ in range(repeats):  # interleaved: both sides see the same machine load
        free = generate(model, tokenizer, PROMPT, GenerationOptions(max_tokens=max_tokens))
        constrained = generate(model, tokenizer, PROMPT,
                               GenerationOptions(max_tokens=max_tokens, constraint=constraint))
        free_ms.append(1000 / free.stats.generation_tps)
        constrained_ms.append(1000 / constrained.stats.generation_tps)
    state, times = constraint.start(tokenizer), []
    width = model.args.vocab_size
    for token in constrained.tokens:  # replay the answer, timing each mask
        begin = time.perf_counter()
        state.allowed(width)
        times.append(time.perf_counter() - begin)
        if token != tokenizer.eos_id:
            state.advance(token)
    step_ms = statistics.median(free_ms)
    mask_ms = 1000 * statistics.mean(times)
    return {"mask_ms_mean": mask_ms, "mask_ms_median": 1000 * statistics.median(times),
            "mask_ms_max": 1000 * max(times), "mask_tokens": len(times),
            "decode_step_ms": step_ms, "mask_share_of_step": mask_ms / step_ms,
            "constrained_step_ms": statistics.median(constrained_ms),
            "free_tokens": free.stats.generation_tokens, "constrained_tokens": constrained.stats.generation_tokens,
            "constrained_finish": constrained.finish_reason}


def _valid(text: str, lenient: bool) -> bool:
    import jsonschema

    candidates = [text.strip()]
    if lenient:  # the first JSON value anywhere in the text
        decoder = json.JSONDecoder()
        candidates += [text[i:] for i, c in enumerate(text) if c in "{["][:1]
        candidates = [c for c in candidates if c]
    for candidate in candidates:
        try:
            value = decoder.raw_decode(candidate)[0] if lenient else json.loads(candidate)
            jsonschema.validate(value, RECORD_SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            continue
    return False


def measure_validity(model, tokenizer, samples: int, max_tokens: int) -> Dict[str, float]:
    constraint = Constraint.json_schema(RECORD_SCHEMA)
    counts = {"constrained": 0, "constrained_length": 0, "free": 0, "free_lenient": 0}
    for seed in range(samples):
        sampling = dict(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=seed)
        answer = generate(model, tokenizer, PROMPT, GenerationOptions(constraint=constraint, **sampling))
        counts["constrained"] += answer.finish_reason == "stop" and _valid(answer.text, False)
        counts["constrained_length"] += answer.finish_reason == "length"
        free = generate(model, tokenizer, PROMPT, GenerationOptions(**sampling))
        counts["free"] += _valid(free.text, False)
        counts["free_lenient"] += _valid(free.text, True)
        if (seed + 1) % 10 == 0:
            print(f"[{seed + 1}/{samples} samples]", file=sys.stderr, flush=True)
    return {"samples": samples, **{f"{k}_rate": v / samples for k, v in counts.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.structured", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=100, help="sampled answers per side (0: skip validity)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    figures = {"model": args.model, "dtype": args.dtype, **measure_compile(tokenizer),
               **measure_mask(model, tokenizer, args.max_tokens)}
    if args.samples:
        figures.update(measure_validity(model, tokenizer, args.samples, args.max_tokens))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
