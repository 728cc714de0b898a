"""Every trainer's names on every architecture: each adaptable layer of ComfyUI's own full-size
model (meta device), named as each trainer names it, must land on the weight and row slice that
diffusers' single-file converters say the diffusers module comes from (tests/in_comfyui/diffusers_truth.py).

Dialects (field-2026.md section 3; no real files here: each is built from the trainer's naming as
published): SimpleTuner/LyCORIS `lycoris_` + diffusers path with underscores (LoRA, LoHa, LoKr with
whole w2; `lycoris_config` and `trained_words` in the header); diffusers/PEFT `transformer.` +
`lora_A/lora_B` with alpha only in `lora_adapter_metadata`; ai-toolkit `diffusion_model.` + diffusers
path (LoKr); raw PEFT `base_model.model.`; OneTrainer legacy `lora_transformer_` and its OFT_2
(`oft_R.weight` + `oft_R.scaled_oft`); musubi-tuner `lora_unet_` + the released checkpoint's names
(LoHa, LoKr) or diffusers names (its Z-Image and FramePack layouts); diffusion-pipe `transformer.` +
checkpoint names; ComfyUI's trainer `diffusion_model.` + ComfyUI's names with a bf16 alpha and no
metadata. These architectures exist only in recent runtimes: on the pinned March-2024 ComfyUI only
SD1.5/SDXL run, the others are skipped naming the missing model class.
"""

from __future__ import annotations

import types

import pytest

from diffusers_truth import NO_CONVERTER, SIGNATURES, UNETS, comfy_model, diffusers_truth, original_names

DIFFUSERS_DIALECTS = {
    "simpletuner lycoris": lambda name: "lycoris_" + name.replace(".", "_"),
    "diffusers/peft": lambda name: "transformer." + name,
    "ai-toolkit": lambda name: "diffusion_model." + name,
    "peft raw": lambda name: "base_model.model." + name,
    "onetrainer legacy": lambda name: "lora_transformer_" + name.replace(".", "_"),
    "musubi (diffusers names: Z-Image, FramePack)": lambda name: "lora_unet_" + name.replace(".", "_"),
}
# (ComfyUI key, released checkpoint key) -> module name
# SD1.x/SDXL files name the diffusers UNet (kohya writes diffusers names too)
UNET_DIALECTS = {
    "kohya": lambda name: "lora_unet_" + name.replace(".", "_"),
    "lycoris standalone": lambda name: "lycoris_" + name.replace(".", "_"),
    "diffusers": lambda name: "unet." + name,
    "peft raw": lambda name: "base_model.model." + name,
}
CHECKPOINT_DIALECTS = {
    "kohya/musubi (checkpoint names)": lambda key, original: "lora_unet_" + original.replace(".", "_"),
    "diffusion-pipe (checkpoint names)": lambda key, original: "transformer." + original,
    "kohya (ComfyUI names)": lambda key, original: "lora_unet_" + key.replace(".", "_"),
    "comfyui trainer": lambda key, original: "diffusion_model." + key,
}


@pytest.fixture(scope="module")
def built(comfy_root):
    """arch -> (model, truth, key map), built once per module."""
    from lycoris_pack.nodes.key_map import build_key_map

    cache = {}

    def get(arch):
        if arch not in cache:
            try:
                model = comfy_model(arch)
            except LookupError as error:
                pytest.skip(str(error))
            truth = {} if arch in NO_CONVERTER else diffusers_truth(arch, model)
            cache[arch] = (model, truth, build_key_map(types.SimpleNamespace(model=model)))
        return cache[arch]

    return get


def _first(items, n=5):
    return items[:n] + ([f"... {len(items)} in all"] if len(items) > n else [])


