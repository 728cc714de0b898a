"""What an adapter file holds, in the words a user looks for: algorithms, ranks, alphas, dtypes,
size, the base model it was trained for, its trainer's arguments and trigger words."""

from __future__ import annotations

import json
import os
from collections import Counter

from .reader import AdapterFile

TRAINING_KEYS = (
    "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name",
    "ss_training_comment", "ss_sd_model_name", "ss_resolution", "ss_num_epochs", "ss_steps",
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_clip_skip", "ss_v2",
    "ss_num_train_images", "ss_seed", "modelspec.architecture", "modelspec.title",
)
# metadata shown elsewhere in the summary (network args, trigger words) or too long to print
_SHOWN_ELSEWHERE = set(TRAINING_KEYS) | {"ss_network_args", "ss_tag_frequency"}


def trigger_words(metadata: dict, limit: int = 20) -> list[tuple[str, int]]:
    """Most frequent training tags (`ss_tag_frequency`: {dataset: {tag: count}})."""
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter = Counter()
    if isinstance(frequencies, dict):
        for tags in frequencies.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)):
                        counts[str(tag).strip()] += int(count)
    return counts.most_common(limit)


def summarize(adapter_file: AdapterFile) -> dict:
    """A JSON-serialisable summary of one decoded file."""
    dtypes: Counter = Counter()
    parameters = 0
    modules = {}
    for name, adapter in adapter_file.adapters.items():
        for tensor in adapter.tensors.values():
            dtypes[str(tensor.dtype).replace("torch.", "")] += 1
            parameters += tensor.numel()
        shape = adapter.expected_shape()
        modules[name] = {
            **adapter.describe(),
            "dtype": "/".join(sorted({str(t.dtype).replace("torch.", "") for t in adapter.tensors.values()})),
            "shape": None if shape is None else [int(n) for n in shape],
        }
    alphas = sorted({round(a.alpha, 6) for a in adapter_file.adapters.values() if a.alpha is not None})
    size = os.path.getsize(adapter_file.path) if os.path.isfile(adapter_file.path) else None
    return {
        "file": adapter_file.path,
        "size_bytes": size,
        "modules": len(adapter_file.adapters),
        "algorithms": adapter_file.algorithms(),
        "ranks": adapter_file.ranks(),
        "alphas": alphas,
        "dtypes": dict(dtypes),
        "parameters": parameters,
        "convention": adapter_file.context.convention,
        "training": {k: adapter_file.metadata[k] for k in TRAINING_KEYS if k in adapter_file.metadata},
        "network_args": adapter_file.context.network_args,
        "trigger_words": trigger_words(adapter_file.metadata),
        "other_metadata": sorted(k for k in adapter_file.metadata if k not in _SHOWN_ELSEWHERE),
        "unknown_keys": adapter_file.unknown_keys,
        "problems": adapter_file.problems,
        "notes": adapter_file.notes,
        "per_module": modules,
    }


def format_summary(summary: dict) -> str:
    """The summary as short human-readable lines (per-module detail left to --json)."""
    size = summary["size_bytes"]
    lines = [
        f"file: {summary['file']}" + (f" ({size / 2**20:.2f} MiB)" if size is not None else ""),
        f"modules: {summary['modules']}  parameters: {summary['parameters']:,}",
        "algorithms: " + ", ".join(f"{k} x{v}" for k, v in summary["algorithms"].items()),
        "ranks: " + (", ".join(map(str, summary["ranks"])) or "-")
        + "   alphas: " + (", ".join(f"{a:g}" for a in summary["alphas"]) or "-"),
        "dtypes: " + ", ".join(f"{k} x{v}" for k, v in summary["dtypes"].items()),
    ]
    for key, value in summary["training"].items():
        lines.append(f"{key}: {value}")
    if summary["network_args"]:
        lines.append("network args (ss_network_args): " + ", ".join(f"{k}={v}" for k, v in summary["network_args"].items()))
    if summary["trigger_words"]:
        lines.append("trigger words: " + ", ".join(f"{w} ({c})" for w, c in summary["trigger_words"]))
    if summary.get("other_metadata"):
        lines.append("other metadata keys: " + ", ".join(summary["other_metadata"][:30])
                     + (f" ... ({len(summary['other_metadata'])} in all)" if len(summary["other_metadata"]) > 30 else ""))
    if summary["unknown_keys"]:
        lines.append(f"keys not understood ({len(summary['unknown_keys'])}): " + ", ".join(summary["unknown_keys"][:10]))
    for problem in summary["problems"][:10]:
        lines.append(f"error: {problem}")
    for note in summary.get("notes", []):
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def format_modules(summary: dict) -> list[str]:
    """One line per module: algorithm, rank, alpha, stored dtype and the weight shape it implies."""
    lines = []
    for name, info in summary["per_module"].items():
        parts = [info["algo"] + ("+dora" if info.get("dora") else "")]
        if info.get("rank") is not None:
            parts.append(f"rank {info['rank']}")
        if info.get("alpha") is not None:
            parts.append(f"alpha {info['alpha']:g}")
        if info.get("dtype"):
            parts.append(info["dtype"])
        if info.get("shape"):
            parts.append("x".join(map(str, info["shape"])))
        lines.append(f"{name}: " + ", ".join(parts))
    return lines
