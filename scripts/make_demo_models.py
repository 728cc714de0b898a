"""Generate, with random weights, a checkpoint ComfyUI's own loader detects as SD1.x, and a
LoHa + LoRA adapter for it in kohya naming. Nothing is downloaded.

The checkpoint is as small as SD1.x detection allows: a one-level UNet (320 channels, context
768, which the SD15 config requires), the CLIP-L text encoder (its shape is fixed by ComfyUI's
config) and a TAESD VAE. Built with the running ComfyUI's own classes, so `comfy` must be
importable (run through scripts/run_main_job.py or the tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
CHECKPOINT = "lycoris_demo_sd15.safetensors"
ADAPTER = "lycoris_demo_loha.safetensors"


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)  # norm scales
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def build_checkpoint() -> dict:
    """The checkpoint's state dict (fp16), in the original SD1.x layout."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        unet = comfy.supported_models.SD15(dict(UNET)).get_model({}).diffusion_model
        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        vae = comfy.taesd.taesd.TAESD()
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", vae)):
        _randomise(module, g)
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                state[prefix + key] = value.to(torch.float16).contiguous()
    return state


def build_adapter(checkpoint: dict, rank: int = 4) -> dict:
    """LoHa on the UNet's Linear/Conv layers and LoRA on the text encoder, kohya names."""
    g = torch.Generator().manual_seed(99)
    tensors = {}
    for key, weight in checkpoint.items():
        if not key.endswith(".weight") or weight.dim() not in (2, 4) or weight.shape[0] < 8:
            continue
        if key.startswith("model.diffusion_model."):
            name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            rows, cols = weight.shape[0], weight[0].numel()
            for j in "12":
                tensors[f"{name}.hada_w{j}_a"] = torch.randn(rows, rank, generator=g) * 0.1
                tensors[f"{name}.hada_w{j}_b"] = torch.randn(rank, cols, generator=g) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(float(rank / 2))
        elif key.startswith("cond_stage_model.transformer.text_model.encoder.") and weight.dim() == 2:
            path = key[len("cond_stage_model.transformer."):-len(".weight")]
            name = "lora_te_" + path.replace(".", "_")
            tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.05
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.05
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return {k: v.to(torch.float16) for k, v in tensors.items()}


def write_demo_models(checkpoints: Path, loras: Path) -> tuple[Path, Path]:
    """Write both files (atomically) and return their paths; reuses files already there."""
    from lycoris_core.safe_io import save_tensors_atomic

    checkpoints.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    ckpt_path, adapter_path = checkpoints / CHECKPOINT, loras / ADAPTER
    if not (ckpt_path.is_file() and adapter_path.is_file()):
        checkpoint = build_checkpoint()
        save_tensors_atomic(str(ckpt_path), checkpoint, {"generated_by": "lycoris pack demo (random weights)"})
        save_tensors_atomic(str(adapter_path), build_adapter(checkpoint),
                            {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}',
                             "ss_base_model_version": "sd_v1", "ss_tag_frequency": '{"demo": {"lycoris demo": 1}}'})
    return ckpt_path, adapter_path
