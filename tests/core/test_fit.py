"""What base model a file was trained for, read as a user would name it, and when a load is reported
as not fitting (lycoris_core/fit.py)."""

from __future__ import annotations

import pytest

from lycoris_core.fit import FAMILY_NAMES, cause, family_from_text, model_family, shortfall, trained_for


@pytest.mark.parametrize("text, family", [
    ("sd_v1", "sd1"), ("sd_v2_768_v", "sd2"), ("sdxl_base_v1-0", "sdxl"), ("sdxl_base_v0-9", "sdxl"),
    ("stable-diffusion-v1/lora", "sd1"), ("stable-diffusion-xl-v1-base/lora", "sdxl"),
    ("stable-diffusion-xl-v1-refiner/lora", "sdxl_refiner"), ("stable-diffusion-v3-medium/lora", "sd3"),
    ("flux-1-dev/lora", "flux"), ("Flux.1-schnell/lora", "flux"), ("flux-2-dev/lora", "flux2"),
    ("wan2.1-t2v-14b/lora", "wan"), ("qwen-image/lora", "qwen_image"), ("something else", None),
])
def test_metadata_names_the_family(text, family):
    assert family_from_text(text) == family


class _Lora:
    def __init__(self, shape):
        self.shape = shape

    def expected_shape(self):
        return self.shape


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_without_metadata_the_cross_attention_width_tells_sd_families_apart(width, family):
    adapters = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": _Lora((320, width))}
    found = trained_for({}, adapters)
    assert found.family == family and str(width) in found.evidence


def test_metadata_wins_and_ss_v2_marks_sd2():
    assert trained_for({"ss_base_model_version": "sd_v1", "ss_v2": "True"}, {}).family == "sd2"
    assert trained_for({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, {}).name == "SDXL"


def test_model_family_from_comfyuis_config_class_or_layer_names():
    assert model_family("SD15") == "sd1" and model_family("SDXLRefiner") == "sdxl_refiner"
    assert model_family("WAN21_T2V") == "wan"
    assert model_family("SomethingNew", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.37.linear1.weight"]) \
        == "flux"


def test_cause_in_words():
    sdxl = trained_for({"ss_base_model_version": "sdxl_base_v1-0"}, {})
    assert cause(sdxl, "sd1", "SD15", 10, 2) == ("this looks like an SDXL adapter on an SD1.5 model "
                                                 "(file: ss_base_model_version=sdxl_base_v1-0; model: SD15)")
    unknown = trained_for({}, {})
    assert "exist in this SD1.5 model with other widths" in cause(unknown, "sd1", "SD15", 10, 2)
    assert "3 of its layer names are not in this Flux.1 model" in cause(unknown, "flux", "Flux", 0, 3)
    assert "a Flux.1 adapter on an SDXL model" in cause(trained_for({"modelspec.architecture": "flux-1-dev/lora"}, {}),
                                                         "sdxl", "SDXL", 0, 5)
    assert set(FAMILY_NAMES) >= {"sd1", "sdxl", "flux"}


def test_shortfall():
    fits = dict(landed_model=90, landed_text_encoder=10, offered=100, file_model_modules=90, model_asked=True)
    assert shortfall(**fits) is None
    assert shortfall(**{**fits, "landed_model": 0}) == \
        "only the text encoder changed (10 layers), no diffusion-model layer"
    assert shortfall(**{**fits, "landed_model": 50}) == "only 60 of 100 modules applied"
    assert shortfall(**{**fits, "landed_model": 0, "model_asked": False}) == "only 10 of 100 modules applied"
