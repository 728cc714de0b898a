"""Block ids: which block of the model a key (or an adapter's module name) belongs to.

Per-block strength binds weights to these ids, never to the position of a block among the blocks
an adapter happens to contain (reference/peers.md §2.6, Inspire-Pack #191).

Ids per architecture (`architecture_blocks`):

- ``sd1`` (SD1.x and SD2.x, same UNet layout): BASE, IN00–IN11, M00, OUT00–OUT11.
- ``sdxl``: BASE, IN00–IN08, M00, OUT00–OUT08.
- DiT families, one letter per block list, the count read from the keys (defaults below when the
  keys hold none of a list):
  ``flux``, ``chroma``, ``flux2``, ``hunyuan_video`` (``double_blocks.N`` → Dnn,
  ``single_blocks.N`` → Snn), ``hidream`` (``double_stream_blocks.N`` → D, ``single_stream_blocks.N`` → S),
  ``sd3`` (``joint_blocks.N`` → Jnn), ``wan`` (``blocks.N`` → Bnn), ``qwen_image`` and ``ltx``
  (``transformer_blocks.N`` → Tnn), ``lumina`` (Lumina2 / Z-Image, ``layers.N`` → Lnn).
  Numbers have two digits (three from 100 blocks on).
- Text encoders are their own group, listed after the diffusion blocks: ``TE`` where the
  architecture has one encoder, ``TE1``, ``TE2``… where it has several (sdxl: clip_l, clip_g;
  flux: clip_l, t5xxl; sd3: clip_l, clip_g, t5xxl; hunyuan_video: llama, clip_l; hidream: clip_l,
  clip_g, t5xxl, llama — the diffusers ``text_encoder``/``text_encoder_2``… order).

Rule for keys of the diffusion model outside every block: they take **BASE**. That covers
``time_embed``, ``label_emb``, ``out.`` (final norm and conv) of the UNets and their diffusers
names (``time_embedding``, ``add_embedding``, ``conv_norm_out``, ``conv_out``), and the DiTs'
input/output layers (Flux ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``; Lumina ``noise_refiner``/``context_refiner``; HunyuanVideo's token refiner, …).
This is Inspire-Pack's rule (its base slot); sd-webui LBW instead leaves these keys at 1.0 on SD.
The UNet's ``input_blocks.0`` (conv_in) is IN00, as in LBW's 26/20-slot layouts.

Diffusers (and kohya, which uses the diffusers names for SD) UNet names map onto the ldm ids, for
SD1 (4 down blocks) and SDXL (3 down blocks) alike, with 2 layers per down block and 3 per up block:

- ``conv_in`` → IN00
- ``down_blocks.i.resnets.j`` / ``down_blocks.i.attentions.j`` → IN(3i + j + 1)
- ``down_blocks.i.downsamplers.0`` → IN(3i + 3)       (SD1: IN03, IN06, IN09; SDXL: IN03, IN06)
- ``mid_block.*`` → M00
- ``up_blocks.i.resnets.j`` / ``up_blocks.i.attentions.j`` → OUT(3i + j)
- ``up_blocks.i.upsamplers.0`` → OUT(3i + 2)          (the upsampler sits in the block's last layer)

so SD1 ``down_blocks.3.resnets.1`` is IN11 and SDXL ``up_blocks.2.attentions.2`` is OUT08.
Diffusers DiT names: Flux-like ``transformer_blocks.N`` → D, ``single_transformer_blocks.N`` → S;
SD3 ``transformer_blocks.N`` → J; Wan ``blocks.N``; Qwen-Image / LTX ``transformer_blocks.N`` → T;
Lumina ``layers.N``.

Accepted spellings of a name: the model's own keys (``diffusion_model.…``,
``model.diffusion_model.…``, text encoders ``clip_l.…``/``clip_g.…``/``t5xxl.…`` and the other
ComfyUI encoder names, ``text_encoders.<name>.…``, ``cond_stage_model.…``,
``conditioner.embedders.N.…``) and adapter module names (kohya ``lora_unet_…`` and ComfyUI's ``lora_prior_unet_…``,
``lora_transformer_…``, ``lora_te_…``/``lora_te1_…``…, LyCORIS ``lycoris_…``, diffusers/PEFT
``unet.…``, ``transformer.…``, ``text_encoder.…``, ``text_encoder_2.…``, ``base_model.model.…``,
and LBW's ``diffusion_model_…``); dots and underscores are interchangeable.
"""

from __future__ import annotations

import math
import re

