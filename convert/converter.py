"""The conversion pipeline: read (lazily), map, cast, quantize, write atomically, report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from openelm_mlx.errors import ConfigError, LoadError, TokenizerNotFoundError
from openelm_mlx.loading import DEFAULT_DTYPE, DTYPES, assign_weights, check_float16
from openelm_mlx.model import Model
from openelm_mlx.prompt_format import ZEPHYR, ChatTemplate, default_template_name
from openelm_mlx.scoring import log_probs
from openelm_mlx.tokenizer import Tokenizer, find_tokenizer

from .hf_tokenizer import write_tokenizer
from .quantize import BITS, GROUP_SIZES, QuantSpec, convert_tensor, dequantize_outputs, quantization_block, uniform_plan
from .recipe import RECIPES, mixed_plan
from .report import CALIBRATION_TEXT, EVAL_TEXT, build_report, compare, format_report
from .sources import Source, open_source
from .writer import DEFAULT_SHARD_GB, REPORT_FILE, AtomicDirectory, write_json, write_weights

DEFAULT_GROUP_SIZE = 64
DEFAULT_BITS = 4  # what -q/--quantize alone gives (mlx-lm's default)
# Token caps keep the report and the recipe's measurements quick (the built-in texts are ~300 and
# ~200 Llama-2 tokens; a small-vocabulary tokenizer would make them several times longer).
REPORT_MAX_TOKENS = 512
CALIBRATION_MAX_TOKENS = 256


@dataclass(frozen=True)
class ConvertOptions:
    source: str
    out: Path
    dtype: str = DEFAULT_DTYPE
    bits: Optional[int] = None  # None: no quantization
    group_size: int = DEFAULT_GROUP_SIZE
    recipe: str = "uniform"
    tokenizer: Optional[Path] = None
    config: Optional[Path] = None  # config.json, or a CoreNet YAML, when not beside the weights
    calibration_file: Optional[Path] = None
    force: bool = False
    force_float16: bool = False
    keep_vocab_padding: bool = False
    report: bool = True
    max_shard_gb: float = DEFAULT_SHARD_GB

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")
        if self.recipe != "uniform" and self.bits is None:
            raise ConfigError(f"--recipe {self.recipe} needs --bits (the mixed recipe stays within the size of "
                              "uniform quantization at --bits)")
        if self.calibration_file is not None and not Path(self.calibration_file).is_file():
            raise LoadError(f"no such calibration file: {self.calibration_file}")
        if self.max_shard_gb <= 0:
            raise ConfigError("--max-shard-size must be positive")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(options: ConvertOptions, *, log: Callable[[str], None] = _stderr) -> Optional[Dict]:
    """Convert options.source into an MLX directory at options.out; returns the quality report, if any."""
    options.validate()
    local_source = Path(options.source).expanduser()
    output = AtomicDirectory(options.out, force=options.force, source=local_source if local_source.exists() else None)
    source = open_source(options.source, config=options.config, keep_vocab_padding=options.keep_vocab_padding)
    args, dtype = source.args, DTYPES[options.dtype]
    check_float16(args, dtype, options.force_float16)
    log(f"source: {source.path} ({source.kind}, {len(source.tensors)} tensors, {args.num_parameters():,} parameters, "
        f"{source.source_bytes / 1e9:.2f} GB)")
    for note in source.notes:
        log(f"note: {note}")
    tokenizer = _tokenizer(source, options, log)
    default = QuantSpec(options.bits, options.group_size) if options.bits else None
    plan = uniform_plan(args, default) if default else {}
    if options.recipe == "mixed" and tokenizer is None:
        raise TokenizerNotFoundError("the mixed recipe measures quantization error on text: pass --tokenizer")
    want_report = bool(plan) and options.report and tokenizer is not None
    if plan and options.report and tokenizer is None:
        log("note: no tokenizer, so no quality report (pass --tokenizer to get one)")

    with output as tmp:
        reference = _reference_model(source, log) if (want_report or options.recipe == "mixed") else None
        recipe_record = None
        if options.recipe == "mixed":
            ids = _ids(tokenizer, _read_text(options.calibration_file) or CALIBRATION_TEXT, args, CALIBRATION_MAX_TOKENS)
            mixed = mixed_plan(reference, ids, plan, default=default, dtype=dtype,
                               progress=_progress(log, "measuring sensitivity", "modules"))
            plan = mixed.plan
            recipe_record = {"name": "mixed", "budget_bits_per_weight": mixed.budget_bits_per_weight,
                             "probe_bits": mixed.probe_bits, "calibration_tokens": len(ids),
                             "sensitivity_kl": {m: round(v, 8) for m, v in mixed.sensitivity.items()}}
        outputs = _convert_tensors(source, reference, dtype, plan, log)
        write_weights(tmp, outputs, max_shard_bytes=int(options.max_shard_gb * (1 << 30)))
        config = args.to_dict()
        if default:
            config["quantization"] = quantization_block(plan, default)
        if recipe_record:
            config["quantization_recipe"] = recipe_record
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer.path, max_context_length=args.max_context_length,
                            chat_template=_chat_template(options))
        report = None
        if want_report:
            report = _report(reference, outputs, plan, tokenizer, options, config["quantization"])
            write_json(tmp / REPORT_FILE, report)
            log(format_report(report))
    log(f"wrote {options.out}")
    return report


def _tokenizer(source: Source, options: ConvertOptions, log) -> Optional[Tokenizer]:
    try:
        path = find_tokenizer(source.model_dir, options.tokenizer)
    except TokenizerNotFoundError:
        log("note: no tokenizer.model found (pass --tokenizer): the output will have none")
        return None
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > source.args.vocab_size:
        raise LoadError(f"the tokenizer {path} has {tokenizer.vocab_size} pieces but the model only "
                        f"{source.args.vocab_size}: it is not this model's tokenizer")
    return tokenizer


def _chat_template(options: ConvertOptions) -> Optional[ChatTemplate]:
    """Zephyr for an Instruct model, told apart by name as the runtime does (`default_template_name`):
    SOURCE's name (its directory's, for a file) or OUT's. None for base models: they take raw text."""
    source = Path(options.source).expanduser()
    names = [source.parent if source.is_file() else source, options.out]
    return ZEPHYR if any(default_template_name(str(name)) == ZEPHYR.name for name in names) else None


