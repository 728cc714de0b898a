"""Merge LyCORIS to checkpoint: adapters baked into a checkpoint file from the checkpoints folder,
names mapped with ComfyUI's key map (diffusers and ldm kohya names, the text encoder)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file


def test_merge_to_checkpoint_bakes_every_module(pack, tmp_path):
    from comfyui_runtime import use_checkpoints_folder, use_loras_folder
    from e2e import make_models
    from lycoris_pack.lycoris_core import decode_tensors

    checkpoints, loras = tmp_path / "checkpoints", tmp_path / "loras"
    loras.mkdir()
    with torch.inference_mode():
        make_models.write_checkpoint(checkpoints / "base.safetensors")
        shapes = make_models.weight_shapes()
    use_checkpoints_folder(checkpoints)
    use_loras_folder(loras)
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
