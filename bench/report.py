"""Benchmark output: one record per configuration and implementation, ratios, a table, JSON, a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

from ..errors import OpenELMError
from .runner import MLX_LM, OURS, SPECULATIVE, Measurement
from .system import SystemInfo

PLAIN_PAIR = f"{OURS}/{MLX_LM}"  # the `impl` of the plain-decode ratio record


def record(m: Measurement, system: SystemInfo) -> Dict:
    """The JSON object of one measurement: medians, min/max over trials, and what ran it."""
    ckpt = m.checkpoint
    decode = m.median("decode_tok_s")
    achieved = m.weight_bytes * decode / 1e9
    out = {
        "config": m.config, "impl": m.impl, "model": ckpt.name, "dtype": m.compute_dtype, "checkpoint_dtype": ckpt.stored_dtype,
        "bits": ckpt.bits, "group_size": ckpt.group_size,
        "prompt_tokens": m.prompt_tokens, "gen_tokens": m.gen_tokens, "trials": len(m.trials),
    }
    for name in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        low, high = m.spread(name)
        out.update({name: m.median(name), f"{name}_min": low, f"{name}_max": high})
    out.update({
        "peak_memory_bytes": max(t.peak_memory_bytes for t in m.trials),
        "decode_peak_memory_bytes": max(t.decode_peak_memory_bytes for t in m.trials),
        "weight_bytes": m.weight_bytes,
        "kv_cache_bytes": max(t.kv_cache_bytes for t in m.trials),
        "achieved_bandwidth_gb_s": achieved,
        "bandwidth_fraction": achieved / system.copy_bandwidth_gb_s if system.copy_bandwidth_gb_s else None,
        **system.as_dict(),
    })
    if m.drafter is not None:
        out.update(speculative_fields(m))
    return out


def speculative_fields(m: Measurement) -> Dict:
    """What a speculative measurement adds: the drafter, its counters over the last trial (greedy: every
    trial alike), tokens per target pass (the prefill's pass included) and, for ours, the verify-pass cost."""
    last = m.trials[-1]
    drafted = last.drafted_tokens or None  # None: mlx-lm does not report what it drafted
    return {"drafter": m.drafter, "num_draft_tokens": m.num_draft_tokens, "drafted_tokens": drafted,
            "accepted_tokens": last.accepted_tokens,
            "acceptance_rate": last.accepted_tokens / drafted if drafted else None,
            "tokens_per_pass": len(last.tokens) / (last.verify_passes + 1),
            "verify_cost": m.verify_cost}


def ratio_record(ours: Measurement, theirs: Measurement) -> Dict:
    """Our/their medians, and the spread of trial-by-trial ratios (trials were interleaved in pairs)."""
    out = {"config": ours.config, "impl": f"{ours.impl}/{theirs.impl}", "model": ours.checkpoint.name, "dtype": ours.compute_dtype,
           "mlx_lm_dtype": theirs.compute_dtype, "bits": ours.checkpoint.bits,
           "prompt_tokens": ours.prompt_tokens, "gen_tokens": ours.gen_tokens}
    for kind in ("decode", "prefill"):
        name = f"{kind}_tok_s"
        pairs = [getattr(a, name) / getattr(b, name) for a, b in zip(ours.trials, theirs.trials) if getattr(b, name)]
        out[f"{kind}_ratio"] = ours.median(name) / theirs.median(name) if theirs.median(name) else None
        out[f"{kind}_ratio_min"] = min(pairs, default=None)
        out[f"{kind}_ratio_max"] = max(pairs, default=None)
    out["same_tokens"] = ours.trials[0].tokens == theirs.trials[0].tokens
    return out


def records(groups: Sequence[List[Measurement]], system: SystemInfo) -> List[Dict]:
    """Every measurement's record (a speculative one with its speedup over the same implementation's
    plain decode); after each configuration measured against mlx-lm, its ratios (plain, speculative)."""
    out = []
    for group in groups:
        by_impl = {m.impl: m for m in group}
        for m in group:
            row = record(m, system)
            if m.drafter is not None:
                plain = by_impl[m.impl[: -len(SPECULATIVE)]]
                row["plain_decode_tok_s"] = plain.median("decode_tok_s")
                row["speedup"] = m.median("decode_tok_s") / row["plain_decode_tok_s"]
                row["same_tokens_as_plain"] = m.trials[0].tokens == plain.trials[0].tokens
            out.append(row)
        for suffix in ("", SPECULATIVE):
            if MLX_LM + suffix in by_impl and OURS + suffix in by_impl:
                out.append(ratio_record(by_impl[OURS + suffix], by_impl[MLX_LM + suffix]))
    return out


def table(rows: Sequence[Dict], system: SystemInfo) -> str:
    """A readable table: medians with [min-max] over trials, then the ratios."""
    lines = [f"device: {system.device}, MLX {system.mlx_version}"
             + (f", BLAS: {system.blas}" if system.blas else ""),
             f"copy bandwidth: {system.copy_bandwidth_gb_s:.1f} GB/s (read + write)", ""]
    header = ("configuration", "impl", "dtype", "prompt", "gen", "prefill tok/s", "decode tok/s", "TTFT ms",
              "peak MB", "weights MB", "GB/s", "% copy BW")
    body = []
    for r in rows:
        if "decode_tok_s" not in r:
            continue
        fraction = r["bandwidth_fraction"]
        body.append((
            r["config"], r["impl"], r["dtype"], str(r["prompt_tokens"]), str(r["gen_tokens"]),
            f"{r['prefill_tok_s']:.1f} [{r['prefill_tok_s_min']:.1f}-{r['prefill_tok_s_max']:.1f}]",
            f"{r['decode_tok_s']:.2f} [{r['decode_tok_s_min']:.2f}-{r['decode_tok_s_max']:.2f}]",
            f"{r['ttft_s'] * 1000:.0f}", f"{r['decode_peak_memory_bytes'] / 1e6:.0f}",
            f"{r['weight_bytes'] / 1e6:.0f}", f"{r['achieved_bandwidth_gb_s']:.2f}",
            f"{100 * fraction:.0f}%" if fraction is not None else "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    speculative = [r for r in rows if "speedup" in r]
    if speculative:
        lines.append("")
        for r in speculative:
            lines.append(speculative_line(r))
        if any(r["model"].startswith("synthetic") for r in speculative):
            lines.append("synthetic weights are random: a draft model's acceptance is near 0 and shows no real "
                         "speedup; the verify cost (time of a pass over K+1 tokens / a 1-token step) is real")
    ratios = [r for r in rows if "decode_ratio" in r]
    if ratios:
        lines.append("")
        for r in ratios:
            lines.append(
                f"{r['config']}: {'' if r['impl'] == PLAIN_PAIR else 'speculative, '}"
                f"ours {r['dtype']} vs mlx-lm {r['mlx_lm_dtype']}: decode x{_num(r['decode_ratio'])} "
                f"[{_num(r['decode_ratio_min'])}-{_num(r['decode_ratio_max'])}], prefill x{_num(r['prefill_ratio'])} "
                f"[{_num(r['prefill_ratio_min'])}-{_num(r['prefill_ratio_max'])}]"
                + ("" if r["same_tokens"] else " (greedy tokens differ)"))
    lines.append("peak MB: during decode, this implementation's own memory (weights + KV cache + work buffers); "
                 "GB/s: weight bytes x decode tokens/s")
    if system.backend == "cpu":
        lines.append("% copy BW: MLX's CPU copy runs on one thread while a multithreaded BLAS reads weights on all "
                     "cores, so it can pass 100%")
    return "\n".join(lines)


def speculative_line(r: Dict) -> str:
    """One table line on a speculative measurement."""
    acceptance = "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
    drafted = "" if r["drafted_tokens"] is None else f"/{r['drafted_tokens']}"
    verify = "" if r["verify_cost"] is None else f", verify pass of {r['num_draft_tokens'] + 1} tokens x{r['verify_cost']:.2f} a step"
    return (f"{r['config']}: {r['impl']} ({r['drafter']}, K={r['num_draft_tokens']}): decode "
            f"{r['decode_tok_s']:.2f} vs plain {r['plain_decode_tok_s']:.2f} tok/s = speedup x{r['speedup']:.2f}; "
            f"accepted {r['accepted_tokens']}{drafted} ({acceptance}), {r['tokens_per_pass']:.2f} tokens per target pass"
            + verify + ("" if r["same_tokens_as_plain"] else " (greedy tokens differ from plain)"))


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_json(rows: Sequence[Dict], path: Path) -> None:
    """A JSON array of the records, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(rows), indent=1) + "\n")
    os.replace(tmp, path)


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OpenELMError("--plot needs matplotlib: pip install 'openelm-mlx[plot]' (or pip install matplotlib)") from None


PLOT_LABEL_CHARS = 28  # longest model name on the plot's axis; longer ones keep their ends around an ellipsis


def short_model_name(name: str, limit: int = PLOT_LABEL_CHARS) -> str:
    """A model path or repo id as the plot shows it: its last component, middle elided past `limit` characters."""
    last = Path(name.rstrip("/")).name or name
    if len(last) <= limit:
        return last
    head = (limit - 1) // 2
    return last[:head] + "…" + last[len(last) - (limit - 1 - head):]


def plot_label(row: Dict) -> str:
    """A configuration's axis label: the short model name, then quantization and dtype on their own lines."""
    config, model = row["config"], row["model"]
    if not config.startswith(model):
        return config.replace(", ", "\n")
    rest = config[len(model):].lstrip(" ,")  # " 4-bit g64, float32" or ", float32"
    return "\n".join([short_model_name(model), *rest.split(", ")]) if rest else short_model_name(model)


def build_plot(rows: Sequence[Dict]):
    """The benchmark figure: prefill and decode tokens/s per configuration, median bars with min-max error
    bars, each implementation's dtype(s) in the legend, and ours/mlx-lm ratios over the bars when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "decode_tok_s" in r]
    ratios = {r["config"]: r for r in rows if r["impl"] == PLAIN_PAIR}  # plain decode's ratios
    configs = list(dict.fromkeys(r["config"] for r in measured))  # one group of bars per configuration
    impls = list(dict.fromkeys(r["impl"] for r in measured))
    by_key = {(r["config"], r["impl"]): r for r in measured}
    labels = [plot_label(next(r for r in measured if r["config"] == c)) for c in configs]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.5 * len(configs) * len(impls)), 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, kind in zip(axes, ("prefill", "decode")):
        metric = f"{kind}_tok_s"
        for k, impl in enumerate(impls):
            rows_here = [by_key.get((c, impl)) for c in configs]
            missing = float("nan")  # a configuration this implementation did not run: no bar
            medians = [r[metric] if r else missing for r in rows_here]
            below = [r[metric] - r[f"{metric}_min"] if r else missing for r in rows_here]
            above = [r[f"{metric}_max"] - r[metric] if r else missing for r in rows_here]
            dtypes = "/".join(dict.fromkeys(r["dtype"] for r in rows_here if r))
            ax.bar([i + k * width for i in range(len(configs))], medians, width, yerr=[below, above], capsize=3,
                   label=f"{impl} ({dtypes})")
        for i, config in enumerate(configs):
            ratio = ratios.get(config, {}).get(f"{kind}_ratio")
            if ratio is None:
                continue
            top = max(by_key[(config, impl)][f"{metric}_max"] for impl in impls if (config, impl) in by_key)
            ax.annotate(f"x{ratio:.2f}", (i + width * (len(impls) - 1) / 2, top), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(configs))], labels, fontsize=7)
        ax.set_title(f"{kind} tokens/s")
        ax.margins(y=0.12)  # room for the ratio text above the tallest error bar
        ax.legend(fontsize=7)
    where = f"{measured[0]['device']}, MLX {measured[0]['mlx_version']}: " if measured else ""
    fig.suptitle(where + "median over trials, whiskers min-max" + ("; xN = ours / mlx-lm" if ratios else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def write_plot(rows: Sequence[Dict], path: Path) -> None:
    """Save `build_plot(rows)` to `path` (the format follows its suffix)."""
    check_plot_available()
    fig = build_plot(rows)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
