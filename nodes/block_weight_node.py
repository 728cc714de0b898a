"""LyCORIS Block Weight: one place to write per-block strength, checked against the model it is
for. It outputs the resolved named form, which every `block_weights` input reads back the same
way whatever dialect the user typed (Inspire or LBW vectors, presets, named ids)."""

from __future__ import annotations

import logging

from ..lycoris_core.block_weights import BlockWeightError, parse_block_weights, shipped_presets
from ..lycoris_core.blocks import ARCHITECTURES, architecture_blocks, detect_architecture
from .presets import user_presets

CATEGORY = "loaders/lycoris"
NONE = "none"
AUTO = "auto"
# shown in an empty block_weights box (here and on the loaders): what to type
PLACEHOLDER = "e.g. IN04=0.5, OUT*=0  (or a preset name such as SD-INS, or an Inspire/LBW vector)"


def model_keys(model, clip=None) -> list[str]:
    """State-dict keys of the diffusion model (and text encoders) a block-weight string is read against."""
    keys = list(model.model.state_dict())
    if clip is not None:
        keys += list(clip.cond_stage_model.state_dict())
    return keys


def read_block_weights(text: str, model=None, clip=None, architecture: str = AUTO, **options):
    """`text` read for the connected model, or for `architecture` when there is none. `options`:
    `seed`, `a`, `b`, `inverse` of `parse_block_weights` (Inspire's seed, A, B and inverse)."""
    if model is not None:
        keys = model_keys(model, clip)
        detected = detect_architecture(keys)
        ids = architecture_blocks(detected, keys)
    elif architecture in (AUTO, "", None):
        raise BlockWeightError("connect a model or choose the architecture the weights are for")
    else:
        detected, ids = architecture, architecture_blocks(architecture)
    return parse_block_weights(text, detected, ids, user_presets(), **options)


class LycorisBlockWeight:
    DESCRIPTION = ("Per-block strength for the LyCORIS loaders: pick a preset (Inspire-Pack and sd-webui LBW "
                   "presets, and your own in user_presets/) or type weights, checked against the connected "
                   "model's blocks. Connect block_weights to a loader's block_weights input.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("block_weights", "report")
    OUTPUT_TOOLTIPS = (
        "The weights as named block ids (e.g. IN00-IN11=0, M00=0.5), for a loader's block_weights input.",
        "Which dialect was read and the weight of every block.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        presets = list(shipped_presets()) + [n for n in user_presets() if n not in shipped_presets()]
        return {"required": {
            "preset": ([NONE] + presets, {"default": NONE, "tooltip": "A named preset (Inspire-Pack's SD-*, "
                       "SDXL-*, FLUX-*, sd-webui LBW's, or yours from user_presets/). Used when weights is empty."}),
            "weights": ("STRING", {"default": "", "multiline": True, "placeholder": PLACEHOLDER,
                        "tooltip": "Named blocks (IN04=0.5, OUT*=0, "
                        "D00-D18=1, TE=0), an Inspire or LBW vector, or a preset name. Blocks not named stay at 1. "
                        "Empty: the preset, or every block at 1."}),
            "architecture": ([AUTO] + [a for a in ARCHITECTURES if a != "unknown"], {"default": AUTO,
                             "tooltip": "The model family the weights are for; auto reads it from the connected "
                             "model."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The model the weights will be applied to: its blocks decide which ids "
                      "exist and how many values a vector needs."}),
            # Inspire-Pack's parameters, so its presets that use R/U/A/B tokens read as they do there
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed of the random "
                     "tokens R and U (Inspire: R uniform 0..3, U uniform -1.5..1.5)."}),
            "A": ("FLOAT", {"default": 4.0, "min": -100.0, "max": 100.0, "step": 0.01,
                            "tooltip": "The value of the token A (a is A/2)."}),
            "B": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                            "tooltip": "The value of the token B (b is B/2)."}),
            "inverse": ("BOOLEAN", {"default": False, "tooltip": "Every weight w becomes 1 - w (Inspire's inverse)."}),
        }}

    def run(self, preset, weights, architecture, model=None, seed=0, A=4.0, B=1.0, inverse=False):
        text = weights if weights and weights.strip() else ("" if preset == NONE else preset)
        try:
            blocks = read_block_weights(text, model, None, architecture, seed=seed, a=A, b=B, inverse=inverse)
        except (BlockWeightError, ValueError) as error:
            raise ValueError(f"LyCORIS Block Weight: {error}") from None
        lines = [f"LyCORIS Block Weight ({blocks.architecture}): {blocks.summary()}"]
        if model is not None and architecture not in (AUTO, blocks.architecture):
            lines.append(f"  note: the model is {blocks.architecture}; the architecture input ({architecture}) "
                         "was not used")
        lines += [f"  warning: {w}" for w in blocks.warnings]
        for warning in blocks.warnings:
            logging.warning("LyCORIS Block Weight: %s", warning)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (blocks.describe(compact=True), report)}