ARCHITECTURES = (
    "sd1", "sdxl", "flux", "chroma", "flux2", "hunyuan_video", "hidream",
    "sd3", "wan", "qwen_image", "lumina", "ltx", "unknown",
)

_ALIASES = {
    "sd2": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd1x": "sd1", "sd21": "sd1", "sd2.1": "sd1",
    "flux1": "flux", "flux.1": "flux", "flux.2": "flux2", "hunyuanvideo": "hunyuan_video",
    "hunyuan": "hunyuan_video", "qwen": "qwen_image", "qwenimage": "qwen_image",
    "z_image": "lumina", "zimage": "lumina", "z-image": "lumina", "lumina2": "lumina",
    "sd35": "sd3", "sd3.5": "sd3", "ltxv": "ltx", "wan21": "wan", "wan2.1": "wan", "wan22": "wan",
}

# DiT block lists: (regex on the normalised name, letter, default count)
_D, _S = r"^(?:double_blocks|transformer_blocks)[._](\d+)(?:[._]|$)", r"^(?:single_blocks|single_transformer_blocks)[._](\d+)(?:[._]|$)"
_DIT_GROUPS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "flux": ((_D, "D", 19), (_S, "S", 38)),
    "chroma": ((_D, "D", 19), (_S, "S", 38)),
    "flux2": ((_D, "D", 8), (_S, "S", 48)),
    "hunyuan_video": ((_D, "D", 20), (_S, "S", 40)),
    "hidream": ((r"^double_stream_blocks[._](\d+)(?:[._]|$)", "D", 16),
                (r"^single_stream_blocks[._](\d+)(?:[._]|$)", "S", 32)),
    "sd3": ((r"^(?:joint_blocks|transformer_blocks)[._](\d+)(?:[._]|$)", "J", 24),),
    "wan": ((r"^blocks[._](\d+)(?:[._]|$)", "B", 30),),
    "qwen_image": ((r"^transformer_blocks[._](\d+)(?:[._]|$)", "T", 60),),
    "ltx": ((r"^transformer_blocks[._](\d+)(?:[._]|$)", "T", 28),),
    "lumina": ((r"^layers[._](\d+)(?:[._]|$)", "L", 26),),
}
_DIT_COMPILED = {arch: tuple((re.compile(p), letter, n) for p, letter, n in groups)
                 for arch, groups in _DIT_GROUPS.items()}

# Text encoders per architecture: ids in order, and ComfyUI encoder names -> id.
_TE_IDS = {
    "sdxl": ("TE1", "TE2"),
    "flux": ("TE1", "TE2"),
    "sd3": ("TE1", "TE2", "TE3"),
    "hunyuan_video": ("TE1", "TE2"),
    "hidream": ("TE1", "TE2", "TE3", "TE4"),
}
_TE_NAMES = {
    "sdxl": {"clip_l": "TE1", "clip_g": "TE2"},
    "flux": {"clip_l": "TE1", "t5xxl": "TE2"},
    "sd3": {"clip_l": "TE1", "clip_g": "TE2", "t5xxl": "TE3"},
    "hunyuan_video": {"llama": "TE1", "clip_l": "TE2"},
    "hidream": {"clip_l": "TE1", "clip_g": "TE2", "t5xxl": "TE3", "llama": "TE4"},
}
# numbered adapter prefixes (lora_te1_, text_encoder_2., conditioner.embedders.1) -> id; 0: unnumbered
_TE_NUMBERS = {
    "sdxl": {0: "TE1", 1: "TE1", 2: "TE2"},
    "flux": {0: "TE1", 1: "TE1", 2: "TE2", 3: "TE2"},  # kohya's Flux writes T5 as lora_te3_
    "sd3": {0: "TE1", 1: "TE1", 2: "TE2", 3: "TE3"},
    "hunyuan_video": {0: "TE1", 1: "TE1", 2: "TE2"},
    "hidream": {0: "TE1", 1: "TE1", 2: "TE2", 3: "TE3", 4: "TE4"},
}
# ComfyUI's names for text-encoder sub-models (keys of a CLIP object's state dict)
ENCODER_NAMES = (
    "clip_l", "clip_g", "clip_h", "t5xxl", "t5xl", "t5base", "umt5xxl", "pile_t5xl", "mt5xl",
    "llama", "qwen25_3b", "qwen25_7b", "qwen3_4b", "qwen3_8b", "gemma2_2b", "gemma3_4b",
    "gemma3_12b", "mistral3_24b", "byt5_small", "jina_clip_2",
)
_TE_NUMBERED = re.compile(
    r"^(?:lora_te(\d?)_|lycoris_te(\d?)_|text_encoder(?:_(\d))?[._]|te(\d)[._]|"
    r"conditioner[._]embedders[._](\d+)[._])"
)
_TE_NAMED = re.compile(r"^(?:text_encoders[._])?(" + "|".join(ENCODER_NAMES) + r")[._]")
_TE_BARE = re.compile(r"^(?:cond_stage_model[._]|text_model[._]|transformer[._]text_model[._])")

