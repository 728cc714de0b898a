"""Key maps on full-size architectures (meta device) and fused-weight slices (tiny Flux).

Every dialect of DESIGN.md section 3 must map 100% of a model's adaptable layers, on each
architecture the running ComfyUI has. Flux exists only in recent runtimes: its tests are
skipped (reported as skipped) on the pinned March-2024 one. Flux models are built from a diffusers
state dict through ComfyUI's own conversion and detection, so no parameter list is written here.
"""

from __future__ import annotations

import types

import pytest
import torch

SD15 = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "num_head_channels": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
}
SDXL = dict(SD15, **{
    "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
})


def _meta_model(config_class, unet_config):
    with torch.device("meta"):
        return config_class(dict(unet_config)).get_model({}, device=torch.device("meta"))


def meta_flux():
    """Flux.1-dev at its released size, on the meta device, as ComfyUI detects it."""
    from diffusers import FluxTransformer2DModel

    from tiny_models import meta_model_from_diffusers

    return meta_model_from_diffusers(FluxTransformer2DModel, guidance_embeds=True)


def _dialects(name: str, arch: str):
    """The same module under each trainer's naming (name: a diffusers-style dotted path)."""
    flat = name.replace(".", "_")
    if arch == "flux":
        return {"diffusers/peft": f"transformer.{name}", "simpletuner lycoris": f"lycoris_{flat}",
                "onetrainer": f"lora_transformer_{flat}"}
    return {"kohya": f"lora_unet_{flat}", "lycoris standalone": f"lycoris_{flat}",
            "peft": f"base_model.model.{name}", "diffusers": f"unet.{name}"}


def _architectures():
    import comfy.supported_models as sm

    found = {"sd15": lambda: _meta_model(sm.SD15, SD15), "sdxl": lambda: _meta_model(sm.SDXL, SDXL)}
    if hasattr(sm, "Flux"):
        found["flux"] = meta_flux
    return found


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_every_dialect_maps_every_layer(pack, arch):
    import comfy.utils

    from lycoris_pack.nodes.key_map import build_key_map, resolve

    architectures = _architectures()
    if arch not in architectures:
        pytest.skip(f"this ComfyUI has no {arch} model class")
    model = architectures[arch]()
    key_map = build_key_map(types.SimpleNamespace(model=model))
    weights = {k: v for k, v in model.state_dict().items()}
    if arch == "flux":
        diffusers = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
    else:
        diffusers = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
        diffusers = {k: "diffusion_model." + v for k, v in diffusers.items()}
    adaptable = {}
    for name, target in diffusers.items():
        key = target if isinstance(target, str) else target[0]
        if name.endswith(".weight") and key in weights and weights[key].dim() in (2, 4):
            adaptable[name[: -len(".weight")]] = target
    assert len(adaptable) > 50
    # the model's own layer names, as kohya writes them for DiT/ldm keys
    ldm = {f"lora_unet_{k[len('diffusion_model.'):-len('.weight')].replace('.', '_')}": k
           for k, v in weights.items() if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() in (2, 4)}
    missing = {}
    for dialect in _dialects("x", arch):
        misses = [n for n, target in adaptable.items() if resolve(_dialects(n, arch)[dialect], key_map) != target]
        if misses:
            missing[dialect] = misses[:5] + [f"... {len(misses)} of {len(adaptable)}"]
    misses = [n for n, k in ldm.items() if resolve(n, key_map) != k]
    if misses:
        missing["kohya ldm names"] = misses[:5] + [f"... {len(misses)} of {len(ldm)}"]
    assert not missing, missing


def _slice_adapters(rank=2, hidden=256, mlp=1024):
    """One algorithm per slice of the fused weights, in SimpleTuner's `lycoris_` naming."""
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    t = {}
    q = "lycoris_transformer_blocks_0_attn_to_q"
    t.update({f"{q}.lora_up.weight": r(hidden, rank), f"{q}.lora_down.weight": r(rank, hidden),
              f"{q}.alpha": torch.tensor(1.0)})
    k = "lycoris_transformer_blocks_0_attn_to_k"
    for j in "12":
        t[f"{k}.hada_w{j}_a"], t[f"{k}.hada_w{j}_b"] = r(hidden, rank), r(rank, hidden)
    t[f"{k}.alpha"] = torch.tensor(1.0)
    v = "lycoris_transformer_blocks_0_attn_to_v"
    t.update({f"{v}.lokr_w1": r(4, 4), f"{v}.lokr_w2_a": r(hidden // 4, rank), f"{v}.lokr_w2_b": r(rank, hidden // 4),
              f"{v}.alpha": torch.tensor(1.0)})
    p = "lycoris_single_transformer_blocks_0_proj_mlp"
    t.update({f"{p}.lora_up.weight": r(mlp, rank), f"{p}.lora_down.weight": r(rank, hidden),
              f"{p}.alpha": torch.tensor(2.0), f"{p}.dora_scale": r(mlp, 1).abs() + 1.0})
    return t


def test_every_algorithm_lands_on_its_slice_of_a_fused_weight(pack, tmp_path):
    import comfy.supported_models as sm
    from safetensors.torch import save_file

    from comfyui_runtime import use_loras_folder
    from lycoris_pack.lycoris_core import decode_tensors
    from tiny_models import patched_state_dict, tiny_flux

    if not hasattr(sm, "Flux"):
        pytest.skip("this ComfyUI has no Flux model class")
    patcher = tiny_flux(tmp_path / "diffusion_models")
    model = patcher.model
    tensors = _slice_adapters()
    use_loras_folder(tmp_path)
    save_file(tensors, str(tmp_path / "slices.safetensors"))
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    for strength in (1.0, 0.6):
        new_model, report = node.load(patcher, "slices.safetensors", strength, "merge")["result"]
        assert "4/4 modules matched" in report, report
        patched = patched_state_dict(new_model)
        base = model.state_dict()
        adapters = decode_tensors(tensors).adapters
        qkv, linear1 = "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight"
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            rows = slice(256 * i, 256 * (i + 1))
            expected, _ = adapters[f"lycoris_transformer_blocks_0_attn_{name}"].patch(base[qkv][rows], strength)
            torch.testing.assert_close(patched[qkv][rows], expected, rtol=1e-5, atol=1e-6)
        mlp_rows = slice(3 * 256, 3 * 256 + 1024)
        expected, _ = adapters["lycoris_single_transformer_blocks_0_proj_mlp"].patch(base[linear1][mlp_rows], strength)
        torch.testing.assert_close(patched[linear1][mlp_rows], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(patched[linear1][: 3 * 256], base[linear1][: 3 * 256])  # the qkv part untouched
