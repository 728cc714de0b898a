"""Whether an adapter file fits the model it is loaded on, in the user's words: the base model the
file was trained for (its metadata, else its layer names and widths), the family of the connected
model, and a warning when little or nothing of the file landed ("an SDXL adapter on an SD1.5 model").

It only reads names, metadata and counts; what landed is decided by the matching (matching.py,
nodes/patching.py). It does not refuse anything: a file that fits only partly still loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import detect_architecture

# Family key -> the name users know it by.
FAMILY_NAMES = {
    "sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner", "sd3": "SD3",
    "flux": "Flux.1", "flux2": "Flux.2", "chroma": "Chroma", "hunyuan_video": "HunyuanVideo",
    "hidream": "HiDream", "wan": "Wan", "qwen_image": "Qwen-Image", "lumina": "Lumina 2 / Z-Image",
    "ltx": "LTX-Video",
}

# ComfyUI's model config class names (`model.model.model_config`) -> family key. Plain strings: the
# core never imports comfy; a class missing here falls back to the model's layer names.
MODEL_CONFIG_FAMILIES = {
    "SD15": "sd1", "SD15_instructpix2pix": "sd1",
    "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SD_X4Upscaler": "sd2",
    "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl",
    "SDXL_instructpix2pix": "sdxl", "SDXLRefiner": "sdxl_refiner",
    "SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux", "Flux2": "flux2",
    "Chroma": "chroma", "HiDream": "hidream", "QwenImage": "qwen_image", "Lumina2": "lumina", "ZImage": "lumina",
    "LTXV": "ltx", "HunyuanVideo": "hunyuan_video",
}

# Substrings of `ss_base_model_version` / `modelspec.architecture` -> family key, first match wins
# (sd-scripts writes e.g. "sd_v1", "sd_v2_768_v", "sdxl_base_v1-0"; modelspec e.g.
# "stable-diffusion-xl-v1-base/lora", "flux-1-dev/lora").
_METADATA_MARKS = (
    ("refiner", "sdxl_refiner"), ("xl", "sdxl"), ("flux-2", "flux2"), ("flux.2", "flux2"), ("flux2", "flux2"),
    ("flux", "flux"), ("chroma", "chroma"), ("sd3", "sd3"), ("stable-diffusion-v3", "sd3"), ("hunyuan", "hunyuan_video"),
    ("hidream", "hidream"), ("wan", "wan"), ("qwen", "qwen_image"), ("lumina", "lumina"), ("z-image", "lumina"),
    ("ltx", "ltx"), ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"), ("sd2", "sd2"), ("sd_v1", "sd1"),
    ("stable-diffusion-v1", "sd1"), ("sd1", "sd1"),
)
METADATA_KEYS = ("modelspec.architecture", "ss_base_model_version")
# cross-attention key width of the SD UNets: SD1.x reads CLIP-L (768), SD2.x OpenCLIP-H (1024), SDXL both (2048)
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# family -> the block layout (lycoris_core.blocks) it shares: what a model file's header tells apart
_BLOCK_LAYOUT = {"sd2": "sd1", "sdxl_refiner": "sdxl"}
# below this share of its modules landed, a load is reported as not fitting
LOW_SHARE = 0.8


@dataclass
class TrainedFor:
    """The family a file was trained for and the evidence read (None: not known)."""

    family: str | None
    evidence: str = ""

    @property
    def name(self) -> str | None:
        return None if self.family is None else FAMILY_NAMES.get(self.family, self.family)

    @property
    def architecture(self) -> str | None:
        """The block layout of that family (SD2.x reads as sd1), to compare with a model file's."""
        return None if self.family is None else _BLOCK_LAYOUT.get(self.family, self.family)

    def as_dict(self) -> dict:
        return {"family": self.family, "name": self.name, "architecture": self.architecture, "evidence": self.evidence}


def family_from_text(text: str) -> str | None:
    lowered = str(text).lower()
    for mark, family in _METADATA_MARKS:
        if mark in lowered:
            return family
    return None


