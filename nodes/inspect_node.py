"""Inspect LyCORIS: what an adapter file holds and where in the model it acts, as a text report and
a per-block heat map, so a user can choose block weights knowing which blocks matter."""

from __future__ import annotations

import os

import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.blocks import ARCHITECTURES, block_norms
from ..lycoris_core.inspection import format_modules, format_summary, summarize
from .cache import load_cached
from .heatmap import as_comfy_image, render_heatmap, value_label
from .key_map import build_key_map, is_text_encoder_module, resolve, target_key
from .loader import CATEGORY, _adapter_path

AUTO = "auto"
ARCHITECTURE_CHOICES = [AUTO] + [a for a in ARCHITECTURES if a != "unknown"]


def _model_coverage(adapter_file, model, model_keys: list[str]) -> list[str]:
    """How many of the file's modules find a layer in the connected model (ComfyUI's key maps)."""
    key_map = build_key_map(model, None)
    weights = set(model_keys)
    matched, text_encoder, unmatched = 0, 0, []
    for name in adapter_file.adapters:
        target = resolve(name, key_map)
        if target is not None and target_key(target) in weights:
            matched += 1
        elif is_text_encoder_module(name):
            text_encoder += 1
        else:
            unmatched.append(name)
    lines = [f"connected model: {matched} of {matched + len(unmatched)} diffusion-model modules match a layer"
             + (f"; {text_encoder} text-encoder modules not checked (no CLIP here)" if text_encoder else "")]
    lines += [f"  unmatched: {name}" for name in unmatched[:10]]
    if len(unmatched) > 10:
        lines.append(f"  ... {len(unmatched) - 10} more unmatched")
    return lines


def _skipped_note(adapter_file, skipped: list[str]) -> str:
    if not skipped:
        return "every module is measured"
    counts: dict[str, int] = {}
    for name in skipped:
        algo = adapter_file.adapters[name].algo
        counts[algo] = counts.get(algo, 0) + 1
    kinds = ", ".join(f"{algo} x{n}" for algo, n in sorted(counts.items()))
    return (f"not measured: {len(skipped)} module{'s' if len(skipped) > 1 else ''} ({kinds}): no stand-alone "
            "delta (multiplicative like OFT/BOFT/IA3, dependent on the base weight like GLoRA, or of unknown shape)")


def inspect_adapter(lycoris_name: str, architecture: str = AUTO, model=None):
    """(report text, Heatmap) for a file of the loras folders, optionally bound to a model's keys."""
    if architecture not in ARCHITECTURE_CHOICES:
        raise ValueError(f"Inspect LyCORIS: unknown architecture '{architecture}'; "
                         f"expected one of {', '.join(ARCHITECTURE_CHOICES)}")
    path = _adapter_path(lycoris_name)
    try:
        adapter_file = load_cached(path)
        model_keys = None if model is None else list(model.model.state_dict())
        norms = block_norms(adapter_file, model_keys, architecture)
    except AdapterFormatError as error:
        raise ValueError(f"Inspect LyCORIS: {error}") from None

    source = ("chosen" if architecture != AUTO else
              "detected from the connected model" if model is not None else "detected from the file's module names")
    skipped = _skipped_note(adapter_file, norms.skipped)
    summary = summarize(adapter_file)
    lines = [f"Inspect LyCORIS: {lycoris_name}", format_summary(summary)]
    if model is not None:
        lines += _model_coverage(adapter_file, model, model_keys)
    lines.append(f"architecture: {norms.architecture} ({source})")
    if norms.architecture == "unknown":
        lines.append("  every diffusion-model module counts as BASE: choose the architecture to see its blocks")
    lines.append("per-block magnitude ||gamma*dW||_F at strength 1 (square root of the sum over the block's "
                 "layers of each layer's squared Frobenius norm):")
    lines.append(f"  {'block':<6} {'norm':>12} {'layers':>6}")
    for block, value in norms.items():
        count = norms.layers.get(block, 0)
        lines.append(f"  {block:<6} {(f'{value:.6g}' if count else '-'):>12} {count:>6}")
    lines.append(skipped)
    lines.append(f"modules ({len(adapter_file.adapters)}): algorithm, rank, alpha, dtype, weight shape")
    lines += ["  " + line for line in format_modules(summary)]
    report = "\n".join(lines)

    values = {block: (value if norms.layers.get(block) else None) for block, value in norms.items()}
    measured = sum(norms.layers.values())
    heatmap = render_heatmap(
        values,
        title=os.path.basename(lycoris_name),
        subtitle=[f"architecture {norms.architecture} ({source}); {measured} layers measured, largest block "
                  f"{value_label(max(norms.values(), default=0.0))}",
                  "cell value: ||gamma*dW||_F, the Frobenius norm of the block's weight change at strength 1; "
                  "'-': the file has no layer in this block"],
        notes=[skipped],
    )
    return report, heatmap


class LycorisInspect:
    DESCRIPTION = ("Shows what a LoRA / LyCORIS file holds (algorithm, rank, alpha and dtype of every module, "
                   "size, training metadata, network args, trigger words) and a heat map of how much it changes "
                   "each block of the model, to see where it acts before choosing block weights.")
    CATEGORY = CATEGORY
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "heatmap")
    OUTPUT_TOOLTIPS = (
        "Text report: file summary, training metadata, per-block norms table and one line per module.",
        "Heat map of the per-block Frobenius norm of the adapter's weight change (connect to Preview Image).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lycoris_name": (folder_paths.get_filename_list("loras"),
                             {"tooltip": "The adapter file to inspect, from the loras folders."}),
            "architecture": (ARCHITECTURE_CHOICES, {"default": AUTO, "tooltip": "Which model's block layout to "
                             "use. auto: from the connected model, else guessed from the file's module names."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "Optional: the model the adapter is meant for. Its keys give the "
                                "architecture and block count, and the report says how many modules match it."}),
        }}

    @classmethod
    def IS_CHANGED(cls, lycoris_name, **_):
        # a file rewritten under the same name (a new training epoch) must be inspected again
        path = folder_paths.get_full_path("loras", lycoris_name)
        if path is None or not os.path.isfile(path):
            return ""
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def inspect(self, lycoris_name, architecture=AUTO, model=None):
        report, heatmap = inspect_adapter(lycoris_name, architecture, model)
        return {"ui": {"text": [report]}, "result": (report, as_comfy_image(heatmap.image))}
