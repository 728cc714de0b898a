"""Block ids on ComfyUI's own model classes (full size, meta device): every key of the diffusion
model, and every adapter name ComfyUI's key map knows for it, gets the block its layout says.
The expected id is read here from the key's block list and index, independently of the pack."""

from __future__ import annotations

import re

import pytest
import torch

from test_architectures import SD15, SDXL, meta_flux

# DiT classes whose defaults build a full-size model; Flux is built from its diffusers state dict
DITS = {"flux": ("Flux", meta_flux), "sd3": ("SD3", None), "wan": ("WAN21_T2V", None), "lumina": ("Lumina2", None),
        "qwen_image": ("QwenImage", None), "ltx": ("LTXV", None)}
LISTS = {"flux": {"double_blocks": "D", "single_blocks": "S"}, "sd3": {"joint_blocks": "J"}, "wan": {"blocks": "B"},
         "lumina": {"layers": "L"}, "qwen_image": {"transformer_blocks": "T"}, "ltx": {"transformer_blocks": "T"}}


def _meta(config_class, unet_config):
    with torch.device("meta"):
        return config_class(dict(unet_config)).get_model({}, device=torch.device("meta"))


def _expected_unet(key: str) -> str:
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", key)
    if m:
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
    return "M00" if key.startswith("middle_block.") else "BASE"


def _expected_dit(key: str, arch: str) -> str:
    for name, letter in LISTS[arch].items():
        m = re.match(rf"{name}\.(\d+)\.", key)
        if m:
            return f"{letter}{int(m.group(1)):02d}"
    return "BASE"


def _check(model, arch, expected_of):
    import comfy.lora

    from lycoris_pack.lycoris_core.blocks import architecture_blocks, block_id, detect_architecture

    keys = list(model.diffusion_model.state_dict())
    model_keys = ["diffusion_model." + k for k in keys]
    assert detect_architecture(model_keys) == arch
    ids = architecture_blocks(arch, model_keys)
    expected = {k: expected_of(k) for k in keys}
    present = set(expected.values())
    assert [i for i in ids if not i.startswith("TE")] == ["BASE"] + [i for i in ids if i in present and i != "BASE"]
    assert present <= set(ids)
    wrong = {k: (block_id(mk, arch), expected[k]) for k, mk in zip(keys, model_keys) if block_id(mk, arch) != expected[k]}
    assert not wrong, list(wrong.items())[:5]
    # every LoRA name ComfyUI maps onto this model (ldm, diffusers, kohya spellings) lands in its target's block
    names = 0
    for name, target in comfy.lora.model_lora_keys_unet(model, {}).items():
        target_key = target[0] if isinstance(target, tuple) else target
        want = expected_of(target_key[len("diffusion_model."):])
        assert block_id(name, arch) == want, (name, target_key)
        names += 1
    assert names > 0


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unet_ids_on_comfyui_models(pack, arch):
    import comfy.supported_models as sm

    config_class, unet = (sm.SD15, SD15) if arch == "sd1" else (sm.SDXL, SDXL)
    model = _meta(config_class, unet)
    _check(model, arch, _expected_unet)
    from lycoris_pack.lycoris_core.blocks import architecture_blocks

    n = 12 if arch == "sd1" else 9
    assert architecture_blocks(arch, ["diffusion_model." + k for k in model.diffusion_model.state_dict()]) == (
        ["BASE"] + [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]
        + (["TE"] if arch == "sd1" else ["TE1", "TE2"]))


@pytest.mark.parametrize("arch", sorted(DITS))
def test_dit_ids_on_comfyui_models(pack, arch):
    import comfy.supported_models as sm

    class_name, config = DITS[arch]
    config_class = getattr(sm, class_name, None)
    if config_class is None:
        pytest.skip(f"this ComfyUI has no {class_name} model class")
    model = config() if config is not None else _meta(config_class, config_class.unet_config)
    _check(model, arch, lambda key: _expected_dit(key, arch))
