"""Models for end-to-end tests, generated at test time with random weights (nothing downloaded).

`write_checkpoint()` writes an SD1.x checkpoint that ComfyUI's own CheckpointLoaderSimple detects
(pinned March-2024 ComfyUI and 0.3.6x alike), built with the running ComfyUI's own classes, so
`comfyui_runtime.import_comfy()` must have run in this process:

* UNet: the smallest config still detected as SD1.x. `supported_models.SD15` matches on
  model_channels=320, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
  no temporal attention; everything else (levels, res blocks, transformer depth) is read back
  from the keys. So: one level (channel_mult [1]), one res block, transformer depth 1.
* Text encoder: the full CLIP-L (12 layers, width 768, vocab 49408): its shape is fixed by the
  SD1 CLIP config, and ComfyUI drops the text encoder if the checkpoint has no weights for it.
  It is ~85% of the file.
* VAE: TAESD (detected by `taesd_decoder.1.weight`), ~1% of the size of the SD VAE.

Stored in fp16 (half the bytes of fp32); a fixed seed makes the files reproducible.
`weight_shapes()` lists the checkpoint's keys/shapes (built on the meta device: instant) and
`kohya_lora()` makes a LoRA in kohya naming (`lora_unet_...`, `lora_te_...`) matching them;
`write_kohya_dylora()` writes one as sd-scripts' `networks.dylora` does (same keys, DyLoRA metadata).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = CLIP_PREFIX + "transformer."  # + text_model.encoder.layers.N...
CHECKPOINT_NAME = "e2e_tiny_sd15.safetensors"


def _modules(device: str):
    """(prefix, module) for UNet, CLIP-L and TAESD, built with ComfyUI's classes (uninitialised)."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    with torch.device(device), torch.no_grad():
        unet = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({}).diffusion_model
        clip = comfy.sd1_clip.SDClipModel(device=device, dtype=torch.float32)
        vae = comfy.taesd.taesd.TAESD()
    return ((UNET_PREFIX, unet), (CLIP_PREFIX, clip), (VAE_PREFIX, vae))


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every floating-point tensor of the generated checkpoint: key -> shape (no data made)."""
    shapes = {}
    for prefix, module in _modules("meta"):
        for key, value in module.state_dict().items():
            if prefix == CLIP_PREFIX and not key.startswith("transformer.text_model."):
                continue  # text_projection / logit_scale: not in SD1.x checkpoints, ComfyUI makes them
            if value.is_floating_point():
                shapes[prefix + key] = tuple(value.shape)
    return shapes


def build_checkpoint(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict: N(0, 0.02) weights, unit norm scales, zero biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in weight_shapes().items():
        if key.endswith(".bias"):
            state[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1 and key.endswith(".weight"):
            state[key] = torch.ones(shape, dtype=dtype)  # norm scales
        elif len(shape) == 0:
            state[key] = (torch.zeros if key.endswith("shift") else torch.ones)(shape, dtype=dtype)  # TAESD vae_scale/shift
        else:
            state[key] = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=g)
    return state


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (atomically); an existing file is reused."""
    path = Path(path)
    if path.is_file():
        return path
    return save_safetensors(path, build_checkpoint(seed), {"generated_by": "lycoris pack e2e tests (random weights)"})


def kohya_name(key: str) -> str | None:
    """The kohya LoRA module name of a checkpoint weight key, or None outside UNet/text encoder."""
    if not key.endswith(".weight"):
        return None
    if key.startswith(UNET_PREFIX):
        return "lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
    if key.startswith(TE_PREFIX + "text_model.encoder."):
        return "lora_te_" + key[len(TE_PREFIX):-len(".weight")].replace(".", "_")
    return None


def default_targets(key: str, shape: tuple[int, ...]) -> bool:
    """What kohya's LoRA trains on SD1.x: the UNet transformers' attention/ff/proj layers and the
    text encoder's attention and MLP Linears."""
    if kohya_name(key) is None or len(shape) not in (2, 4):
        return False
    if key.startswith(UNET_PREFIX):
        return ".transformer_blocks." in key or key.endswith((".proj_in.weight", ".proj_out.weight"))
    return "_proj." in key or ".mlp.fc" in key


def kohya_lora(shapes: dict[str, tuple[int, ...]], rank: int = 4, alpha: float | None = None, seed: int = 0,
               scale: float = 0.05, select: Callable[[str, tuple[int, ...]], bool] = default_targets,
               dtype: torch.dtype = torch.float16, algo: str = "lora") -> dict[str, torch.Tensor]:
    """An adapter for the selected weights, kohya names. "lora": `.lora_down.weight`,
    `.lora_up.weight` (conv: (rank, in, kh, kw) down, (out, rank, 1, 1) up, as kohya's LoCon);
    "loha": `.hada_w{1,2}_{a,b}` with the conv kernel flattened into `_b`. Plus `.alpha`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if not select(key, shape):
            continue
        name = kohya_name(key)
        out_dim, in_dim = shape[0], shape[1]
        kernel = tuple(shape[2:])
        if algo == "loha":
            for j in "12":
                tensors[f"{name}.hada_w{j}_a"] = (torch.randn(out_dim, rank, generator=g) * scale * 2).to(dtype)
                tensors[f"{name}.hada_w{j}_b"] = (torch.randn(rank, math.prod(shape[1:]), generator=g) * scale * 2).to(dtype)
        else:
            down = torch.randn((rank, in_dim) + kernel, generator=g) * scale
            up = torch.randn((out_dim, rank) + (1,) * len(kernel), generator=g) * scale
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank), dtype=dtype)
    return tensors


def write_kohya_lora(path: Path, shapes: dict[str, tuple[int, ...]] | None = None, **kwargs) -> Path:
    """Write `kohya_lora(shapes or weight_shapes(), **kwargs)` to `path` (atomically)."""
    tensors = kohya_lora(shapes if shapes is not None else weight_shapes(), **kwargs)
    return save_safetensors(Path(path), tensors, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})


def write_kohya_dylora(path: Path, shapes: dict[str, tuple[int, ...]] | None = None, *, rank: int = 8,
                       unit: int = 2, **kwargs) -> Path:
    """A DyLoRA as sd-scripts' `networks.dylora` saves it: the LoRA key layout (`lora_down`,
    `lora_up`, `alpha`) at the full rank, told apart by its metadata (module and `unit`), which
    lycoris_core.dylora reads to pick the alpha policy and the rank step. Its training tags
    (`ss_tag_frequency`) give inspection some trigger words to find."""
    tensors = kohya_lora(shapes if shapes is not None else weight_shapes(), rank=rank, **kwargs)
    return save_safetensors(Path(path), tensors, {
        "ss_network_module": "networks.dylora", "ss_network_dim": str(rank),
        "ss_network_args": json.dumps({"unit": str(unit)}), "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps({"10_e2e": {"lycoris flower": 12, "watercolor": 5}, "5_more": {"watercolor": 3}})})
