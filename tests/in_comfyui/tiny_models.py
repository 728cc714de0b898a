"""Tiny real models built with ComfyUI's own classes, and adapters trained-by-noise on them."""

from __future__ import annotations

import copy
import json
import types

import torch

TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "num_heads": 4, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
TINY_CLIP = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 64, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 64, "torch_dtype": "float32",
    "vocab_size": 49408,
}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_sd15(seed: int = 0):
    """A ModelPatcher around ComfyUI's SD1.5 BaseModel with a tiny UNet config."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_UNET))
    model = config.get_model({})
    _randomise(model.diffusion_model, seed)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


# A Flux small enough for the CPU: ComfyUI derives Flux's head size from its fixed rope axes
# (16 + 56 + 56 = 128), so the hidden size must be a multiple of 128.
TINY_FLUX = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
             "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}


def comfy_layout(diffusers_state_dict: dict) -> dict:
    """A diffusers DiT state dict (Flux, SD3, AuraFlow, ...) in the layout of ComfyUI's own
    checkpoints, converted by ComfyUI's own conversion (q/k/v fused as it fuses them)."""
    import comfy.model_detection

    converted = comfy.model_detection.convert_diffusers_mmdit(diffusers_state_dict, "")
    if converted is None:
        raise ValueError("this ComfyUI cannot convert that diffusers state dict")
    return converted


def meta_model_from_diffusers(diffusers_class, **config):
    """ComfyUI's BaseModel for a diffusers DiT at the size `config` gives (diffusers' defaults are
    the released sizes), on the meta device, detected by ComfyUI from the state dict's shapes as
    when it loads a checkpoint: no parameter list is written here."""
    import comfy.model_detection

    with torch.device("meta"):
        state_dict = comfy_layout(diffusers_class(**config).state_dict())
        model_config = comfy.model_detection.model_config_from_unet(state_dict, "")
        if model_config is None:
            raise ValueError(f"this ComfyUI does not detect {diffusers_class.__name__}")
        return model_config.get_model({}, device=torch.device("meta"))


def write_tiny_flux(path, seed: int = 0, **config) -> dict:
    """A random tiny Flux checkpoint (ComfyUI layout) at `path`; returns its state dict."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_FLUX, **config})
    _randomise(model, seed)
    state_dict = {k: v.contiguous() for k, v in comfy_layout(model.state_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return state_dict


def load_diffusion_model(folder, name: str, weight_dtype: str = "default"):
    """`name` from `folder` through ComfyUI's own Load Diffusion Model node (UNETLoader)."""
    import folder_paths
    import nodes

    from comfyui_runtime import use_model_folder

    kind = "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"  # 2024: unet
    use_model_folder(kind, folder)
    return nodes.UNETLoader().load_unet(name, weight_dtype)[0]


def tiny_flux(folder, seed: int = 0, weight_dtype: str = "default"):
    """A ModelPatcher around a tiny Flux written to `folder` and loaded by UNETLoader, as a user loads one."""
    write_tiny_flux(folder / "tiny_flux.safetensors", seed)
    return load_diffusion_model(folder, "tiny_flux.safetensors", weight_dtype)


def tiny_clip(tmp_path, seed: int = 1):
    """ComfyUI's SD1 CLIP wrapper around a 2-layer text model."""
    import comfy.sd
    import comfy.sd1_clip

    config_path = tmp_path / "tiny_clip.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    target = types.SimpleNamespace(
        clip=comfy.sd1_clip.SD1ClipModel, tokenizer=comfy.sd1_clip.SD1Tokenizer,
        params={"textmodel_json_config": str(config_path), "clip_model": comfy.sd1_clip.SDClipModel},
    )
    with torch.no_grad():  # ComfyUI builds models without autograd
        clip = comfy.sd.CLIP(target)
    _randomise(clip.cond_stage_model, seed)
    return clip


def lycoris_file(root_module: torch.nn.Module, path, prefix: str, algo: str, seed: int = 0,
                 target_module=("Linear", "Conv2d"), **kwargs):
    """Wrap a copy of `root_module` with lycoris-lora, randomise, save with `prefix` names.
    `target_module`: the module classes lycoris-lora adapts (or whose layers it adapts).

    Returns (network, wrapped copy) so tests can run the trainer's forward as the oracle.
    """
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    LycorisNetwork.apply_preset({"target_module": list(target_module), "target_name": []})
    wrapped = copy.deepcopy(root_module)
    kwargs = {"linear_dim": 4, "linear_alpha": 2, **kwargs}
    net = create_lycoris(wrapped, 1.0, algo=algo, **kwargs)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.05)
    net.save_weights(str(path), torch.float32, {})
    tensors = load_file(str(path))
    renamed = {prefix + k[len("lycoris_"):]: v for k, v in tensors.items()}
    save_file(renamed, str(path))
    return net, wrapped


def unet_output(patcher, x, t, context):
    """The patched model's diffusion-model output (patches applied for the call, then removed)."""
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context)
    finally:
        patcher.unpatch_model()


def patched_state_dict(patcher) -> dict:
    """The weights ComfyUI computes for a patched ModelPatcher: its own calculate_weight on an fp32
    copy of each patched weight, cast back to the stored dtype, as ComfyUI does when it loads a
    model (recent runtimes may otherwise patch on the fly and leave the parameters as they are)."""
    from lycoris_pack.nodes.weights import patched_weight

    weights = patcher.model.state_dict()
    out = {k: v.detach().clone() for k, v in weights.items()}
    for key in patcher.patches:
        out[key] = patched_weight(patcher, key).to(weights[key].dtype)
    return out
