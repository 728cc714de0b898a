"""Map adapter modules onto a model's layers and report the coverage of every load.

Outside ComfyUI (command line, generic state dicts) a module name matches a layer `X.weight`
when both are equal in underscore form after stripping the known dialect prefixes, or when the
pack's name tables give the layer of a diffusers name (whole weights only: no fused-row slices here).
Text-encoder modules (`lora_te_`, `lora_te1_`, `lora_te2_`, `text_encoder.`, `text_encoder_2.`, all
in HF CLIP names) find the encoders an SD1.x / SD2.x / SDXL checkpoint stores, OpenCLIP ones
included, whose q/k/v are thirds of one fused `in_proj_weight`. ComfyUI's own key maps are used
by `nodes/` instead; both produce the same `Coverage`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .keys import PARAMETER_DELTAS, underscore_form
from .name_tables import whole_weight_targets

# Layers only some variants of an architecture have: a file trained on one variant names them, and
# on another variant they are simply absent, not a failure. (name parts, which variant has them)
VARIANT_ONLY_LAYERS = (
    (("k_img", "v_img", "norm_k_img", "img_emb"), "I2V-only: Wan 2.1 image-to-video models"),
)
_VARIANT_PATTERNS = tuple(
    (re.compile(r"(?:^|[._])(?:" + "|".join(parts) + r")(?:[._]|$)"), label) for parts, label in VARIANT_ONLY_LAYERS
)


def variant_only(module: str) -> str | None:
    """Which variant has the layer `module` names, when it is one of VARIANT_ONLY_LAYERS."""
    return next((label for pattern, label in _VARIANT_PATTERNS if pattern.search(module)), None)


@dataclass
class Coverage:
    """What one adapter file did to one model. Every module not applied is in exactly one group,
    by cause: no such layer (`unmatched`), bad shape (`problems`), a second module for a layer or
    rows another module already patches (`duplicates`), or keys no algorithm reads (`unknown_keys`)."""

    source: str
    matched: dict[str, str] = field(default_factory=dict)  # module name -> model layer (weight key)
    unmatched: list[str] = field(default_factory=list)  # module names with no layer in the model
    absent: list[str] = field(default_factory=list)  # modules for layers only another variant has
    unknown_keys: list[str] = field(default_factory=list)  # file keys no algorithm understood
    problems: list[str] = field(default_factory=list)  # modules left out (bad shapes), one line each
    duplicates: list[str] = field(default_factory=list)  # "module: ... (applied: other)", one line each
    model_layers: int = 0  # adaptable layers in the model
    # module -> (part, parts): the module patches rows part*n:(part+1)*n of its layer's n*parts
    # rows (q/k/v of an OpenCLIP `in_proj_weight`); modules not here patch the whole weight
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add_unmatched(self, module: str) -> None:
        """A module with no layer here: `absent` when its layer belongs to another variant of the
        architecture (VARIANT_ONLY_LAYERS), else `unmatched`."""
        label = variant_only(module)
        (self.unmatched if label is None else self.absent).append(module if label is None else f"{module} ({label})")

    @property
    def untouched(self) -> int:
        return max(self.model_layers - len(set(self.matched.values())), 0)

    @property
    def complete(self) -> bool:
        return not (self.unmatched or self.unknown_keys or self.problems or self.duplicates)

    def lines(self, limit: int = 5) -> list[str]:
        """A summary line, then each group of what did not land with its first `limit` entries."""
        total = len(self.matched) + len(self.unmatched) + len(self.problems) + len(self.duplicates) + len(self.absent)
        out = [
            f"{self.source}: {len(self.matched)}/{total} modules matched, "
            f"{len(self.unmatched)} unmatched, "
            + (f"{len(self.absent)} not in this model (other variant), " if self.absent else "")
            + f"{len(self.unknown_keys)} keys not understood, "
            f"{len(self.problems)} modules with errors, {len(self.duplicates)} duplicates; "
            f"{self.untouched} of {self.model_layers} model layers untouched"
        ]
        for title, items in (("not in this model (I2V-only / other variant; not an error)", self.absent),
                             ("not in this model (no layer of that name)", self.unmatched),
                             ("shape or tensors do not fit", self.problems),
                             ("duplicate: a layer or rows another module already patches", self.duplicates),
                             ("keys not understood", self.unknown_keys)):
            if items:
                out.append(f"  {title} ({len(items)}):")
                out.extend(f"    {item}" for item in items[:limit])
                if len(items) > limit:
                    out.append(f"    ... {len(items) - limit} more")
        return out


class TargetClaims:
    """Which module patches which rows of which weight, so a second module for the same layer
    (two dialects of one name, a fused weight and one of its slices) is reported, not applied twice."""

    def __init__(self):
        self._claims: dict[str, list[tuple[int, int | None, str]]] = {}

    def conflict(self, key: str, rows: tuple[int, int] | None = None) -> str | None:
        """The module already patching `key` at rows `(start, length)` (None: all), if any."""
        start, end = (0, None) if rows is None else (rows[0], rows[0] + rows[1])
        for other_start, other_end, other in self._claims.get(key, ()):
            if (end is None or other_start < end) and (other_end is None or start < other_end):
                return other
        return None

    def add(self, module: str, key: str, rows: tuple[int, int] | None = None) -> None:
        start, end = (0, None) if rows is None else (rows[0], rows[0] + rows[1])
        self._claims.setdefault(key, []).append((start, end, module))

    def claim(self, module: str, key: str, rows: tuple[int, int] | None = None) -> str | None:
        """`conflict`, and when there is none, `add`."""
        other = self.conflict(key, rows)
        if other is None:
            self.add(module, key, rows)
        return other


def layer_index(model_keys) -> dict[str, str]:
    """underscore form -> weight key, for every `X.weight` of a state dict; a bare parameter that
    adapters change directly (keys.PARAMETER_DELTAS, e.g. Wan's `blocks.N.modulation`) is its own key."""
    index: dict[str, str] = {}
    parameters = tuple("." + name for name in PARAMETER_DELTAS.values())
    for key in model_keys:
        if key.endswith(parameters):
            index.setdefault(underscore_form(key), key)
            index.setdefault(key.replace(".", "_"), key)
            continue
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        index.setdefault(underscore_form(module), key)
        index.setdefault(module.replace(".", "_"), key)
    return index


def duplicate_line(module: str, key: str, applied: str, rows=None) -> str:
    where = key if rows is None else f"{key} rows {rows[0]}:{rows[0] + rows[1]}"
    return f"{module}: {where} is already patched by {applied} (applied); this one left out"


# Text encoders as checkpoints store them: (key prefix, layout, encoder number in adapter names).
# "hf": transformers' CLIPTextModel names; "openclip": open_clip's, attention fused in in_proj.
CHECKPOINT_TEXT_ENCODERS = (
    ("cond_stage_model.transformer.", "hf", 1),  # SD1.x: CLIP ViT-L
    ("cond_stage_model.model.", "openclip", 1),  # SD2.x: OpenCLIP ViT-H
    ("conditioner.embedders.0.transformer.", "hf", 1),  # SDXL: CLIP ViT-L
    ("conditioner.embedders.1.model.", "openclip", 2),  # SDXL: OpenCLIP ViT-bigG
)
# adapter prefix -> encoder number (1 for the first or only one); longest first
TEXT_ENCODER_NAMES = (("text_encoder_2.", 2), ("text_encoder.", 1), ("lora_te1_", 1), ("lora_te2_", 2),
                      ("lora_te_", 1))
# open_clip resblock part -> HF CLIP layer part; `None` rows: the whole weight
_OPENCLIP_PARTS = {
    "attn.in_proj_weight": (("self_attn_q_proj", (0, 3)), ("self_attn_k_proj", (1, 3)), ("self_attn_v_proj", (2, 3))),
    "attn.out_proj.weight": (("self_attn_out_proj", None),),
    "mlp.c_fc.weight": (("mlp_fc1", None),),
    "mlp.c_proj.weight": (("mlp_fc2", None),),
    "ln_1.weight": (("layer_norm1", None),),
    "ln_2.weight": (("layer_norm2", None),),
}
_OPENCLIP_TOP = {"ln_final.weight": "text_model_final_layer_norm",
                 "token_embedding.weight": "text_model_embeddings_token_embedding"}


def text_encoder_targets(model_keys) -> dict[tuple[int, str], tuple[str, tuple[int, int] | None]]:
    """(encoder number, HF CLIP module path in underscore form) -> (weight key, rows) for the text
    encoders among `model_keys`; `rows` is (part, parts) of a fused weight, or None."""
    targets: dict = {}
    for key in model_keys:
        for prefix, layout, number in CHECKPOINT_TEXT_ENCODERS:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if layout == "hf" and rest.endswith(".weight"):
                targets[(number, rest[: -len(".weight")].replace(".", "_"))] = (key, None)
            elif layout == "openclip":
                if rest in _OPENCLIP_TOP:
                    targets[(number, _OPENCLIP_TOP[rest])] = (key, None)
                parts = rest.split(".", 3)
                if len(parts) == 4 and parts[:2] == ["transformer", "resblocks"] and parts[2].isdigit():
                    for name, rows in _OPENCLIP_PARTS.get(parts[3], ()):
                        targets[(number, f"text_model_encoder_layers_{parts[2]}_{name}")] = (key, rows)
    return targets


def text_encoder_module(module: str) -> tuple[int, str] | None:
    """(encoder number, HF path in underscore form) of a text-encoder module name, else None."""
    for prefix, number in TEXT_ENCODER_NAMES:
        if module.startswith(prefix):
            return number, module[len(prefix):].replace(".", "_")
    return None


def match_generic(adapter_file, model_keys) -> Coverage:
    """Coverage of `adapter_file` on a generic state dict with keys `model_keys`."""
    keys = list(model_keys)
    index = layer_index(keys)
    encoders = text_encoder_targets(keys)
    # diffusers names of architectures whose checkpoints name layers otherwise (name_tables)
    for name, key in whole_weight_targets(keys).items():
        index.setdefault(name.replace(".", "_"), key)
    coverage = Coverage(
        source=adapter_file.name,
        unknown_keys=list(adapter_file.unknown_keys),
        problems=list(adapter_file.problems),
        model_layers=sum(1 for k in keys if k.endswith((".weight", ".in_proj_weight"))),
    )
    claims = TargetClaims()
    for module in adapter_file.adapters:
        rows = None
        encoder = text_encoder_module(module) if encoders else None
        if encoder is not None and encoder in encoders:
            target, rows = encoders[encoder]
        else:
            target = index.get(underscore_form(module)) or index.get(module.replace(".", "_"))
        if target is None:
            coverage.add_unmatched(module)
        elif (applied := claims.claim(module, target, None if rows is None else (rows[0], 1))) is not None:
            # e.g. lora_te1_X and lora_te2_X on a generic dict holding one X: refuse to guess
            where = target if rows is None else f"{target} (part {rows[0] + 1} of {rows[1]})"
            coverage.duplicates.append(duplicate_line(module, where, applied))
        else:
            coverage.matched[module] = target
            if rows is not None:
                coverage.rows[module] = rows
    return coverage
