"""From adapter module names to the running model's weight keys.

Starts from ComfyUI's own maps (`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`), so
every architecture the runtime knows is covered, and adds the dialects those maps miss: the
same names under another trainer's prefix, and the model's own keys in underscore form. A
target is a weight key, or `(key, (dim, start, length))` for a slice of a fused weight (Flux
`qkv`, `linear1`).
"""

from __future__ import annotations

import comfy.lora

from ..lycoris_core.keys import DIALECT_PREFIXES, strip_dialect_prefix

# Trainers that name the same module under different prefixes; ComfyUI maps some of them only.
_EQUIVALENT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_", "lora_te_", "lora_te1_", "oft_unet_")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "clip_", "t5xxl")


def build_key_map(model=None, clip=None) -> dict:
    """ComfyUI's name -> target map for the given ModelPatcher and CLIP, plus our extensions."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    _add_underscore_forms(key_map)
    return key_map


def _add_underscore_forms(key_map: dict) -> None:
    """Every name ComfyUI knows, also in underscore form and under the other trainers' prefixes."""
    extra = {}
    for name, target in key_map.items():
        flat = name.replace(".", "_")
        extra.setdefault(flat, target)
        for prefix in _EQUIVALENT_PREFIXES:
            if flat.startswith(prefix):
                rest = flat[len(prefix):]
                for other in _EQUIVALENT_PREFIXES:
                    if other.startswith("lora_te") == prefix.startswith("lora_te"):
                        extra.setdefault(other + rest, target)
    for name, target in extra.items():
        key_map.setdefault(name, target)


def resolve(module: str, key_map: dict):
    """The target of `module`, or None. Tries the name as written, then in underscore form,
    then with its dialect prefix stripped or swapped."""
    for candidate in _candidates(module):
        target = key_map.get(candidate)
        if target is not None:
            return target
    return None


def _candidates(module: str):
    yield module
    yield module.replace(".", "_")
    stripped = strip_dialect_prefix(module)
    if stripped != module:
        yield stripped
        yield stripped.replace(".", "_")
        for prefix in DIALECT_PREFIXES:
            yield prefix + stripped
            yield (prefix + stripped).replace(".", "_")


def is_text_encoder_module(module: str) -> bool:
    return module.startswith(TEXT_ENCODER_PREFIXES)


def target_key(target) -> str:
    return target if isinstance(target, str) else target[0]