def trained_for(metadata: dict, adapters: dict) -> TrainedFor:
    """The file's base-model family: its metadata first, else its layer names (and for SD UNets the
    cross-attention width, which tells SD1.x, SD2.x and SDXL apart)."""
    for key in METADATA_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            family = family_from_text(value)
            if family == "sd1" and str(metadata.get("ss_v2", "")).lower() == "true":
                family = "sd2"
            if family is not None:
                return TrainedFor(family, f"{key}={value}")
    width = _context_width(adapters)
    if width in _CONTEXT_WIDTHS:
        return TrainedFor(_CONTEXT_WIDTHS[width], f"its cross-attention layers read {width}-wide text embeddings")
    architecture = detect_architecture(adapters)
    if architecture not in ("unknown", "sd1"):  # sd1 by layout alone can be SD2.x
        return TrainedFor(architecture, "its layer names")
    return TrainedFor(None)


def _context_width(adapters: dict) -> int | None:
    """The input width of a UNet cross-attention key/value layer (`attn2.to_k`), if the file has one."""
    for name, adapter in adapters.items():
        flat = name.replace(".", "_")
        if "attn2_to_k" in flat or "attn2_to_v" in flat:
            try:
                shape = adapter.expected_shape()
            except Exception:  # noqa: BLE001 - a module whose shape cannot be read says nothing here
                continue
            if shape is not None and len(shape) >= 2:
                return int(shape[1])
    return None


def model_family(config_class: str | None, model_keys=()) -> str | None:
    """The connected model's family: ComfyUI's model config class name, else its layer names."""
    if config_class in MODEL_CONFIG_FAMILIES:
        return MODEL_CONFIG_FAMILIES[config_class]
    if config_class and config_class.startswith(("WAN", "Wan")):
        return "wan"
    if config_class and config_class.startswith("HunyuanVideo"):
        return "hunyuan_video"
    architecture = detect_architecture(model_keys) if model_keys else "unknown"
    return None if architecture in ("unknown", "sd1") else architecture


def _article(name: str) -> str:
    """"an SDXL", "an LTX-Video", "a Flux.1": the acronyms are read letter by letter."""
    return "an" if name.startswith(("SD", "LTX")) or name[:1].upper() in "AEIOU" else "a"


def cause(file: TrainedFor, model_family_key: str | None, model_label: str, shape_misfits: int,
          missing: int) -> str:
    """Why modules did not land, in one phrase."""
    model_name = FAMILY_NAMES.get(model_family_key, model_label) if model_family_key else model_label
    if file.family is not None and model_family_key is not None and file.family != model_family_key:
        return (f"this looks like {_article(file.name)} {file.name} adapter on {_article(model_name)} {model_name} "
                f"model (file: {file.evidence}; model: {model_label})")
    if shape_misfits and shape_misfits >= missing:
        return (f"{shape_misfits} of its layers exist in this {model_name} model with other widths: "
                "it was trained for another base model" + (f" (file: {file.evidence})" if file.evidence else ""))
    if missing:
        return (f"{missing} of its layer names are not in this {model_name} model: it was trained for another "
                "base model, or for parts this model lacks" + (f" (file: {file.evidence})" if file.evidence else ""))
    return f"the file does not fit this {model_name} model"


def shortfall(*, landed_model: int, landed_text_encoder: int, offered: int, file_model_modules: int,
              model_asked: bool) -> str | None:
    """What fell short when the load does not fit ("only 3 of 40 modules applied"), else None. `offered`: the modules the node tried
    (text-encoder modules skipped for want of a CLIP input are not counted); `file_model_modules`:
    the file's diffusion-model modules; `model_asked`: a model input with a strength other than 0."""
    landed = landed_model + landed_text_encoder
    if offered == 0:
        return None
    if model_asked and file_model_modules and landed_model == 0:
        what = (f"only the text encoder changed ({landed_text_encoder} layers), no diffusion-model layer"
                if landed_text_encoder else "nothing changed")
    elif landed / offered < LOW_SHARE:
        what = f"only {landed} of {offered} modules applied"
    else:
        return None
    return what
