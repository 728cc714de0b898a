"""LyCORIS Block Weight on a real ComfyUI: Inspire presets applied through the loaders give the
trainer's own output at each block's scaled strength (lycoris-lora as the oracle), in merge and
bypass modes; a block at 0 stays bit-identical; user preset files are read as they are."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tiny_models import TINY_UNET, _randomise, lycoris_file, patched_state_dict, unet_output

# the SD1 UNet layout (12 input blocks, 2 res blocks per level), with tiny channels
SD1_LAYOUT = dict(TINY_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], model_channels=32)
# Inspire-Pack's vector layouts: which block each position of a preset vector sets
INSPIRE_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
INSPIRE_27 = ["BASE"] + [f"IN{i:02d}" for i in range(1, 12)] + ["MID0", "M00", "MID2"] + [f"OUT{i:02d}" for i in range(12)]


def sd1_model(seed: int = 0):
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SD15(dict(SD1_LAYOUT)).get_model({})
    _randomise(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def block_of(module_path: str) -> str:
    """The SD1 block of a UNet module path, read from ldm's layout (independent of the pack)."""
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", module_path)
    if m:
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
    return "M00" if module_path.startswith("middle_block.") else "BASE"


def preset_weights(name: str) -> dict[str, float]:
    from lycoris_pack.lycoris_core.block_weights import shipped_presets

    values = [float(v) for v in shipped_presets()[name].split(",")]
    layout = {17: INSPIRE_17, 27: INSPIRE_27}[len(values)]
    return dict(zip(layout, values))


@pytest.fixture(scope="module")
def setup(pack, tmp_path_factory):
    from comfyui_runtime import use_loras_folder
    from lycoris_pack.nodes import cache

    folder = tmp_path_factory.mktemp("bw_loras")
    use_loras_folder(folder)
    cache.clear()
    model = sd1_model()
    path = folder / "attn_loha.safetensors"
    # the transformer blocks only: what a LoRA trains, and what Inspire's 17-value vectors were made for
    net, wrapped = lycoris_file(model.model.diffusion_model, path, "lora_unet_", "loha",
                                target_module=["SpatialTransformer"])
    return model, path, net, wrapped


@pytest.mark.parametrize("preset", ["SD-INALL", "SD-MIDD0.2", "SD-MOUT", "SD-LyC-OUTALL", "SD-ALL0.5"])
def test_inspire_presets_scale_each_block_like_the_trainer(pack, setup, preset):
    model, path, net, wrapped = setup
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    text, report = node.run(preset, "", "auto", model)["result"]
    assert f"preset {preset}" in report, report
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    patched, _ = loader.load(model, path.name, 1.0, "merge", block_weights=text)["result"][:2]
    weights = patched_state_dict(patched)
    base = model.model.state_dict()
    expected = preset_weights(preset)
    g = torch.Generator().manual_seed(1)
    blocks_seen = set()
    for lora in net.loras:
        layer = lora.org_module[0]
        name = next(n for n, m in wrapped.named_modules() if m is layer)
        block = block_of(name)
        blocks_seen.add(block)
        key = f"diffusion_model.{name}.weight"
        w = expected[block]
        if w == 0.0:
            assert torch.equal(weights[key], base[key]), (preset, key)  # a block at 0 stays bit-identical
            continue
        lora.multiplier = w  # the trainer's own forward at this block's strength
        x = torch.randn(3, layer.in_features, generator=g) if isinstance(layer, torch.nn.Linear) else \
            torch.randn(1, layer.in_channels, 4, 4, generator=g)
        run = (lambda wt: F.linear(x, wt, layer.bias)) if isinstance(layer, torch.nn.Linear) else \
            (lambda wt: F.conv2d(x, wt, layer.bias, layer.stride, layer.padding))
        with torch.no_grad():
            truth = lora(x)
            error = (run(weights[key]) - truth).norm() / (truth - run(base[key])).norm()
        assert float(error) < 1e-4, (preset, key, float(error))
    assert blocks_seen == set(INSPIRE_17) - {"BASE"}, blocks_seen  # the file covers every block of the 17 layout


def test_bypass_mode_uses_the_same_block_weights(pack, setup):
    model, path, _, _ = setup
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    text, _ = node.run("SD-OUTALL", "", "auto", model)["result"]
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    merged, _ = loader.load(model, path.name, 1.0, "merge", block_weights=text)["result"][:2]
    bypassed, _ = loader.load(model, path.name, 1.0, "bypass", block_weights=text)["result"][:2]
    from lycoris_pack.nodes.bypass import bypassed_layers

    layers = bypassed_layers(bypassed)
    assert layers and not any(".input_blocks." in k or ".middle_block." in k for k in layers)
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 5, 64)
    outputs = [unet_output(patcher, x, t, context) for patcher in (merged, bypassed)]
    assert float((outputs[0] - outputs[1]).norm() / outputs[0].norm()) < 1e-5


