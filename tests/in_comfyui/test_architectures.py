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
        new_model, report = node.load(patcher, "slices.safetensors", strength, "merge")["result"][:2]
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


# A Wan 2.1 small enough for the CPU, in ComfyUI's own WanModel (dim // num_heads = 128 as in the releases).
TINY_WAN = {"image_model": "wan2.1", "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2, "in_dim": 16,
            "out_dim": 16, "text_len": 8, "text_dim": 32, "freq_dim": 256, "patch_size": (1, 2, 2),
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


def _tiny_wan(variant: str):
    """A ModelPatcher around ComfyUI's WAN21 with TINY_WAN: "t2v" or "i2v" (k_img/v_img/img_emb)."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = (sm.WAN21_I2V(dict(TINY_WAN, model_type="i2v", in_dim=36)) if variant == "i2v"
              else sm.WAN21_T2V(dict(TINY_WAN, model_type="t2v")))
    model = config.get_model({})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _lightx2v_style_file(path, i2v_weights: dict, rank: int = 4):
    """The key set of lightx2v's Wan 2.1 I2V distillation LoRAs, made for `i2v_weights`: LoRA
    (`lora_down`/`lora_up`/`alpha`) with a `diff_b` bias delta on every Linear, `diff` on the norms,
    `diff_m` on each block's and the head's `modulation`. Returns the expected delta per model key."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for key, weight in i2v_weights.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if key.endswith(".modulation"):
            delta = torch.randn(weight.shape, generator=g) * 0.05
            tensors[name[: -len(".modulation")] + ".diff_m"] = delta
            expected[key] = delta
        elif key.endswith(".weight") and weight.dim() == 2 and ".blocks." in key or key in (
                "diffusion_model.head.head.weight", "diffusion_model.img_emb.proj.1.weight"):
            down = torch.randn(rank, weight.shape[1], generator=g) * 0.1
            up = torch.randn(weight.shape[0], rank, generator=g) * 0.1
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(2.0)})
            expected[key] = (2.0 / rank) * up @ down
            bias = torch.randn(weight.shape[0], generator=g) * 0.05
            tensors[f"{name}.diff_b"] = bias
            expected[f"{name}.bias"] = bias
        elif key.endswith(".weight") and weight.dim() == 1 and "norm_" in key:
            delta = torch.randn(weight.shape, generator=g) * 0.05
            tensors[f"{name}.diff"] = delta
            expected[key] = delta
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return expected


def _wan_runtime() -> bool:
    import comfy.supported_models as sm

    return hasattr(sm, "WAN21_T2V")


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_wan_distillation_file_applies_modulation_and_bias_deltas(pack, tmp_path, variant):
    """A lightx2v-style Wan 2.1 I2V file: every `diff_m`, `diff_b` and `diff` lands as ComfyUI computes
    it; on a T2V model the I2V-only layers are "not in this model", not failures. Runtimes without
    Wan (the pinned 2024 one) say instead that nothing matches: "a Wan adapter on an SD1.5 model"."""
    from lycoris_pack.lycoris_core import AdapterFormatError, load_adapter_file
    from lycoris_pack.nodes.patching import apply_adapter_file
    from tiny_models import patched_state_dict, tiny_sd15

    path = tmp_path / "wan21_i2v_lightx2v_style.safetensors"
    if not _wan_runtime():
        from safetensors.torch import save_file

        save_file({"diffusion_model.blocks.0.diff_m": torch.zeros(1, 6, 128),
                   "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 128),
                   "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(128, 4)}, str(path))
        with pytest.raises(AdapterFormatError, match="nothing in this file matches the connected model: "
                                                     "this looks like a Wan adapter"):
            apply_adapter_file(tiny_sd15(), None, load_adapter_file(path), 1.0, 0.0)
        return
    i2v_weights = {k: v.clone() for k, v in _tiny_wan("i2v").model.state_dict().items()}
    expected = _lightx2v_style_file(path, i2v_weights)
    adapter_file = load_adapter_file(path)
    assert adapter_file.unknown_keys == [] and adapter_file.problems == []
    patcher = _tiny_wan(variant)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    strength = 0.7
    patched, _, report = apply_adapter_file(patcher, None, adapter_file, strength, 0.0, "merge")
    coverage = report.coverage
    assert coverage.unmatched == [] and coverage.problems == [] and coverage.duplicates == []
    img_only = [k for k in expected if any(p in k for p in ("k_img", "v_img", "norm_k_img", "img_emb"))]
    assert img_only
    if variant == "t2v":
        assert len(coverage.absent) == len({k.rsplit(".", 1)[0] for k in img_only})
        assert all("I2V-only" in line for line in coverage.absent)
        assert "not in this model (I2V-only / other variant" in report.text(adapter_file, "0.7")
    else:
        assert coverage.absent == []
    weights = patched_state_dict(patched)
    modulation = [k for k in expected if k.endswith(".modulation")]
    assert len(modulation) == TINY_WAN["num_layers"] + 1  # every block's and the head's
    checked = 0
    for key, delta in expected.items():
        if key not in base:
            assert variant == "t2v" and key in img_only
            continue
        want = base[key] + strength * delta.reshape(base[key].shape)
        torch.testing.assert_close(weights[key], want, rtol=1e-5, atol=1e-6, msg=key)
        checked += 1
    assert checked == len(expected) - (len(img_only) if variant == "t2v" else 0)
    untouched = [k for k in base if k not in expected and not torch.equal(weights[k], base[k])]
    assert untouched == []

    # bypass: the LoRAs run beside their layers, the modulation deltas are merged; same output
    bypassed, _, bypass_report = apply_adapter_file(patcher, None, adapter_file, strength, 0.0, "bypass")
    assert bypass_report.bypassed > 0
    # norm layers are merged and said so; a bare parameter has no forward to bypass and is not listed
    assert bypass_report.not_bypassed and all(".norm_" in k for k in bypass_report.not_bypassed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, TINY_WAN["in_dim"] if variant == "t2v" else 36, 1, 4, 4, generator=g)
    context = torch.randn(1, TINY_WAN["text_len"], TINY_WAN["text_dim"], generator=g)
    kwargs = {"clip_fea": torch.randn(1, 257, 1280, generator=g)} if variant == "i2v" else {}
    outputs = []
    for model in (patched, bypassed, patcher):
        model.patch_model()
        try:
            with torch.no_grad():
                outputs.append(model.model.diffusion_model(x, torch.tensor([500.0]), context, **kwargs))
        finally:
            model.unpatch_model()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)
