"""Key names: split `<module>.<suffix>` keys and put module names of every dialect in one form.

Suffixes can contain dots (`lora_up.weight`, `a1.weight`), so a key is split by matching the
known suffixes against its end, longest first; module names of PEFT and diffusers contain dots
too. Dialect aliases of the LoRA suffixes are folded into the kohya/LyCORIS spelling.
"""

from __future__ import annotations

import re

# alias -> canonical suffix (PEFT, diffusers and older diffusers attention processors)
SUFFIX_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A": "lora_down.weight",
    "lora_B": "lora_up.weight",
    "lora_B.bias": "lora_up.bias",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
}
# Deltas stored for a bare parameter rather than a layer: suffix -> the parameter it changes. lightx2v's
# Wan distillation LoRAs write `blocks.N.diff_m` (and `head.diff_m`) for the block's `modulation`
# nn.Parameter; the module name becomes the parameter's own name (`blocks.N.modulation`).
PARAMETER_DELTAS = {"diff_m": "modulation"}
# old diffusers attention processors append the suffix to the name: `...processor.to_q_lora.up.weight`
GLUED_SUFFIXES = {"_lora.up.weight": "lora_up.weight", "_lora.down.weight": "lora_down.weight"}

# Prefixes the trainers put before the model's own module path, longest first.
DIALECT_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_transformer_",
    "text_encoder_2.",
    "text_encoder.",
    "transformer.",
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lycoris_",
    "oft_unet_",
    "lora_te_",
    "unet.",
)


def _fold_adapter_name(key: str) -> str:
    # A raw PEFT `model.state_dict()` carries the adapter name: `.lora_A.default.weight`, `.hada_w1_a.default`.
    key = key.replace(".default.", ".")
    return key[: -len(".default")] if key.endswith(".default") else key


def split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(module name, canonical suffix), or None when no known suffix ends the key."""
    key = _fold_adapter_name(key)
    for alias, canonical in GLUED_SUFFIXES.items():
        if key.endswith(alias):
            return key[: -len(alias)], canonical
    for suffix, parameter in PARAMETER_DELTAS.items():
        if suffix in suffixes and key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return f"{key[: -len(suffix) - 1]}.{parameter}", suffix
    for suffix in _candidates(suffixes):
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], SUFFIX_ALIASES.get(suffix, suffix)
    return None


def join_key(module: str, suffix: str) -> str:
    """The file key for a module's tensor: `split_key` inverted (a parameter delta goes back to
    `blocks.N.diff_m`, not `blocks.N.modulation.diff_m`)."""
    parameter = PARAMETER_DELTAS.get(suffix)
    if parameter is not None and module.endswith("." + parameter):
        module = module[: -len(parameter) - 1]
    return f"{module}.{suffix}"


_CACHE: dict[tuple, tuple[str, ...]] = {}


def _candidates(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    cached = _CACHE.get(suffixes)
    if cached is None:
        cached = tuple(sorted(set(suffixes) | set(SUFFIX_ALIASES), key=len, reverse=True))
        _CACHE[suffixes] = cached
    return cached


def strip_dialect_prefix(name: str) -> str:
    for prefix in DIALECT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def underscore_form(name: str) -> str:
    """The comparable form of a module name: known prefix removed, dots as underscores."""
    return strip_dialect_prefix(name).replace(".", "_")


def pattern_matches(pattern: str, module_path: str, boundary: str = r"\.") -> bool:
    """PEFT `rank_pattern`/`alpha_pattern`/`target_modules` key semantics: a regex on the
    dotted path, anchored at a path boundary and at the end. `boundary` r"[._]" serves
    underscore module names (kohya), where "to_k" must match "..._attn2_to_k"."""
    try:
        return re.fullmatch(rf"(?:.*{boundary})?(?:{pattern})", module_path) is not None
    except re.error:
        return module_path == pattern or module_path.endswith(("." + pattern, "_" + pattern))