@pytest.mark.parametrize("arch", sorted(set(SIGNATURES) - NO_CONVERTER) + sorted(UNETS))
def test_every_diffusers_module_lands_on_its_weight_and_rows(pack, built, arch):
    from lycoris_pack.nodes.key_map import resolve

    model, truth, key_map = built(arch)
    reordered = sorted(name for name, target in truth.items() if target[1:] == ("rows reordered",))
    mapped = {name: target for name, target in truth.items() if name not in reordered}
    assert len(mapped) >= 100
    wrong = {}
    for dialect, write in (UNET_DIALECTS if arch in UNETS else DIFFUSERS_DIALECTS).items():
        misses = [f"{name} -> {resolve(write(name), key_map)}, want {target}" for name, target in mapped.items()
                  if resolve(write(name), key_map) != target]
        if misses:
            wrong[dialect] = _first(misses)
    assert not wrong, wrong
    # a scale/shift swap is no row slice: those modules stay unmatched, so the report names them
    # (HunyuanVideo's norm_out.linear); ComfyUI's own Flux-family entries carry a function instead.
    for name in reordered:
        target = resolve(f"transformer.{name}", key_map)
        assert target is None or (isinstance(target, tuple) and len(target) == 3 and callable(target[2])), name


@pytest.mark.parametrize("arch", sorted(SIGNATURES) + sorted(UNETS))
def test_every_checkpoint_layer_lands_on_itself(pack, built, arch):
    from lycoris_pack.nodes.key_map import resolve

    model, _, key_map = built(arch)
    originals = original_names(arch, model)
    layers = {k[: -len(".weight")]: originals[k][: -len(".weight")]
              for k, v in model.diffusion_model.state_dict().items() if k.endswith(".weight") and v.dim() >= 2}
    wrong = {}
    for dialect, write in CHECKPOINT_DIALECTS.items():
        misses = [write(key, original) for key, original in layers.items()
                  if resolve(write(key, original), key_map) != f"diffusion_model.{key}.weight"]
        if misses:
            wrong[dialect] = _first(misses)
    assert not wrong, wrong


# Releases diffusers has no single-file converter for, with its model class at the release's defaults:
# HunyuanVideo 1.5 (its conversion script, scripts/convert_hunyuan_video1_5_to_diffusers.py, names the
# same modules as 1.0's converter), Qwen-Image (diffusers' names are the checkpoint's).
DIFFUSERS_CLASSES = {"hunyuan_video15": "HunyuanVideo15Transformer3DModel", "qwen_image": "QwenImageTransformer2DModel"}


@pytest.mark.parametrize("arch", sorted(DIFFUSERS_CLASSES))
def test_diffusers_class_modules_land_on_weights_of_their_shape(pack, built, arch):
    """Every Linear/Conv module of diffusers' own class, in every dialect, lands on a ComfyUI
    weight (or row slice) of exactly its shape (`norm_out.linear`, whose halves are swapped, aside)."""
    import diffusers
    import torch

    from lycoris_pack.nodes.key_map import resolve

    model, _, key_map = built(arch)
    weights = model.diffusion_model.state_dict()
    with torch.device("meta"):
        reference = getattr(diffusers, DIFFUSERS_CLASSES[arch])()
    layers = {name: tuple(module.weight.shape) for name, module in reference.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and name != "norm_out.linear"}
    assert len(layers) > 500
    wrong = {}
    for dialect, write in DIFFUSERS_DIALECTS.items():
        misses = []
        for name, shape in layers.items():
            target = resolve(write(name), key_map)
            if target is None:
                misses.append(f"{name}: no target")
                continue
            key, rows = (target, None) if isinstance(target, str) else target[:2]
            got = tuple(weights[key[len("diffusion_model."):]].shape)
            got = got if rows is None else (rows[2],) + got[1:]
            if got != shape:
                misses.append(f"{name}: {target} has shape {got}, the module {shape}")
        if misses:
            wrong[dialect] = _first(misses)
    assert not wrong, wrong


def test_hunyuan_video_15_separate_qkv_land_on_the_fused_rows_in_order(pack, built):
    """The 1.5 release keeps q, k and v apart (musubi-tuner writes those names); ComfyUI fuses them."""
    from lycoris_pack.nodes.key_map import resolve

    _, _, key_map = built("hunyuan_video15")
    qkv = "diffusion_model.double_blocks.3.{}_attn.qkv.weight"
    for stream in ("img", "txt"):
        starts = [resolve(f"lora_unet_double_blocks_3_{stream}_attn_{p}", key_map) for p in "qkv"]
        assert starts == [(qkv.format(stream), (0, i * 2048, 2048)) for i in range(3)], starts


# -- whole files, through the loader node -------------------------------------------------------
def _divisor_near_sqrt(n: int) -> int:
    return max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)


