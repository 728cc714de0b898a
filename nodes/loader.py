"""Load LyCORIS: a drop-in for ComfyUI's LoraLoader that reads every LyCORIS format and says what
it did (same input names as LoraLoader: `lora_name`, `strength_model`, `strength_clip`, so a
workflow can swap the nodes and keep the file and strengths). Workflows saved before the rename name
the file `lycoris_name`: UI-format ones keep working (widget values are positional), API-format
ones are renamed when posted (`rename_legacy_inputs`, an on-prompt handler) and `load` takes the
old keyword too."""

from __future__ import annotations

import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.block_weights import BlockWeightError
from ..lycoris_core.trigger_words import AdapterInfo, adapter_info, hashes_text, trigger_text
from .block_weight_node import read_block_weights
from .cache import load_cached
from .patching import apply_adapter_file

CATEGORY = "loaders/lycoris"
MODES = ["auto", "merge", "bypass"]

# two lines; "bypass" here is not ComfyUI's Ctrl+B bypass (a node switched off), hence the second half
MODE_TOOLTIP = ("auto (leave it): merged into float weights, run beside quantized ones (fp8, GGUF, ...).\n"
                "merge / bypass force one way; bypass = the adapter runs beside each layer (not Ctrl+B, "
                "which switches a node off).")

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}

TRIGGER_WORDS_TIP = ("Trigger words of the file (sidecar files beside it: sd-webui .json, .civitai.info, "
                     ".metadata.json; then its metadata), comma-separated.")
ADAPTER_HASHES_TIP = "sd-webui's \"Lora hashes\" value (name: hash) that Civitai reads from an image's parameters."


def _adapter_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"LyCORIS file '{name}' is not in the loras folders ({', '.join(folder_paths.get_folder_paths('loras'))})")
    return path


LOADERS = ("LycorisLoader", "LycorisLoaderModelOnly")
LEGACY_FILE_INPUT = "lycoris_name"  # the file input's name before it became core's `lora_name`


def rename_legacy_inputs(prompt: dict) -> dict:
    """An API prompt with the loaders' old `lycoris_name` input, as `lora_name` (in place; other
    nodes untouched). Runs before the server validates a posted prompt."""
    for node in prompt.values() if isinstance(prompt, dict) else ():
        if not isinstance(node, dict) or node.get("class_type") not in LOADERS:
            continue
        inputs = node.get("inputs")
        if isinstance(inputs, dict) and LEGACY_FILE_INPUT in inputs:
            legacy = inputs.pop(LEGACY_FILE_INPUT)
            inputs.setdefault("lora_name", legacy)
    return prompt


def _file_name(lora_name, legacy):
    if lora_name is None:
        lora_name = legacy
    if lora_name is None:
        raise ValueError("Load LyCORIS: no adapter file given (input lora_name)")
    return lora_name


def load_and_apply(model, clip, lora_name, strength_model, strength_clip, mode, block_weights="", schedule=None):
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    path = _adapter_path(lora_name)
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
    info, lines = describe_adapter(path, adapter_file.metadata)
    text += lines
    print(text)
    return new_model, new_clip, text, info


def describe_adapter(path: str, metadata: dict) -> tuple[AdapterInfo, str]:
    """Trigger words and hash of an applied file (sidecars inside the loras folders, then its
    metadata), and the report lines that say them; the single loaders and the stack share it."""
    info = adapter_info(path, metadata, list(folder_paths.get_folder_paths("loras")))
    text = ""
    if info.trigger_words:
        text += f"\ntrigger words ({', '.join(info.sources)}): {', '.join(info.trigger_words)}"
    if info.preferred_weight is not None:
        text += f"\npreferred weight (sidecar): {info.preferred_weight:g}"
    return info, text + f"\nhash: {info.hash_entry()}"


def report_ui(text: str) -> dict:
    """The node's UI output: the report (shown on the node by web/js/lycoris_report.js and kept in the
    prompt history, where API users read it) and its warning lines, which turn the node orange."""
    return {"text": [text], "lycoris_warning": [line for line in text.splitlines() if line.startswith("warning:")]}


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
    DESCRIPTION = ("Drop-in for Load LoRA: loads a LoRA or any LyCORIS adapter (LoCon, LoHa, LoKr, IA3, OFT, BOFT, "
                   "GLoRA, Full, Norm, DoRA, DyLoRA) exactly as its trainer computed it; leave mode on auto. Its report "
                   "shows on the node; the node turns orange when the file does not fit the model.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    # appended outputs only, never reordered: saved workflows link outputs by index
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report", "trigger_words", "adapter_hashes")
    OUTPUT_TOOLTIPS = (
        "The diffusion model with the adapter applied.",
        "The text encoder(s) with the adapter applied.",
        "Coverage report: modules matched / unmatched, keys not understood, algorithms and ranks.",
        TRIGGER_WORDS_TIP,
        ADAPTER_HASHES_TIP,
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the adapter to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder(s) to apply the adapter to."}),
            "lora_name": (folder_paths.get_filename_list("loras"),
                          {"tooltip": "The adapter file (LoRA or any LyCORIS), from the loras folders (.safetensors)."}),
            "strength_model": ("FLOAT", dict(STRENGTH, tooltip="How strongly to change the diffusion model; "
                                             "negative values invert additive adapters, 0 leaves it untouched.")),
            "strength_clip": ("FLOAT", dict(STRENGTH, tooltip="How strongly to change the text encoder(s); "
                                            "0 leaves them untouched.")),
            "mode": (MODES, {"default": "auto", "tooltip": MODE_TOOLTIP}),
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

    def load(self, model, clip, lora_name=None, strength_model=1.0, strength_clip=1.0, mode="auto", block_weights="",
             schedule=None, lycoris_name=None):
        new_model, new_clip, text, info = load_and_apply(model, clip, _file_name(lora_name, lycoris_name),
                                                         strength_model, strength_clip, mode, block_weights, schedule)
        return {"ui": report_ui(text),
                "result": (new_model, new_clip, text, trigger_text([info]), hashes_text([info]))}


class LycorisLoaderModelOnly:
    DESCRIPTION = "Load LyCORIS for the diffusion model only (text-encoder modules in the file are skipped)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "report", "trigger_words", "adapter_hashes")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter applied.", "Coverage report.", TRIGGER_WORDS_TIP,
                       ADAPTER_HASHES_TIP)

    @classmethod
    def INPUT_TYPES(cls):
        types = LycorisLoader.INPUT_TYPES()
        required = types["required"]
        return {"required": {k: required[k] for k in ("model", "lora_name", "strength_model", "mode")},
                "optional": types["optional"]}

    def load(self, model, lora_name=None, strength_model=1.0, mode="auto", block_weights="", schedule=None,
             lycoris_name=None):
        new_model, _, text, info = load_and_apply(model, None, _file_name(lora_name, lycoris_name), strength_model,
                                                  0.0, mode, block_weights, schedule)
        return {"ui": report_ui(text), "result": (new_model, text, trigger_text([info]), hashes_text([info]))}
