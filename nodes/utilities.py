"""Adapter utilities as nodes: resize, DyLoRA slice and combine, from files in the loras folders
to a new file there (sanitised name, atomic write, progress bar, report as text)."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.combine import combine
from ..lycoris_core.dylora import POLICIES, slice_dylora
from ..lycoris_core.extract import extract
from ..lycoris_core.resize import resize
from ..lycoris_core.safe_io import safe_output_path
from ..lycoris_core.svd import parse_patterns
from .loader import _adapter_path
from .stack import resolve_adapter, rows_from_lora_stack
from .weights import PatchedWeights, checkpoint_names

CATEGORY = "loaders/lycoris/utilities"
MODES = ["fixed", "energy", "ratio", "threshold", "quantile"]
NONE = "none"


def output_path(kind: str, name: str) -> str:
    """Where a new file of `kind` ("loras", "checkpoints") goes: the first such folder, under a
    sanitised name. The folder is created if missing (a fresh `--base-directory` has none yet)."""
    folder = folder_paths.get_folder_paths(kind)[0]
    os.makedirs(folder, exist_ok=True)
    return str(safe_output_path(folder, name))


def _output(name: str) -> str:
    return output_path("loras", name)


def _progress():
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(max(total, 1))
        bar.update_absolute(done, max(total, 1))

    return update


def _finish(result, out_path: str, title: str):
    """Write the result and refresh ComfyUI's file list so the new file can be picked at once."""
    result.save(out_path)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
    text = "\n".join([f"{title}: wrote {out_path}"] + result.report_lines())
    return {"ui": {"text": [text]}, "result": (text,)}


def _run(title: str, work):
    try:
        return work()
    except (AdapterFormatError, ValueError) as error:
        raise ValueError(f"{title}: {error}") from None


def _lora_list():
    return folder_paths.get_filename_list("loras")