def _factors(algo: str, rows: int, shape: tuple, generator, half=None):
    """Tiny tensors of `algo` for a layer of `rows` output rows and weight shape `shape`."""
    import torch

    r = lambda *s: torch.randn(*s, generator=generator) * 0.01  # noqa: E731
    inputs, kernel = shape[1], tuple(shape[2:])
    if algo == "lora" or kernel:  # LoHa/LoKr only on Linear layers here
        return {"lora_up.weight": r(rows, 1, *([1] * len(kernel))), "lora_down.weight": r(1, inputs, *kernel),
                "alpha": torch.tensor(1.0, dtype=half or torch.float32)}
    if algo == "oft":  # OneTrainer OFT_2, scaled: 4x4 blocks tiling the input features
        return {"oft_R.weight": r(inputs // 4, 6), "oft_R.scaled_oft": torch.tensor(True)}
    if algo == "loha":
        return {"hada_w1_a": r(rows, 1), "hada_w1_b": r(1, inputs), "hada_w2_a": r(rows, 1), "hada_w2_b": r(1, inputs),
                "alpha": torch.tensor(1.0)}
    a, b = _divisor_near_sqrt(rows), _divisor_near_sqrt(inputs)  # whole w1 and w2 (SimpleTuner's full_matrix)
    return {"lokr_w1": r(a, b), "lokr_w2": r(rows // a, inputs // b), "alpha": torch.tensor(1.0)}


def _peft(rows: int, shape: tuple, generator):
    import torch

    return {"lora_A.weight": torch.randn(1, *shape[1:], generator=generator) * 0.01,
            "lora_B.weight": torch.randn(rows, 1, *([1] * (len(shape) - 2)), generator=generator) * 0.01}


# name of the file's module, from (diffusers name, ComfyUI key, checkpoint key) -> its tensors
TRAINER_FILES = {
    "simpletuner lokr (full w2)": ("diffusers", lambda d, c, o: "lycoris_" + d.replace(".", "_"), "lokr",
                                   {"lycoris_config": '{"algo": "lokr", "factor": 16, "full_matrix": true}',
                                    "trained_words": "ohwx person, studio photo"}),
    "simpletuner loha": ("diffusers", lambda d, c, o: "lycoris_" + d.replace(".", "_"), "loha", {}),
    "simpletuner lora": ("diffusers", lambda d, c, o: "lycoris_" + d.replace(".", "_"), "lora", {}),
    "onetrainer oft_2 (scaled)": ("diffusers", lambda d, c, o: "transformer." + d, "oft", {}),
    "diffusers/peft, alpha in lora_adapter_metadata": (
        "diffusers", lambda d, c, o: "transformer." + d, "peft",
        {"lora_adapter_metadata": '{"transformer.r": 1, "transformer.lora_alpha": 2}'}),
    "ai-toolkit lokr": ("diffusers", lambda d, c, o: "diffusion_model." + d, "lokr", {}),
    "musubi loha (checkpoint names)": ("checkpoint", lambda d, c, o: "lora_unet_" + o.replace(".", "_"), "loha", {}),
    "musubi lokr (checkpoint names)": ("checkpoint", lambda d, c, o: "lora_unet_" + o.replace(".", "_"), "lokr", {}),
    "comfyui trainer (bf16 alpha, no metadata)": ("checkpoint", lambda d, c, o: "diffusion_model." + c, "lora_bf16", {}),
}
# one release per family the pack's tables serve (every release's names are checked module by module above)
FILE_ARCHS = ("wan21_i2v_14b", "wan21_vace_14b", "hunyuan_video", "lumina2", "cosmos_predict2_2b",
              "chroma")


@pytest.mark.parametrize("arch", FILE_ARCHS)
def test_trainer_files_patch_every_layer_on_its_rows(pack, built, arch, tmp_path):
    import comfy.model_patcher
    import torch
    from safetensors.torch import save_file

    from comfyui_runtime import use_loras_folder

    model, truth, _ = built(arch)
    weights = model.diffusion_model.state_dict()
    originals = original_names(arch, model)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    use_loras_folder(tmp_path)
    generator = torch.Generator().manual_seed(0)
    by_diffusers = {d: t for d, t in truth.items() if t[1:] != ("rows reordered",)}
    by_checkpoint = {k[: -len(".weight")]: "diffusion_model." + k for k, v in weights.items()
                     if k.endswith(".weight") and v.dim() >= 2}
    for label, (names, write, algo, metadata) in TRAINER_FILES.items():
        tensors, expected = {}, []
        layers = by_diffusers if names == "diffusers" else by_checkpoint
        for name, target in layers.items():
            key, offset = (target, None) if isinstance(target, str) else target
            shape = tuple(weights[key[len("diffusion_model."):]].shape)
            rows = shape[0] if offset is None else offset[2]
            comfy_key = key[len("diffusion_model."):-len(".weight")]
            module = write(name, comfy_key, originals[comfy_key + ".weight"][: -len(".weight")])
            parts = (_peft(rows, shape, generator) if algo == "peft" else
                     _factors("lora" if algo == "lora_bf16" else algo, rows, shape, generator,
                              half=torch.bfloat16 if algo == "lora_bf16" else None))
            tensors.update({f"{module}.{suffix}": t for suffix, t in parts.items()})
            expected.append((key, offset))
        file_name = f"{arch}-{algo}-{names}.safetensors"
        save_file(tensors, str(tmp_path / file_name), metadata=metadata)
        out = node.load(patcher, file_name, 1.0, "merge")
        new_model, report = out["result"][:2]
        assert out["ui"]["text"] == [report]
        assert f"{len(expected)}/{len(expected)} modules matched, 0 unmatched, 0 keys not understood, " \
               "0 modules with errors, 0 duplicates" in report, (label, report)
        landed = sorted((key, None if p[3] is None else tuple(p[3])) for key, ps in new_model.patches.items()
                        for p in ps)
        assert landed == sorted((k, o) for k, o in expected), label
        if "lycoris_config" in metadata:
            assert 'LyCORIS config: algo="lokr", factor=16, full_matrix=true' in report, report
            assert "trained words: ohwx person, studio photo" in report, report
        if "lora_adapter_metadata" in metadata:
            assert "r=1, lora_alpha=2" in report, report


def test_duplicates_are_reported_with_the_module_applied(pack, built, tmp_path):
    """Two dialects of one layer, and a fused weight with one of its slices: the first module in
    the file (safetensors keeps keys sorted) is applied, the other reported as a duplicate naming it
    (node text and /history ui)."""
    import comfy.model_patcher
    import torch
    from safetensors.torch import save_file

    from comfyui_runtime import use_loras_folder

    model, _, _ = built("hunyuan_video")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for module, rows, inputs in (("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072),
                                 ("transformer.transformer_blocks.0.attn.to_q", 3072, 3072),
                                 ("transformer.transformer_blocks.1.attn.to_out.0", 3072, 3072),
                                 ("lycoris_transformer_blocks_1_attn_to_out_0", 3072, 3072),
                                 ("lycoris_no_such_layer", 8, 8)):
        tensors[f"{module}.lora_up.weight"] = torch.randn(rows, 1, generator=generator)
        tensors[f"{module}.lora_down.weight"] = torch.randn(1, inputs, generator=generator)
    tensors["transformer.transformer_blocks.1.attn.to_out.0.mystery"] = torch.zeros(1)
    use_loras_folder(tmp_path)
    save_file(tensors, str(tmp_path / "dup.safetensors"))
    out = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]().load(patcher, "dup.safetensors", 1.0, "merge")
    new_model, report = out["result"][:2]
    assert out["ui"]["text"] == [report]
    assert "2/5 modules matched, 1 unmatched, 1 keys not understood, 0 modules with errors, 2 duplicates" in report
    lines = report.splitlines()
    groups = [line.strip() for line in lines if line.startswith("  ") and line.endswith(":")]
    assert groups == ["not in this model (no layer of that name) (1):", "duplicate: a layer or rows another module already patches (2):",
                      "keys not understood (1):"], report
    assert ("    transformer.transformer_blocks.0.attn.to_q: diffusion_model.double_blocks.0.img_attn.qkv.weight rows "
            "0:3072 is already patched by lora_unet_double_blocks_0_img_attn_qkv (applied); this one left out") in lines
    assert ("    transformer.transformer_blocks.1.attn.to_out.0: diffusion_model.double_blocks.1.img_attn.proj.weight is "
            "already patched by lycoris_transformer_blocks_1_attn_to_out_0 (applied); this one left out") in lines
    assert sorted(new_model.patches) == ["diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                         "diffusion_model.double_blocks.1.img_attn.proj.weight"]
    assert all(len(p) == 1 for p in new_model.patches.values())


def test_reordered_rows_are_merged_even_in_bypass(pack, built, tmp_path):
    """ComfyUI maps Flux's `norm_out.linear` with a row-reordering function (scale/shift swapped);
    a forward-time bypass would skip it, so the pack merges that layer in bypass mode too."""
    import comfy.model_patcher
    import torch
    from safetensors.torch import save_file

    from comfyui_runtime import use_loras_folder

    model, _, _ = built("flux1_dev")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    tensors = {"transformer.norm_out.linear.lora_A.weight": torch.ones(1, 3072),
               "transformer.norm_out.linear.lora_B.weight": torch.ones(6144, 1),
               "transformer.proj_out.lora_A.weight": torch.ones(1, 3072),
               "transformer.proj_out.lora_B.weight": torch.ones(64, 1)}
    use_loras_folder(tmp_path)
    save_file(tensors, str(tmp_path / "norm_out.safetensors"))
    new_model, report = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]().load(
        patcher, "norm_out.safetensors", 1.0, "bypass")["result"][:2]
    assert "2/2 modules matched" in report and "bypass: 1 layers" in report, report
    (patch,) = new_model.patches["diffusion_model.final_layer.adaLN_modulation.1.weight"]
    assert callable(patch[4]) and patch[4].__name__ == "swap_scale_shift"
    from lycoris_pack.nodes.bypass import bypassed_layers

    assert list(bypassed_layers(new_model)) == ["diffusion_model.final_layer.linear"]
    assert "1 layers cannot be bypassed" in report and "final_layer.adaLN_modulation.1.weight" in report, report


def test_lumina2_gqa_slices_patch_their_rows_through_comfyui(pack, tmp_path):
    """Lumina 2's fused qkv is q (2304 rows) | k (768) | v (768): one algorithm per slice, in
    SimpleTuner's names, patched by ComfyUI's own calculate_weight on the full-size layer (made
    real for this one weight); the rows each adapter computes on its slice, nothing else."""
    import comfy.model_patcher
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    from comfyui_runtime import use_loras_folder
    from lycoris_pack.lycoris_core import decode_tensors
    from lycoris_pack.nodes.weights import patched_weight

    try:
        model = comfy_model("lumina2")
    except LookupError as error:
        pytest.skip(str(error))
    key = "diffusion_model.layers.0.attention.qkv.weight"
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3840, 2304, generator=g) * 0.05
    comfy.utils.set_attr_param(model, key, base.clone())
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    tensors = {"lycoris_layers_0_attn_to_q.lokr_w1": r(48, 48), "lycoris_layers_0_attn_to_q.lokr_w2": r(48, 48),
               "lycoris_layers_0_attn_to_k.lora_up.weight": r(768, 2), "lycoris_layers_0_attn_to_k.lora_down.weight": r(2, 2304),
               "lycoris_layers_0_attn_to_k.alpha": torch.tensor(1.0)}
    for j in "12":
        tensors[f"lycoris_layers_0_attn_to_v.hada_w{j}_a"] = r(768, 2)
        tensors[f"lycoris_layers_0_attn_to_v.hada_w{j}_b"] = r(2, 2304)
    use_loras_folder(tmp_path)
    save_file(tensors, str(tmp_path / "gqa.safetensors"))
    new_model, report = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]().load(
        patcher, "gqa.safetensors", 0.8, "merge")["result"][:2]
    assert "3/3 modules matched" in report, report
    patched = patched_weight(new_model, key)
    adapters = decode_tensors(tensors).adapters
    for name, rows in (("to_q", slice(0, 2304)), ("to_k", slice(2304, 3072)), ("to_v", slice(3072, 3840))):
        expected, _ = adapters[f"lycoris_layers_0_attn_{name}"].patch(base[rows], 0.8)
        torch.testing.assert_close(patched[rows], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(patched[rows], base[rows])
