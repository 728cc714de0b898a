"""Merge to checkpoint: bake adapters into a checkpoint file, streamed layer by layer.

Module names are mapped with ComfyUI's own key map for the checkpoint's architecture, built on
the meta device from the file header (no weights are loaded), with the core's generic name
matching for what that map does not cover (kohya ldm names, SD1 text-encoder names).
"""

from __future__ import annotations

import comfy.lora
import comfy.model_detection
import folder_paths
import torch

from ..lycoris_core.block_weights import parse_block_weights
from ..lycoris_core.blocks import architecture_blocks, detect_architecture
from ..lycoris_core.keys import underscore_form
from ..lycoris_core.matching import Coverage, layer_index
from ..lycoris_core.merge import DTYPES, merge_files
from ..lycoris_core.safe_io import SafetensorsReader
from .cache import load_cached
from .key_map import resolve
from .loader import _adapter_path
from .presets import user_presets
from .utilities import NONE, ReportNode, _progress, _run, output_path, weighted_adapter_inputs

UNET_PREFIX = "model.diffusion_model."


def unet_key_map(path: str) -> dict:
    """ComfyUI's LoRA name -> checkpoint key map for the file's diffusion model ({} if undetected)."""
    with SafetensorsReader(path) as reader:
        shapes = {k: torch.empty(reader.shape(k), dtype=reader.dtype(k), device="meta") for k in reader.keys()}
    config = comfy.model_detection.model_config_from_unet(shapes, UNET_PREFIX)
    if config is None:
        return {}
    with torch.device("meta"):
        model = config.get_model(shapes, UNET_PREFIX, device=torch.device("meta"))
    key_map = {}
    for name, target in comfy.lora.model_lora_keys_unet(model, {}).items():
        if isinstance(target, str) and target.startswith("diffusion_model."):  # fused slices: not in files
            key_map[name] = "model." + target
    return key_map


# text encoders in HF layout inside checkpoints, and the kohya prefix that names them
TEXT_ENCODER_PREFIXES = (("cond_stage_model.transformer.", "lora_te_"),
                         ("conditioner.embedders.0.transformer.", "lora_te1_"))


def checkpoint_matcher(key_map: dict):
    """A `match(adapter_file, keys) -> Coverage` for lycoris_core.merge_files."""

    def match(adapter_file, keys) -> Coverage:
        index = layer_index(keys)
        for key in keys:
            for prefix, kohya in TEXT_ENCODER_PREFIXES:
                if key.startswith(prefix) and key.endswith(".weight"):
                    key_map.setdefault(kohya + key[len(prefix):-len(".weight")].replace(".", "_"), key)
        coverage = Coverage(source=adapter_file.name, unknown_keys=list(adapter_file.unknown_keys),
                            problems=list(adapter_file.problems),
                            model_layers=sum(1 for k in keys if k.endswith(".weight")))
        for module in adapter_file.adapters:
            target = resolve(module, key_map) or index.get(underscore_form(module))
            if target is None or target not in index.values():
                coverage.add_unmatched(module)
            else:
                coverage.matched[module] = target
        return coverage

    return match


def checkpoint_block_weights(path: str, text: str):
    """`text` read against the checkpoint's own keys (None when blank): ids come from the file."""
    if not text or not text.strip():
        return None
    with SafetensorsReader(path) as reader:
        keys = reader.keys()
    architecture = detect_architecture(keys)
    return parse_block_weights(text, architecture, architecture_blocks(architecture, keys), user_presets())


class LycorisMergeToCheckpoint(ReportNode):
    DESCRIPTION = ("Bakes up to three adapters (any LyCORIS algorithm) into a checkpoint file from the "
                   "checkpoints folder and writes a new checkpoint there, layer by layer: memory stays at about "
                   "one layer, NaN/Inf results are refused, the file appears only when complete.")
    OUTPUT_TOOLTIPS = ("Coverage of each adapter on the checkpoint.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {"tooltip": "The checkpoint to bake into "
                          "(.safetensors)."}),
            **weighted_adapter_inputs("strength", "Strength of this adapter.", required=1),
            "dtype": (["as stored"] + sorted(DTYPES), {"default": "as stored", "tooltip": "Dtype of the floating-"
                      "point tensors in the new file; merging itself is done in fp32."}),
            "output_name": ("STRING", {"default": "merged_lycoris", "tooltip": "File name in the checkpoints "
                            "folder (sanitised; .safetensors is added). An existing file of that name is replaced."}),
        }, "optional": {
            "block_weights": ("STRING", {"default": "", "multiline": True,
                              "placeholder": "e.g. IN04=0.5, OUT*=0  (or a preset name such as SD-INS, or an "
                              "Inspire/LBW vector)", "tooltip": "Per-block strength for "
                              "every adapter (named ids, an Inspire/LBW vector or a preset; see LyCORIS Block "
                              "Weight). Empty: every block at 1. A block at 0 is copied unchanged."}),
        }}

    def run(self, ckpt_name, lycoris_name_1, strength_1, lycoris_name_2, strength_2, lycoris_name_3, strength_3,
            dtype, output_name, block_weights=""):
        title = "LyCORIS merge to checkpoint"
        base = folder_paths.get_full_path("checkpoints", ckpt_name)
        if base is None:
            raise ValueError(f"{title}: checkpoint '{ckpt_name}' is not in the checkpoints folders")
        chosen = [(lycoris_name_1, strength_1), (lycoris_name_2, strength_2), (lycoris_name_3, strength_3)]

        def work():
            adapters = [(load_cached(_adapter_path(name)), s) for name, s in chosen if name != NONE]
            blocks = checkpoint_block_weights(base, block_weights)
            out = output_path("checkpoints", output_name)
            coverages = merge_files(base, adapters, out, dtype=DTYPES.get(dtype), progress=_progress(),
                                    match=checkpoint_matcher(unet_key_map(base)),
                                    block_weight=None if blocks is None else blocks.weight_for_key)
            cache = getattr(folder_paths, "filename_list_cache", None)
            if isinstance(cache, dict):
                cache.pop("checkpoints", None)
            lines = [f"{title}: wrote {out}"]
            if blocks is not None:
                lines += [f"block weights: {blocks.summary()}"] + [f"  warning: {w}" for w in blocks.warnings]
            text = "\n".join(lines + [line for c in coverages for line in c.lines()])
            return {"ui": {"text": [text]}, "result": (text,)}

        return _run(title, work)