class ReportNode:
    """What every utility node shares: it writes a file and returns its report as text."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)


def weighted_adapter_inputs(label: str, tooltip: str, required: int) -> dict:
    """Inputs for three adapters, each with a strength; past the first `required`, "none" is allowed."""
    strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": tooltip}
    names = _lora_list()
    inputs = {}
    for i in (1, 2, 3):
        if i <= required:
            inputs[f"lycoris_name_{i}"] = (names, {"tooltip": f"Adapter {i} (applied in order)."})
        else:
            inputs[f"lycoris_name_{i}"] = ([NONE] + names, {"default": NONE, "tooltip": f"Optional adapter {i}."})
        inputs[f"{label}_{i}"] = ("FLOAT", strength)
    return inputs


RANK_PATTERN = ("STRING", {"default": "", "multiline": True, "tooltip": "Per-layer ranks, one REGEX=RANK per line "
                          "(PEFT rank_pattern: the regex matches the end of the dotted module path, e.g. "
                          "'attn2.to_k=4'); the first matching line wins, 0 skips the layer."})


def _patterns(text: str, label: str, cast) -> dict:
    return parse_patterns((text or "").splitlines(), label, cast)


OUTPUT_NAME = ("STRING", {"default": "lycoris_out", "tooltip": "File name for the result in the loras folder "
                          "(sanitised; .safetensors is added). An existing file of that name is replaced."})


class LycorisResize(ReportNode):
    DESCRIPTION = ("Lowers the rank of a LoRA/LoCon file (incl. Tucker) by SVD: a fixed rank or the share of "
                   "the delta's energy to keep. Reports the relative error of every layer.")
    OUTPUT_TOOLTIPS = ("Per-layer ranks and relative errors.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lycoris_name": (_lora_list(), {"tooltip": "The LoRA/LoCon file to resize."}),
            "mode": (MODES, {"default": "fixed", "tooltip": "fixed: `rank`; energy: keep `value` of the squared "
                             "singular values; ratio: keep s > value*s1; threshold: keep s > value; quantile: "
                             "smallest rank whose singular values sum to `value` of the total."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 4096, "tooltip": "The new rank (fixed mode) or the "
                             "largest rank allowed (other modes)."}),
            "value": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1e6, "step": 0.001,
                                "tooltip": "The mode's parameter (ignored in fixed mode)."}),
            "output_name": OUTPUT_NAME,
        }, "optional": {"rank_pattern": RANK_PATTERN}}

    def run(self, lycoris_name, mode, rank, value, output_name, rank_pattern=""):
        title = "LyCORIS resize"
        return _run(title, lambda: _finish(resize(
            _adapter_path(lycoris_name), mode=mode, value=None if mode == "fixed" else value, rank=rank,
            rank_pattern=_patterns(rank_pattern, "rank_pattern", int), progress=_progress()),
            _output(output_name), title))


class LycorisDyLoRASlice(ReportNode):
    DESCRIPTION = ("Keeps the first `rank` components of a DyLoRA file (sd-scripts networks.dylora or "
                   "lycoris-lora dylora) with an explicit alpha policy; the report says which one was used.")
    OUTPUT_TOOLTIPS = ("Per-layer differences to the full adapter and the alpha policy used.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lycoris_name": (_lora_list(), {"tooltip": "The DyLoRA file."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Ranks to keep: a multiple of the "
                             "file's rank step (unit / block_size)."}),
            "alpha_policy": (list(POLICIES), {"default": "trainer", "tooltip": "trainer: what the trainer computed "
                             "at this rank (read from the metadata); kohya-extractor: alpha kept (sd-scripts' "
                             "extractor); webui-dyn: alpha scaled by rank/dim (sd-webui dyn=)."}),
            "output_name": OUTPUT_NAME,
        }}

    def run(self, lycoris_name, rank, alpha_policy, output_name):
        title = "LyCORIS DyLoRA slice"
        return _run(title, lambda: _finish(slice_dylora(
            _adapter_path(lycoris_name), rank, alpha_policy=alpha_policy, progress=_progress()),
            _output(output_name), title))


COMBINE_OUTPUTS = ["lycoris", "plain lora"]
COMBINE_DTYPES = ["inputs", "fp16", "bf16", "fp32"]


class LycorisCombine(ReportNode):
    DESCRIPTION = ("Combines adapters with weights into one file: exact rank concatenation for the LoRA family "
                   "(rank 0), or an SVD re-factorisation of the summed deltas to `rank` / a kept `energy`. "
                   "output 'plain lora' writes only lora_up/lora_down/alpha whatever the inputs' algorithms "
                   "(LoHa, LoKr, Tucker...), for runtimes that take only LoRA such as Nunchaku's SVDQuant models.")
    OUTPUT_TOOLTIPS = ("Per-layer ranks and relative errors of the combined file, worst layers first.",)

    @classmethod
    def INPUT_TYPES(cls):
        adapters = weighted_adapter_inputs("weight", "Strength of this input.", required=2)
        for i in (1, 2):  # "none" allowed when a lora_stack brings the other adapters
            names, options = adapters[f"lycoris_name_{i}"]
            adapters[f"lycoris_name_{i}"] = ([NONE] + names, dict(options, default=names[0] if names else NONE))
        return {"required": {
            **adapters,
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "0: exact (ranks add up; with output "
                             "'plain lora': lossless, each layer at its own numerical rank); otherwise every layer "
                             "is re-factorised to this rank by SVD (with energy < 1: the largest rank allowed)."}),
            "output_name": OUTPUT_NAME,
        }, "optional": {
            "lora_stack": ("LORA_STACK", {"tooltip": "More adapters, from Load LyCORIS Stack or another pack's "
                           "stack: each entry's strength_model is its weight (one weight per file: strength_clip "
                           "is not used). Combined after the files chosen here."}),
            "output": (COMBINE_OUTPUTS, {"default": "lycoris", "tooltip": "lycoris: keep each algorithm where "
                       "that is exact. plain lora: every layer as a LoRA/LoCon pair (lora_up, lora_down, alpha = "
                       "rank), for loaders that take only LoRA (Nunchaku SVDQuant, sd-scripts tools); balanced "
                       "factors, SVD in fp32/fp64, the error of every layer reported after rounding."}),
            "energy": ("FLOAT", {"default": 1.0, "min": 0.001, "max": 1.0, "step": 0.001, "tooltip": "Below 1: "
                       "each layer keeps the smallest rank whose singular values hold this share of its squared "
                       "Frobenius norm (relative error <= sqrt(1 - energy)); `rank`, if not 0, caps it."}),
            "dtype": (COMBINE_DTYPES, {"default": "inputs", "tooltip": "Dtype of the written factors (inputs: the "
                      "first input's). The reported errors are measured after rounding to it."}),
            "drop_unrepresentable": ("BOOLEAN", {"default": False, "tooltip": "plain lora: leave out (and list in "
                                     "the report) what a LoRA pair cannot hold: norm and bias changes, and "
                                     "DoRA/OFT/BOFT/IA3/GLoRA layers when no base model is connected. Off: refuse "
                                     "by name."}),
            "model": ("MODEL", {"tooltip": "The base model as loaded (no adapters applied): converts DoRA / OFT / "
                      "BOFT / IA3 / GLoRA inputs, whose change depends on the base weight, exactly for this model."}),
            "clip": ("CLIP", {"tooltip": "The base text encoder, for the same inputs' text-encoder layers."}),
        }}

    def run(self, lycoris_name_1, weight_1, lycoris_name_2, weight_2, lycoris_name_3, weight_3, rank, output_name,
            lora_stack=None, output="lycoris", energy=1.0, dtype="inputs", drop_unrepresentable=False, model=None,
            clip=None):
        title = "LyCORIS combine"
        inputs = [(lycoris_name_1, weight_1), (lycoris_name_2, weight_2), (lycoris_name_3, weight_3)]
        inputs = [(_adapter_path(name), weight) for name, weight in inputs if name != NONE]
        stacked = rows_from_lora_stack(lora_stack, title)
        inputs += [(resolve_adapter(row.lora_name), row.strength_model) for row in stacked]
        plain = output == "plain lora"
        if len(inputs) < (1 if plain else 2):
            raise ValueError(f"{title}: choose at least {'one adapter' if plain else 'two adapters'} "
                             "(files here or entries of lora_stack)")
        if output not in COMBINE_OUTPUTS:
            raise ValueError(f"{title}: output must be one of {COMBINE_OUTPUTS}, got {output!r}")
        mode, value = ("energy", float(energy)) if energy < 1.0 else ("fixed", None)
        base = PatchedWeights(checkpoint_names(model, clip)) if (model is not None or clip is not None) else None
        return _run(title, lambda: _finish(combine(
            inputs, rank=rank or None, mode=mode, value=value, base=base,
            dtype=None if dtype == "inputs" else dtype, plain=plain, drop_unrepresentable=drop_unrepresentable,
            progress=_progress()), _output(output_name), title))


class LycorisExtract(ReportNode):
    DESCRIPTION = ("Extracts the difference between a tuned and a base model (LoRAs loaded upstream count as "
                   "tuning) into a LoRA/LoCon file with kohya names, choosing each layer's rank by a rule; "
                   "unchanged layers are skipped and every layer's relative error is reported.")
    OUTPUT_TOOLTIPS = ("Per-layer ranks and relative errors of the extracted file.",)

    @classmethod
    def INPUT_TYPES(cls):
        resize_inputs = LycorisResize.INPUT_TYPES()["required"]
        return {"required": {
            "model_base": ("MODEL", {"tooltip": "The original model."}),
            "model_tuned": ("MODEL", {"tooltip": "The fine-tuned (or LoRA-patched) model of the same architecture."}),
            "mode": resize_inputs["mode"],
            "rank": ("INT", {"default": 32, "min": 1, "max": 4096, "tooltip": "Rank of Linear / 1x1 layers (fixed "
                             "mode) or the largest rank allowed (other modes)."}),
            "conv_rank": ("INT", {"default": 16, "min": 0, "max": 4096, "tooltip": "The same for k x k convs; "
                                  "0 leaves them out."}),
            "value": resize_inputs["value"],
            "tucker": ("BOOLEAN", {"default": False, "tooltip": "k x k convs as Tucker-2 (lora_mid) by HOSVD."}),
            "algo": (["lora", "lokr"], {"default": "lora", "tooltip": "lora: LoRA/LoCon factors; lokr: the nearest "
                     "Kronecker product w1 (x) w2 (w2 of rank `rank`, full when that is no saving)."}),
            "factor": ("INT", {"default": -1, "min": -1, "max": 1024, "tooltip": "LoKr: the small factor's size, "
                       "as LyCORIS's `factor` (-1: the most balanced split)."}),
            "output_name": OUTPUT_NAME,
        }, "optional": {
            "clip_base": ("CLIP", {"tooltip": "Extract the text encoder too: the original CLIP ..."}),
            "clip_tuned": ("CLIP", {"tooltip": "... and the tuned one."}),
            "rank_pattern": RANK_PATTERN,
            "alpha_pattern": ("STRING", {"default": "", "multiline": True, "tooltip": "Per-layer alphas, one "
                              "REGEX=ALPHA per line (PEFT alpha_pattern); default alpha = rank (scale 1)."}),
        }}

    def run(self, model_base, model_tuned, mode, rank, conv_rank, value, tucker, output_name, algo="lora",
            factor=-1, clip_base=None, clip_tuned=None, rank_pattern="", alpha_pattern=""):
        title = "LyCORIS extract"
        if (clip_base is None) != (clip_tuned is None):
            raise ValueError(f"{title}: connect both clip_base and clip_tuned, or neither")
        base = PatchedWeights(checkpoint_names(model_base, clip_base))
        tuned = PatchedWeights(checkpoint_names(model_tuned, clip_tuned))
        return _run(title, lambda: _finish(extract(
            base, tuned, mode=mode, value=None if mode == "fixed" else value, rank=rank, conv_rank=conv_rank,
            tucker=tucker, algo=algo, factor=factor, rank_pattern=_patterns(rank_pattern, "rank_pattern", int),
            alpha_pattern=_patterns(alpha_pattern, "alpha_pattern", float), progress=_progress()),
            _output(output_name), title))
