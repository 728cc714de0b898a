"""Load LyCORIS: a drop-in for ComfyUI's LoraLoader that reads every LyCORIS format and says what
it did (same input names, so a workflow can swap the nodes)."""

from __future__ import annotations

import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.block_weights import BlockWeightError
from .block_weight_node import read_block_weights
from .cache import load_cached
from .patching import apply_adapter_file

CATEGORY = "loaders/lycoris"
MODES = ["auto", "merge", "bypass"]

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def _adapter_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"LyCORIS file '{name}' is not in the loras folders ({', '.join(folder_paths.get_folder_paths('loras'))})")
    return path


def load_and_apply(model, clip, lycoris_name, strength_model, strength_clip, mode, block_weights="", schedule=None):
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    path = _adapter_path(lycoris_name)
    blocks = None
    try:
        if block_weights and block_weights.strip():
            blocks = read_block_weights(block_weights, model, clip)
        adapter_file = load_cached(path)
        new_model, new_clip, report = apply_adapter_file(
            model, clip, adapter_file, strength_model, strength_clip, mode,
            block_weight=None if blocks is None else blocks.weight_for_key, schedule=schedule)
    except (AdapterFormatError, BlockWeightError) as error:
        raise ValueError(f"Load LyCORIS: {error}") from None
    _attach_metadata(new_model, new_clip, adapter_file.metadata)
    strengths = f"mode {mode}, strength_model {strength_model:g}" + (
        f", strength_clip {strength_clip:g}" if clip is not None else "")
    text = report.text(adapter_file, strengths)
    if blocks is not None:
        text += f"\nblock weights ({blocks.dialect}, {blocks.architecture}): {blocks.describe(compact=True)}"
        text += "".join(f"\n  warning: {w}" for w in blocks.warnings)
    print(text)
    return new_model, new_clip, text


def _attach_metadata(model, clip, metadata: dict) -> None:
    """Attach the file's safetensors metadata as ComfyUI's own LoraLoader does (0.28: the
    "lora_metadata" attachment, which e.g. LTXV's IC-LoRA parameters node reads). Runtimes
    without attachments have no reader for it either."""
    if not metadata:
        return
    for patcher in (model, getattr(clip, "patcher", None)):
        if patcher is not None and hasattr(patcher, "set_attachments"):
            patcher.set_attachments("lora_metadata", metadata)


class LycorisLoader:
    DESCRIPTION = ("Loads a LoRA or any LyCORIS adapter (LoCon, LoHa, LoKr, IA3, OFT, BOFT, GLoRA, Full, Norm, "
                   "DoRA, DyLoRA) exactly as its trainer computed it, and reports which layers it changed.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = (
        "The diffusion model with the adapter applied.",
        "The text encoder(s) with the adapter applied.",
        "Coverage report: modules matched / unmatched, keys not understood, algorithms and ranks.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the adapter to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder(s) to apply the adapter to."}),
            "lycoris_name": (folder_paths.get_filename_list("loras"),
                             {"tooltip": "The adapter file, from the loras folders (.safetensors)."}),
            "strength_model": ("FLOAT", dict(STRENGTH, tooltip="How strongly to change the diffusion model; "
                                             "negative values invert additive adapters, 0 leaves it untouched.")),
            "strength_clip": ("FLOAT", dict(STRENGTH, tooltip="How strongly to change the text encoder(s); "
                                            "0 leaves them untouched.")),
            "mode": (MODES, {"default": "auto", "tooltip": "auto: bypass on layers whose stored weight is "
                             "quantized (fp8, int8, mxfp8, nvfp4, GGUF), merge on float layers; on a float model it "
                             "is merge. merge: ComfyUI patches the weights when it loads the model (exact on float "
                             "weights, no per-step cost; on quantized weights the change is rounded to the format). "
                             "bypass: the adapter runs beside every Linear/Conv layer and the base weights are never "
                             "changed."}),
        }, "optional": {
            "block_weights": ("STRING", {"default": "", "multiline": True,
                              "placeholder": "e.g. IN04=0.5, OUT*=0  (or a preset name such as SD-INS, or an "
                              "Inspire/LBW vector)", "tooltip": "Per-block strength: named "
                              "blocks (IN04=0.5, OUT*=0, D00-D18=1, TE=1), an Inspire or sd-webui LBW vector, or a "
                              "preset name (SD-ALL, INS, ...). Empty: every block at 1. A block at 0 is untouched."}),
            "schedule": ("LYCORIS_SCHEDULE", {"tooltip": "From a LyCORIS Schedule node: when the adapter acts "
                         "while sampling (first steps, last steps, a ramp, another strength on the negative pass). "
                         "A scheduled adapter runs beside the layers whatever the mode."}),
        }}

    def load(self, model, clip, lycoris_name, strength_model, strength_clip, mode="auto", block_weights="",
             schedule=None):
        new_model, new_clip, text = load_and_apply(model, clip, lycoris_name, strength_model, strength_clip, mode,
                                                   block_weights, schedule)
        # the report also goes to the UI / the prompt history, where API users read it
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}


class LycorisLoaderModelOnly:
    DESCRIPTION = "Load LyCORIS for the diffusion model only (text-encoder modules in the file are skipped)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter applied.", "Coverage report.")

    @classmethod
    def INPUT_TYPES(cls):
        types = LycorisLoader.INPUT_TYPES()
        required = types["required"]
        return {"required": {k: required[k] for k in ("model", "lycoris_name", "strength_model", "mode")},
                "optional": types["optional"]}

    def load(self, model, lycoris_name, strength_model, mode="auto", block_weights="", schedule=None):
        new_model, _, text = load_and_apply(model, None, lycoris_name, strength_model, 0.0, mode, block_weights,
                                            schedule)
        return {"ui": {"text": [text]}, "result": (new_model, text)}