_PREFIXES = re.compile(
    r"^(?:base_model\.model\.|model[._]diffusion_model[._]|diffusion_model[._]|lora_unet_|lora_prior_unet_|"
    r"lora_transformer_|lycoris_|oft_unet_|unet\.|transformer\.)"
)

# SD UNet, ldm names
_SD_LDM = (
    (re.compile(r"^input_blocks[._](\d+)(?:[._]|$)"), "IN"),
    (re.compile(r"^middle_block(?:[._]|$)"), "M"),
    (re.compile(r"^output_blocks[._](\d+)(?:[._]|$)"), "OUT"),
)
_SD_DOWN = re.compile(r"^down_blocks[._](\d+)[._](resnets|attentions|downsamplers)[._](\d+)(?:[._]|$)")
_SD_UP = re.compile(r"^up_blocks[._](\d+)[._](resnets|attentions|upsamplers)[._](\d+)(?:[._]|$)")
_SD_MID = re.compile(r"^mid_block(?:[._]|$)")
_SD_CONV_IN = re.compile(r"^conv_in(?:[._]|$)")

_SD_COUNTS = {"sd1": 12, "sdxl": 9}


def canonical_architecture(architecture: str | None) -> str:
    """The architecture name this module uses (aliases such as "sd2", "z_image" folded in)."""
    name = (architecture or "unknown").strip().lower()
    name = _ALIASES.get(name, name)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")
    return name


def text_encoder_ids(architecture: str) -> tuple[str, ...]:
    arch = canonical_architecture(architecture)
    return _TE_IDS.get(arch, ("TE",))


def _text_encoder(key: str, arch: str) -> str | None:
    """The TE id of a text-encoder key, None for keys of the diffusion model."""
    ids = _TE_IDS.get(arch, ("TE",))
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    m = _TE_NUMBERED.match(key)
    if m:
        digits = next((g for g in m.groups() if g is not None), "")
        if m.group(5) is not None:  # conditioner.embedders.N (ldm SDXL: 0 = clip_l, 1 = clip_g)
            number = int(m.group(5)) + 1
        else:
            number = int(digits) if digits else 0
        if len(ids) == 1:
            return ids[0]
        return _TE_NUMBERS[arch].get(number, ids[0])
    m = _TE_NAMED.match(key)
    if m:
        return ids[0] if len(ids) == 1 else _TE_NAMES[arch].get(m.group(1), ids[0])
    if _TE_BARE.match(key):
        return ids[0]
    return None


def _strip(key: str) -> str:
    # repeated: `base_model.model.transformer.…`, `model.diffusion_model.…`
    for _ in range(3):
        m = _PREFIXES.match(key)
        if not m:
            break
        key = key[m.end():]
    return key


def _sd_block(name: str, arch: str) -> str:
    for pattern, group in _SD_LDM:
        m = pattern.match(name)
        if m:
            return "M00" if group == "M" else f"{group}{int(m.group(1)):02d}"
    if _SD_CONV_IN.match(name):
        return "IN00"
    m = _SD_DOWN.match(name)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    if _SD_MID.match(name):
        return "M00"
    m = _SD_UP.match(name)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return "BASE"


def _number(letter: str, index: int) -> str:
    return f"{letter}{index:02d}" if index < 100 else f"{letter}{index:03d}"


def block_id(key: str, architecture: str) -> str:
    """The block id of a model key or an adapter module name for `architecture`.

    Text-encoder keys give their TE id; keys of the diffusion model outside every block give
    "BASE" (see the module docstring); every key of an "unknown" architecture's diffusion model
    gives "BASE".
    """
    arch = canonical_architecture(architecture)
    te = _text_encoder(key, arch)
    if te is not None:
        return te
    name = _strip(key)
    if arch in _SD_COUNTS:
        return _sd_block(name, arch)
    for pattern, letter, _ in _DIT_COMPILED.get(arch, ()):
        m = pattern.match(name)
        if m:
            return _number(letter, int(m.group(1)))
    return "BASE"


