"""A MODEL's or CLIP's weights as ComfyUI computes them, patches included, one tensor at a time.

Extraction needs the tuned model's effective weights (a model with LoRAs loaded upstream holds
them only as patches); computing them per key keeps memory at one layer.
"""

from __future__ import annotations

import comfy.lora
import torch


def patched_weight(patcher, key: str) -> torch.Tensor:
    """The weight `key` of `patcher.model` with the patcher's patches applied, computed in fp32
    as ComfyUI does when it loads the model."""
    weight = patcher.model.state_dict()[key]
    patches = patcher.patches.get(key)
    if not patches:
        return weight
    w = weight.detach().to(torch.float32, copy=True)
    if hasattr(comfy.lora, "calculate_weight"):
        return comfy.lora.calculate_weight(patches, w, key)
    return patcher.calculate_weight(patches, w, key)  # the March-2024 runtime keeps it on the patcher


class PatchedWeights(dict):
    """dict of checkpoint-style key -> effective weight, computed on access (the last one cached)."""

    def __init__(self, sources):
        """`sources`: [(patcher, {model key: checkpoint-style key})]."""
        super().__init__()
        for patcher, names in sources:
            for key, name in names.items():
                dict.__setitem__(self, name, (patcher, key))
        self._last = (None, None)

    def __getitem__(self, name):
        if self._last[0] != name:
            patcher, key = dict.__getitem__(self, name)
            self._last = (name, patched_weight(patcher, key))
        return self._last[1]


def checkpoint_names(model=None, clip=None) -> list:
    """[(patcher, {key: name})] naming a MODEL's and CLIP's weights as a checkpoint would, so the
    extracted modules get the kohya names loaders know (lora_unet_, lora_te_ / lora_te1_, lora_te2_)."""
    sources = []
    if model is not None:
        keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
        sources.append((model, {k: "model." + k for k in keys}))
    if clip is not None:
        keys = list(clip.cond_stage_model.state_dict())
        dual = any(k.startswith("clip_g.") for k in keys)
        names = {}
        for k in keys:
            if k.startswith("clip_l.transformer.") and not dual:
                names[k] = "cond_stage_model.transformer." + k[len("clip_l.transformer."):]
            elif k.startswith(("clip_l.transformer.", "clip_g.transformer.")):
                names[k] = k
        sources.append((clip.patcher, names))
    return sources