def test_node_output_reads_back_and_errors_name_the_ids(pack, setup):
    from lycoris_pack.lycoris_core.block_weights import parse_block_weights
    from lycoris_pack.lycoris_core.blocks import architecture_blocks

    model, _, _, _ = setup
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    text, _ = node.run("none", "1,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1", "auto", model)["result"]
    again = parse_block_weights(text, "sd1", architecture_blocks("sd1"))
    assert again.weight("IN04") == 0.0 and again.weight("M00") == 0.5 and again.weight("OUT05") == 1.0
    assert node.run("none", "", "auto", model)["result"][0] == "BASE=1, IN00-IN11=1, M00=1, OUT00-OUT11=1, TE=1"
    with pytest.raises(ValueError, match=r"LyCORIS Block Weight: .*17.*IN01"):
        node.run("none", "1,0,1", "auto", model)
    with pytest.raises(ValueError, match="connect a model or choose the architecture"):
        node.run("SD-ALL", "", "auto", None)
    flux, _ = node.run("FLUX-DBL-FRONT7", "", "flux", None)["result"]  # no model: the architecture input
    flux_weights = parse_block_weights(flux, "flux", architecture_blocks("flux"))
    assert flux_weights.weight("D06") == 1.0 and flux_weights.weight("D07") == 0.0


def test_user_preset_files_are_read_as_they_are(pack, setup, tmp_path, monkeypatch):
    from lycoris_pack.nodes import presets

    model, _, _, _ = setup
    monkeypatch.setattr(presets, "USER_PRESET_DIR", str(tmp_path))
    (tmp_path / "lbw-preset.custom.txt").write_text(  # Inspire's example custom file format
        "SD-FACE:1,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0\n@SD-TEST:17,12,1\nMINE:OUT*=0, IN04=0.25\n")
    types = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"].INPUT_TYPES()
    assert {"SD-FACE", "MINE", "SD-ALL", "SDXL-ALL", "FLUX-ALL"} <= set(types["required"]["preset"][0])
    assert "@SD-TEST" not in types["required"]["preset"][0]
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    text, report = node.run("SD-FACE", "", "auto", model)["result"]
    assert "M00=0" in text and "OUT03-OUT05=1" in text and "OUT06-OUT11=0" in text, text
    text, _ = node.run("none", "MINE", "auto", model)["result"]
    assert "IN04=0.25" in text and "OUT00-OUT11=0" in text, text


def test_inspire_parameters_seed_a_b_inverse(pack, setup):
    """SD-AB (A,B,B,...,A) reads with the node's A and B; inverse gives 1 - w; R is drawn per seed."""
    from lycoris_pack.lycoris_core.block_weights import parse_block_weights
    from lycoris_pack.lycoris_core.blocks import architecture_blocks

    model, _, _, _ = setup
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    ids = architecture_blocks("sd1")

    def weights(**kwargs):
        text = node.run("none", kwargs.pop("text", "SD-AB"), "auto", model, **kwargs)["result"][0]
        return parse_block_weights(text, "sd1", ids)

    ab = weights(A=0.3, B=0.7)
    assert ab.weight("BASE") == pytest.approx(0.3) and ab.weight("IN01") == pytest.approx(0.7)
    assert ab.weight("OUT07") == pytest.approx(0.3)
    inverse = weights(A=0.3, B=0.7, inverse=True)
    assert inverse.weight("BASE") == pytest.approx(0.7) and inverse.weight("IN01") == pytest.approx(0.3)
    first, again, other = (weights(text="SD-ROUT", seed=s) for s in (5, 5, 6))
    assert first.weight("OUT05") == again.weight("OUT05") != other.weight("OUT05")
    assert 0.0 <= first.weight("OUT05") < 3.0 and first.weight("IN01") == 1.0


def test_block_weight_inputs_show_an_example(pack):
    """Every block-weight text box (Block Weight's `weights`, each node's `block_weights`) carries a
    placeholder with a named example, which both front ends show in an empty multiline box."""
    boxes = []
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for group in cls.INPUT_TYPES().values():
            for input_name, spec in group.items():
                if input_name == "block_weights" or (name == "LycorisBlockWeight" and input_name == "weights"):
                    boxes.append((name, input_name, spec[1]))
    assert {n for n, _, _ in boxes} >= {"LycorisBlockWeight", "LycorisLoader", "LycorisLoaderModelOnly"}
    for name, input_name, options in boxes:
        assert options.get("multiline") and "IN04=0.5" in options.get("placeholder", ""), (name, input_name)


def test_typing_mistakes_and_other_architectures(pack, setup, caplog):
    model, path, _, _ = setup
    node = pack.NODE_CLASS_MAPPINGS["LycorisBlockWeight"]()
    with pytest.raises(ValueError, match=r"did you mean IN04=0\.5\?"):
        node.run("none", "IN04:0.5", "auto", model)
    with pytest.raises(ValueError, match=r"did you mean IN04=0\.5, OUT03=0\?"):
        node.run("none", "IN04=0.5, OUT03 0", "auto", model)
    sdxl_vector = "1,0,0,0,0,1,1,1,1,1,1,1"  # sd-webui LBW's SDXL 12 on this SD1 model
    with caplog.at_level("WARNING"):
        _, report = node.run("none", sdxl_vector, "auto", model)["result"]
    assert "warning: 12 values is sd-webui LBW's SDXL layout, but this model is sd1" in report, report
    assert any("SDXL layout" in record.getMessage() for record in caplog.records)
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    _, text = loader.load(model, path.name, 1.0, "merge", sdxl_vector)["result"][:2]
    assert "SDXL layout, but this model is sd1" in text, text
