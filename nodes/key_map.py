"""From adapter module names to the running model's weight keys.

Starts from ComfyUI's own maps (`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`), so
every architecture the runtime knows is covered, and adds the dialects those maps miss: the
same names under another trainer's prefix, and the model's own keys in underscore form. A
target is a weight key, or `(key, (dim, start, length))` for a slice of a fused weight (Flux
`qkv`, `linear1`). Where the runtime has no diffusers names for an architecture, the pack's own
tables (`lycoris_core.name_tables`) add them, never replacing an entry ComfyUI has.
"""

from __future__ import annotations

import comfy.lora

from ..lycoris_core.keys import DIALECT_PREFIXES, PARAMETER_DELTAS, strip_dialect_prefix
from ..lycoris_core.name_tables import diffusers_targets
from .layers import logical_weight_shape, module_of

# Trainers that name the same module under different prefixes; ComfyUI maps some of them only.
_EQUIVALENT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_", "lora_te_", "lora_te1_", "oft_unet_")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "clip_", "t5xxl")
# How trainers write a diffusers module path: dotted (diffusers/PEFT/ai-toolkit/OneTrainer
# diffusers format, DiffSynth raw), or dots as underscores (SimpleTuner/LyCORIS, OneTrainer legacy,
# kohya-style trainers on diffusers models such as musubi's FramePack).
_DIFFUSERS_DOTTED = ("", "transformer.", "diffusion_model.", "base_model.model.")
_DIFFUSERS_FLAT = ("lycoris_", "lora_transformer_", "lora_unet_")


def build_key_map(model=None, clip=None) -> dict:
    """ComfyUI's name -> target map for the given ModelPatcher and CLIP, plus our extensions."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        _add_name_tables(key_map, model.model)
        _add_parameters(key_map, model.model)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    _add_underscore_forms(key_map)
    return key_map


def _add_name_tables(key_map: dict, base_model) -> None:
    """The pack's diffusers tables for this model, under every trainer's prefix, where ComfyUI's
    own map has no entry (added before the underscore forms: a diffusers name must not lose to
    an original name that reads the same, e.g. Wan's `norm2`, which diffusers calls `norm3`)."""
    for name, target in diffusers_targets(_logical_shapes(base_model)).items():
        flat = name.replace(".", "_")
        for prefix in _DIFFUSERS_DOTTED:
            key_map.setdefault(prefix + name, target)
        for prefix in _DIFFUSERS_FLAT:
            key_map.setdefault(prefix + flat, target)


def _add_parameters(key_map: dict, base_model) -> None:
    """Bare parameters adapters change directly (keys.PARAMETER_DELTAS: Wan's `blocks.N.modulation`),
    which ComfyUI's maps leave out (they list `.weight` keys): the reader names such a module after
    the parameter, so the parameter's own key is its target."""
    ends = tuple("." + name for name in PARAMETER_DELTAS.values())
    for key, _ in base_model.named_parameters():
        if key.startswith("diffusion_model.") and key.endswith(ends):
            key_map.setdefault(key, key)
            key_map.setdefault("lora_unet_" + key[len("diffusion_model."):].replace(".", "_"), key)


def _logical_shapes(base_model) -> dict:
    """Weight key -> the shape the layer computes with: the tables cut fused rows by the layer's
    input width, which GGUF and nvfp4 state dicts report packed."""
    shapes = {}
    for key, value in base_model.state_dict().items():
        layer = module_of(base_model, key) if key.endswith(".weight") else None
        shapes[key] = (logical_weight_shape(layer) if layer is not None else None) or tuple(value.shape)
    return shapes


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


# Prefixes that name one text encoder of several: a module under one of them is never tried under
# another encoder's (SDXL's second encoder, `lora_te2_`, is not the first one of an SD1.5 model).
_ENCODER_OF_PREFIX = {"lora_te_": 1, "lora_te1_": 1, "text_encoder.": 1, "lora_te2_": 2, "text_encoder_2.": 2,
                      "lora_te3_": 3}


def _encoder(name: str) -> int | None:
    return next((n for prefix, n in _ENCODER_OF_PREFIX.items() if name.startswith(prefix)), None)


def _candidates(module: str):
    yield module
    yield module.replace(".", "_")
    stripped = strip_dialect_prefix(module)
    if stripped != module:
        yield stripped
        yield stripped.replace(".", "_")
        encoder = _encoder(module)
        for prefix in DIALECT_PREFIXES:
            other = _ENCODER_OF_PREFIX.get(prefix)
            if encoder is not None and other is not None and other != encoder:
                continue
            yield prefix + stripped
            yield (prefix + stripped).replace(".", "_")


def is_text_encoder_module(module: str) -> bool:
    return module.startswith(TEXT_ENCODER_PREFIXES)


def target_key(target) -> str:
    return target if isinstance(target, str) else target[0]
