"""`python -m lycoris_core merge` on OpenCLIP text encoders (SD2.x, SDXL's second encoder), checked
against ComfyUI's own reading of the checkpoint: ComfyUI converts the fused `in_proj_weight` to
q/k/v layers when it loads a checkpoint; the merged file, read the same way, must hold base +
delta on exactly the layer each kohya module names."""

import pytest
import torch


def _openclip(prefix, width, layers, gen):
    sd = {}
    for i in range(layers):
        r = f"{prefix}transformer.resblocks.{i}."
        sd.update({r + "attn.in_proj_weight": torch.randn(3 * width, width, generator=gen),
                   r + "attn.in_proj_bias": torch.randn(3 * width, generator=gen),
                   r + "attn.out_proj.weight": torch.randn(width, width, generator=gen),
                   r + "attn.out_proj.bias": torch.randn(width, generator=gen),
                   r + "mlp.c_fc.weight": torch.randn(4 * width, width, generator=gen),
                   r + "mlp.c_fc.bias": torch.randn(4 * width, generator=gen),
                   r + "mlp.c_proj.weight": torch.randn(width, 4 * width, generator=gen),
                   r + "ln_1.weight": torch.randn(width, generator=gen), r + "ln_1.bias": torch.randn(width, generator=gen),
                   r + "ln_2.weight": torch.randn(width, generator=gen), r + "ln_2.bias": torch.randn(width, generator=gen)})
    sd[f"{prefix}ln_final.weight"] = torch.randn(width, generator=gen)
    sd[f"{prefix}ln_final.bias"] = torch.randn(width, generator=gen)
    return sd


@pytest.mark.parametrize("prefix, kohya", [("cond_stage_model.model.", "lora_te_"),
                                           ("conditioner.embedders.1.model.", "lora_te2_")])
def test_merged_openclip_matches_comfyui_reading(comfy, pack, tmp_path, prefix, kohya):
    from safetensors.torch import load_file

    cli = __import__(f"{pack.__name__}.lycoris_core.cli", fromlist=["main"])
    safe_io = __import__(f"{pack.__name__}.lycoris_core.safe_io", fromlist=["save_tensors_atomic"])
    gen = torch.Generator().manual_seed(11)
    width, layers = 8, 2
    base = _openclip(prefix, width, layers, gen)
    base["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.randn(16, 16, generator=gen)
    if prefix.startswith("conditioner"):
        base["model.diffusion_model.label_emb.0.0.weight"] = torch.randn(16, 16, generator=gen)
    safe_io.save_tensors_atomic(tmp_path / "base.safetensors", base)
    shapes = {"self_attn_q_proj": (width, width), "self_attn_k_proj": (width, width),
              "self_attn_v_proj": (width, width), "self_attn_out_proj": (width, width),
              "mlp_fc1": (4 * width, width), "mlp_fc2": (width, 4 * width)}
    lora, deltas = {}, {}
    for i in range(layers):
        for part, (rows, cols) in shapes.items():
            name = f"{kohya}text_model_encoder_layers_{i}_{part}"
            down, up = torch.randn(4, cols, generator=gen), torch.randn(rows, 4, generator=gen)
            lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                         f"{name}.alpha": torch.tensor(2.0)})
            hf = f"text_model.encoder.layers.{i}.{part.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
            deltas[hf + ".weight"] = 0.5 * (2.0 / 4) * (up @ down)
    lora["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.randn(4, 16, generator=gen)
    lora["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = torch.randn(16, 4, generator=gen)
    safe_io.save_tensors_atomic(tmp_path / "lora.safetensors", lora)
    out = tmp_path / "merged.safetensors"
    code = cli.main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter",
                     f"{tmp_path / 'lora.safetensors'}:0.5", "--out", str(out)])
    assert code == 0
    merged = load_file(str(out))

    def as_comfyui_reads(sd):
        text = {k: v for k, v in sd.items() if k.startswith(prefix)}
        return comfy.utils.clip_text_transformers_convert(text, prefix, "")

    before, after = as_comfyui_reads(dict(base)), as_comfyui_reads(merged)
    assert set(deltas) <= set(before)
    for key in before:
        expected = before[key] + deltas[key] if key in deltas else before[key]
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-5, msg=key)