def _read_text(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the calibration file {path}: {e}") from None


def _ids(tokenizer: Tokenizer, text: str, args, limit: int) -> List[int]:
    ids = tokenizer.encode(text)[: min(limit, args.max_context_length)]
    if len(ids) < 2:
        raise ConfigError("the calibration text is empty: it needs at least one token after BOS")
    return ids


def _progress(log, what: str, unit: str):
    """A counter redrawn in place on a terminal; elsewhere (logs, pipes) a line per tenth."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if tty:
            print(f"\r{what}: {done}/{total} {unit}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == 1 or done == total or done * 10 // total != (done - 1) * 10 // total:
            log(f"{what}: {done}/{total} {unit}")
    return show


def _reference_model(source: Source, log) -> Model:
    """The unquantized model in float32, read one tensor at a time."""
    log("loading the unquantized model (float32) as the quality reference")
    weights = {name: ref.load().astype(mx.float32) for name, ref in source.tensors.items()}
    model = Model(source.args)
    assign_weights(model, weights, mx.float32)
    return model


def _convert_tensors(source: Source, reference: Optional[Model], dtype, plan, log) -> Dict[str, mx.array]:
    """Each tensor read, cast, quantized and evaluated before the next is read."""
    params = dict(tree_flatten(reference.parameters())) if reference is not None else {}
    outputs: Dict[str, mx.array] = {}
    show = _progress(log, "converting", "tensors")
    for i, (name, ref) in enumerate(source.tensors.items()):
        value = params[name] if name in params else ref.load()
        converted = convert_tensor(name, value, dtype=dtype, plan=plan)
        mx.eval(list(converted.values()))
        outputs.update(converted)
        show(i + 1, len(source.tensors))
    return outputs


def _report(reference: Model, outputs: Dict[str, mx.array], plan, tokenizer: Tokenizer, options: ConvertOptions,
            quantization: Dict) -> Dict:
    args = reference.args
    quantized = Model(args)
    assign_weights(quantized, dequantize_outputs(outputs, plan), mx.float32)
    texts = [("built-in", EVAL_TEXT)]
    if options.calibration_file is not None:
        texts.append((Path(options.calibration_file).name, _read_text(options.calibration_file)))
    qualities = []
    for name, text in texts:
        ids = _ids(tokenizer, text, args, REPORT_MAX_TOKENS)
        qualities.append(compare(log_probs(reference, ids), log_probs(quantized, ids), ids, name))
    nbytes = sum(v.nbytes for v in outputs.values())
    return build_report(qualities=qualities, parameters=args.num_parameters(), nbytes=nbytes,
                        quantization={**quantization, "recipe": options.recipe})