def _group_counts(keys, arch: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    groups = _DIT_COMPILED.get(arch, ())
    for key in keys:
        if _text_encoder(key, arch) is not None:
            continue
        name = _strip(key)
        for pattern, letter, _ in groups:
            m = pattern.match(name)
            if m:
                counts[letter] = max(counts.get(letter, 0), int(m.group(1)) + 1)
                break
    return counts


def architecture_blocks(architecture: str, keys=None) -> list[str]:
    """The ordered block ids of `architecture`: BASE, the blocks, then the text encoders.

    For DiTs the number of blocks of each list comes from `keys` (model keys or adapter module
    names) when they hold that list, else the architecture's usual count (Flux 19 double, 38
    single; SD3 24 joint; Wan 30; Qwen-Image 60; Lumina2 26; LTX 28; HunyuanVideo 20/40; Flux.2
    dev 8/48; HiDream 16/32).
    """
    arch = canonical_architecture(architecture)
    ids = ["BASE"]
    if arch in _SD_COUNTS:
        n = _SD_COUNTS[arch]
        ids += [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]
    elif arch in _DIT_COMPILED:
        counts = _group_counts(keys, arch) if keys is not None else {}
        for _, letter, default in _DIT_COMPILED[arch]:
            ids += [_number(letter, i) for i in range(counts.get(letter) or default)]
    return ids + list(_TE_IDS.get(arch, ("TE",)))


def block_groups(architecture: str) -> tuple[str, ...]:
    """The group prefixes of an architecture's ids, in order (e.g. BASE, IN, M, OUT, TE)."""
    arch = canonical_architecture(architecture)
    if arch in _SD_COUNTS:
        return ("BASE", "IN", "M", "OUT", "TE")
    return ("BASE",) + tuple(letter for _, letter, _ in _DIT_COMPILED.get(arch, ())) + ("TE",)


def id_group(block: str) -> str:
    """The group prefix of an id: "IN04" -> "IN", "S07" -> "S", "TE2" -> "TE", "BASE" -> "BASE"."""
    m = re.match(r"^([A-Z]+)", block)
    return m.group(1) if m else block


# -- architecture detection ------------------------------------------------------------------

_SDXL_HINT = re.compile(r"^(?:label_emb|add_embedding)(?:[._]|$)")
_INNER_TB = re.compile(r"^(?:input_blocks[._]\d+[._]1|down_blocks[._]\d+[._]attentions[._]\d+)[._]"
                       r"transformer_blocks[._]([1-9]\d*)[._]")
_TOP = re.compile(r"^(input_blocks|output_blocks|down_blocks|up_blocks|middle_block|mid_block|double_blocks|"
                  r"single_blocks|single_transformer_blocks|transformer_blocks|joint_blocks|"
                  r"double_stream_blocks|single_stream_blocks|blocks|layers)(?:[._](\d+))?(?:[._](.*))?$")
_QWEN_MARKS = ("img_mod", "txt_mod", "img_mlp", "txt_mlp")
_LTX_MARKS = ("attn1", "attn2", "scale_shift_table")
_JOINT_MARKS = ("ff_context", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def detect_architecture(keys) -> str:
    """The architecture of a model key list or an adapter's module names (see `ARCHITECTURES`).

    SD UNets: SD1 (and SD2, same layout) has input/output blocks up to 11 (diffusers: down/up
    block 3); SDXL up to 8, with `label_emb`, a second text encoder, or a transformer depth above
    1 as extra evidence. DiTs by their block lists: `joint_blocks` → sd3; `double_blocks` /
    `single_blocks` → flux, or chroma (`distilled_guidance_layer`), hunyuan_video (token refiner,
    or 20/40 blocks), flux2 (8/48, 8/24, 5/20 blocks or `double_stream_modulation`);
    `double_stream_blocks` → hidream; top-level `transformer_blocks` → qwen_image (img_mod/txt_mlp
    …), ltx (attn1/attn2); with joint attention only (add_q_proj, ff_context …) by the highest
    block: up to 19 a double-blocks-only diffusers Flux, up to 38 sd3, above qwen_image (a file
    holding only some blocks can be misread: pass the architecture when it is known); top-level
    `blocks` → wan; `layers` → lumina. Otherwise "unknown".
    """
    keys = list(keys)
    te2 = False
    sd_max, sd_seen, sdxl_hint, deep = -1, False, False, False
    groups: dict[str, int] = {}
    marks: set[str] = set()
    plain: list[str] = []
    for key in keys:
        te = _text_encoder(key, "sdxl")
        if te is not None:
            te2 = te2 or te == "TE2"
            continue
        name = _strip(key)
        plain.append(name)
        if _SDXL_HINT.match(name):
            sdxl_hint = True
        if _INNER_TB.match(name):
            deep = True
        m = _TOP.match(name)
        if not m:
            continue
        group, index, rest = m.group(1), m.group(2), m.group(3) or ""
        if group in ("input_blocks", "output_blocks", "middle_block", "mid_block"):
            sd_seen = True
            if index is not None and group in ("input_blocks", "output_blocks"):
                sd_max = max(sd_max, int(index))
            continue
        if group in ("down_blocks", "up_blocks"):
            sd_seen = True
            if index is not None and int(index) >= 3:
                sd_max = max(sd_max, 11)
            continue
        if index is None:
            continue
        groups[group] = max(groups.get(group, 0), int(index) + 1)
        if group == "transformer_blocks":
            for mark in _QWEN_MARKS + _LTX_MARKS + _JOINT_MARKS:
                if mark in rest:
                    marks.add(mark)
    if sd_seen:
        if sd_max >= 9:
            return "sd1"
        if sdxl_hint or te2 or deep or sd_max == 8:
            return "sdxl"
        return "sd1"
    if "joint_blocks" in groups:
        return "sd3"
    if "double_stream_blocks" in groups or "single_stream_blocks" in groups:
        return "hidream"
    double = groups.get("double_blocks", 0)
    single = max(groups.get("single_blocks", 0), groups.get("single_transformer_blocks", 0))
    if double or single:
        double = double or groups.get("transformer_blocks", 0)
        text = " ".join(plain)
        if "distilled_guidance_layer" in text:
            return "chroma"
        if "individual_token_refiner" in text or (double, single) == (20, 40):
            return "hunyuan_video"
        if "double_stream_modulation" in text or (double, single) in ((8, 48), (8, 24), (5, 20)):
            return "flux2"
        return "flux"
    if "transformer_blocks" in groups:
        if marks & set(_QWEN_MARKS):
            return "qwen_image"
        if marks & set(_LTX_MARKS):
            return "ltx"
        if marks & set(_JOINT_MARKS):  # attention-only joint blocks: tell them apart by count
            count = groups["transformer_blocks"]
            return "flux" if count <= 19 else "sd3" if count <= 38 else "qwen_image"
        return "qwen_image" if groups["transformer_blocks"] == 60 else "unknown"
    if "blocks" in groups:
        return "wan"
    if "layers" in groups:
        return "lumina"
    return "unknown"


# -- per-block magnitude (inspect heat map) --------------------------------------------------

class BlockNorms(dict):
    """block id -> Frobenius norm of the adapters' deltas in that block (ordered like the
    architecture's ids; 0.0 where no adapter). `layers[id]` counts the layers measured,
    `skipped` names the modules left out (multiplicative, or needing the base weight)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers: dict[str, int] = {}
        self.skipped: list[str] = []
        self.architecture = "unknown"


def block_norms(adapter_file, model_keys=None, architecture: str | None = None) -> BlockNorms:
    """Per-block ‖γΔW‖_F of `adapter_file` (an `AdapterFile`): sqrt of the sum of its layers'
    squared delta norms. A module's block is `block_id` of the model key it matches when
    `model_keys` are given (generic matching), else of its own name. `architecture` None or
    "auto": detected from `model_keys`, else from the module names. Skipped (and listed in
    `.skipped`): multiplicative adapters (OFT, BOFT, IA3), deltas that depend on the base weight
    (GLoRA, T-LoRA), and modules whose factors do not tell the weight shape.
    """
    import torch

    names = list(adapter_file.adapters)
    if architecture in (None, "", "auto"):
        architecture = detect_architecture(model_keys if model_keys is not None else names)
    arch = canonical_architecture(architecture)
    targets: dict[str, str] = {}
    if model_keys is not None:
        from .matching import match_generic

        model_keys = list(model_keys)
        targets = match_generic(adapter_file, model_keys).matched
    key_source = model_keys if model_keys is not None else names
    result = BlockNorms((b, 0.0) for b in architecture_blocks(arch, key_source))
    result.architecture = arch
    sums: dict[str, float] = {}
    for name, adapter in adapter_file.adapters.items():
        shape = adapter.expected_shape()
        if not adapter.additive or adapter.delta_uses_weight or shape is None:
            result.skipped.append(name)
            continue
        block = block_id(targets.get(name, name), arch)
        with torch.no_grad():
            d = adapter.delta(torch.zeros(shape))
            norm = float(torch.linalg.vector_norm(d.float()))
        sums[block] = sums.get(block, 0.0) + norm * norm
        result.layers[block] = result.layers.get(block, 0) + 1
    for block, total in sums.items():
        result[block] = math.sqrt(total)
    return result
