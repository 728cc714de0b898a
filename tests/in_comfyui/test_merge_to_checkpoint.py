"""Merge LyCORIS to checkpoint: adapters baked into a checkpoint file from the checkpoints folder,
names mapped with ComfyUI's key map (diffusers and ldm kohya names, the text encoder)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture
def folders(pack, tmp_path):
    """(checkpoints folder with a tiny SD1 `base.safetensors`, empty loras folder, the checkpoint's
    shapes), both folders in use by ComfyUI."""
    from comfyui_runtime import use_checkpoints_folder, use_loras_folder
    from e2e import make_models

    checkpoints, loras = tmp_path / "checkpoints", tmp_path / "loras"
    loras.mkdir()
    with torch.inference_mode():
        make_models.write_checkpoint(checkpoints / "base.safetensors")
        shapes = make_models.weight_shapes()
    use_checkpoints_folder(checkpoints)
    use_loras_folder(loras)
    return checkpoints, loras, shapes


def test_merge_to_checkpoint_bakes_every_module(pack, folders, tmp_path):
    from e2e import make_models
    from lycoris_pack.lycoris_core import decode_tensors

    checkpoints, loras, shapes = folders
    tensors = {k: v.float() for k, v in make_models.kohya_lora(shapes, seed=5).items()}  # ldm + lora_te_ names
    g = torch.Generator().manual_seed(6)
    diffusers_name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # = input_blocks.1.1.proj_in
    tensors.pop("lora_unet_input_blocks_1_1_proj_in.lora_up.weight", None)
    tensors.pop("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", None)
    tensors.pop("lora_unet_input_blocks_1_1_proj_in.alpha", None)
    tensors.update({f"{diffusers_name}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g) * 0.05,
                    f"{diffusers_name}.lora_down.weight": torch.randn(4, 320, 1, 1, generator=g) * 0.05,
                    f"{diffusers_name}.alpha": torch.tensor(2.0)})
    save_file(tensors, str(loras / "a.safetensors"))
    node = pack.NODE_CLASS_MAPPINGS["LycorisMergeToCheckpoint"]()
    report = node.run("base.safetensors", "a.safetensors", 0.8, "none", 1.0, "none", 1.0, "as stored",
                      "../merged")["result"][0]
    assert "0 unmatched, 0 keys not understood, 0 modules with errors" in report, report
    merged, base = load_file(str(checkpoints / "merged.safetensors")), load_file(str(checkpoints / "base.safetensors"))
    adapters = decode_tensors(tensors).adapters
    targets = {make_models.kohya_name(key): key for key in base if make_models.kohya_name(key)}
    targets[diffusers_name] = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert set(adapters) <= set(targets)
    for name, adapter in adapters.items():  # every module, UNet and text encoder, baked exactly
        key = targets[name]
        expected, _ = adapter.patch(base[key], 0.8)
        torch.testing.assert_close(merged[key], expected.to(base[key].dtype), rtol=0, atol=0, msg=name)
    untouched = set(base) - {targets[name] for name in adapters}
    assert all(torch.equal(merged[k], base[k]) for k in untouched)
    assert set(merged) == set(base) and not (tmp_path / "merged.safetensors").exists()


def test_merge_to_checkpoint_applies_block_weights(pack, folders):
    """Per-block strength binds to the checkpoint's own block ids; a block at 0 is copied bit for bit."""
    from e2e import make_models
    from lycoris_pack.lycoris_core import decode_tensors
    from lycoris_pack.lycoris_core.blocks import block_id

    checkpoints, loras, shapes = folders
    tensors = {k: v.float() for k, v in make_models.kohya_lora(shapes, seed=7).items()}
    save_file(tensors, str(loras / "a.safetensors"))
    node = pack.NODE_CLASS_MAPPINGS["LycorisMergeToCheckpoint"]()
    report = node.run("base.safetensors", "a.safetensors", 0.8, "none", 1.0, "none", 1.0, "as stored",
                      "blocks", block_weights="IN*=0, M00=0.5, TE=0")["result"][0]
    assert "block weights: named" in report, report
    merged, base = load_file(str(checkpoints / "blocks.safetensors")), load_file(str(checkpoints / "base.safetensors"))
    targets = {make_models.kohya_name(key): key for key in base if make_models.kohya_name(key)}
    weight = {"IN": 0.0, "M": 0.5, "TE": 0.0}
    seen = set()
    for name, adapter in decode_tensors(tensors).adapters.items():
        key = targets[name]
        block = block_id(key, "sd1")
        group = "IN" if block.startswith("IN") else "M" if block == "M00" else "TE" if block.startswith("TE") else "OUT"
        seen.add(group)
        w = weight.get(group, 1.0)
        if w == 0.0:
            assert torch.equal(merged[key], base[key]), name
        else:
            expected, _ = adapter.patch(base[key], 0.8 * w)
            torch.testing.assert_close(merged[key], expected.to(base[key].dtype), rtol=0, atol=0, msg=name)
    assert seen == {"IN", "M", "OUT", "TE"}, seen  # the file has layers in every group
    with pytest.raises(ValueError, match="merge to checkpoint.*(17|26|expects)"):
        node.run("base.safetensors", "a.safetensors", 0.8, "none", 1.0, "none", 1.0, "as stored", "bad",
                 block_weights="1,0,1")
    assert not (checkpoints / "bad.safetensors").exists()
