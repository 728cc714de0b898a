"""Ground truth for the name tables: which ComfyUI weight (and which rows of it) each diffusers
module of a released model comes from, read from diffusers' own single-file converters.

Each architecture is given by the signature of its released checkpoint (the few keys and shapes
ComfyUI's `model_detection` reads); ComfyUI detects the model config from it and builds its own
model class at full size on the meta device. Every weight of that model is then handed to
diffusers' `convert_*_to_diffusers` as a 1-D int64 tensor whose values encode (weight id, row):
whatever the converter renames, splits or concatenates, the values of each output tell which
rows of which ComfyUI weight it holds.
"""

from __future__ import annotations

import re

import torch


def _blocks(prefix: str, count: int, suffix: str, shape) -> dict:
    return {f"{prefix}{i}.{suffix}": shape for i in range(count)}


def _wan(dim, ffn, layers, in_dim, out_dim, **extra):
    sig = {"head.modulation": (1, 2, dim), "head.head.weight": (out_dim * 4, dim),
           "patch_embedding.weight": (dim, in_dim, 1, 2, 2)}
    sig.update(_blocks("blocks.", layers, "ffn.0.weight", (ffn, dim)))
    sig.update(extra)
    return sig


def _hunyuan_video(hidden, double, single, in_ch, patch, out_w, context, **extra):
    sig = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,),
           "img_in.proj.weight": (hidden, in_ch, *patch), "final_layer.linear.weight": (out_w, hidden),
           "txt_in.input_embedder.weight": (hidden, context)}
    sig.update(_blocks("double_blocks.", double, "img_attn_qkv.weight", (3 * hidden, hidden)))
    sig.update(_blocks("single_blocks.", single, "linear1.weight", (3 * hidden + 4 * hidden, hidden)))
    sig.update(extra)
    return sig


# Released checkpoints, by the keys ComfyUI's detection reads (shapes from the published files).
SIGNATURES = {
    "wan21_t2v_14b": _wan(5120, 13824, 40, 16, 16),
    "wan21_i2v_14b": _wan(5120, 13824, 40, 36, 16, **{"img_emb.proj.0.bias": (1280,)}),
    "wan21_vace_14b": _wan(5120, 13824, 40, 16, 16, **{"vace_patch_embedding.weight": (5120, 96, 1, 2, 2)},
                           **_blocks("vace_blocks.", 8, "after_proj.weight", (5120, 5120))),
    "wan22_ti2v_5b": _wan(3072, 14336, 30, 48, 48),
    "hunyuan_video": _hunyuan_video(3072, 20, 40, 16, (1, 2, 2), 64, 4096,
                                    **{"vector_in.in_layer.weight": (3072, 768),
                                       "guidance_in.mlp.0.weight": (3072, 256)}),
    "hunyuan_video15": _hunyuan_video(2048, 54, 0, 65, (1, 1, 1), 32, 3584,
                                      **{"cond_type_embedding.weight": (3, 2048), "vision_in.proj.0.weight": (1152,),
                                         "byt5_in.fc1.weight": (2048, 1472)}),
    "lumina2": {"cap_embedder.1.weight": (2304, 2304), "noise_refiner.0.attention.k_norm.weight": (96,),
                **_blocks("layers.", 26, "attention.qkv.weight", (2304 + 2 * 768, 2304))},
    "cosmos1_7b": {"blocks.block0.blocks.0.block.attn.to_q.0.weight": (4096, 4096),
                   "x_embedder.proj.1.weight": (4096, 68)},
    "cosmos_predict2_2b": {"blocks.0.mlp.layer1.weight": (8192, 2048), "x_embedder.proj.1.weight": (2048, 68)},
    "z_image": {"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,),
                **_blocks("layers.", 30, "attention.qkv.weight", (3 * 3840, 3840))},
    "flux1_dev": {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64),
                  "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
                  "guidance_in.in_layer.weight": (3072, 256),
                  **_blocks("double_blocks.", 19, "img_attn.qkv.weight", (9216, 3072)),
                  **_blocks("single_blocks.", 38, "linear1.weight", (21504, 3072))},
    "sd35_large": {"joint_blocks.0.context_block.attn.qkv.weight": (3 * 2432, 2432),
                   "joint_blocks.0.context_block.attn.ln_q.weight": (64,), "x_embedder.proj.weight": (2432, 16, 2, 2),
                   "final_layer.linear.weight": (64, 2432), "y_embedder.mlp.0.weight": (2432, 2048),
                   "context_embedder.weight": (2432, 4096), "pos_embed": (1, 36864, 2432)},
    "ltxv": {"adaln_single.emb.timestep_embedder.linear_1.bias": (2048,),
             **_blocks("transformer_blocks.", 28, "attn2.to_k.weight", (2048, 4096))},
    "qwen_image": {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64),
                   **_blocks("transformer_blocks.", 60, "attn.to_q.weight", (3072, 3072))},
    "auraflow": {"double_layers.0.attn.w1q.weight": (3072, 3072), "positional_encoding": (1, 1024, 3072),
                 "cond_seq_linear.weight": (3072, 2048), **_blocks("double_layers.", 4, "attn.w1q.weight", (3072, 3072)),
                 **_blocks("single_layers.", 32, "attn.w1q.weight", (3072, 3072))},
    "hidream": {"caption_projection.0.linear.weight": (2560, 4096)},
    "flux2_dev": {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (6144, 128),
                  "txt_in.weight": (6144, 15360), "double_stream_modulation_img.lin.weight": (6 * 6144, 6144),
                  **_blocks("double_blocks.", 8, "img_attn.qkv.weight", (3 * 6144, 6144)),
                  **_blocks("single_blocks.", 48, "linear1.weight", (3 * 6144 + 2 * 18432, 6144))},
    "chroma": {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64),
               "distilled_guidance_layer.norms.0.scale": (5120,), "txt_in.weight": (3072, 4096),
               **_blocks("double_blocks.", 19, "img_attn.qkv.weight", (9216, 3072)),
               **_blocks("single_blocks.", 38, "linear1.weight", (21504, 3072))},
}


# the ComfyUI model class (comfy.model_base) each release must be detected as
MODEL_CLASSES = {"wan21_t2v_14b": "WAN21", "wan21_i2v_14b": "WAN21", "wan21_vace_14b": "WAN21_Vace",
                 "wan22_ti2v_5b": "WAN22", "hunyuan_video": "HunyuanVideo", "hunyuan_video15": "HunyuanVideo15",
                 "lumina2": "Lumina2", "z_image": "Lumina2", "cosmos1_7b": "CosmosVideo",
                 "cosmos_predict2_2b": "CosmosPredict2", "chroma": "Chroma", "flux1_dev": "Flux",
                 "sd15": "BaseModel", "sdxl": "SDXL", "sd35_large": "SD3", "ltxv": "LTXV",
                 "qwen_image": "QwenImage", "auraflow": "AuraFlow", "hidream": "HiDream", "flux2_dev": "Flux2"}
# UNets: ComfyUI's config (as its detection gives it, tests/in_comfyui/test_architectures.py) and
# diffusers' UNet2DConditionModel arguments of the same release, whose config the converter reads.
UNETS = {
    "sd15": ("SD15", dict(cross_attention_dim=768, attention_head_dim=8)),
    "sdxl": ("SDXL", dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                          use_linear_projection=True)),
}


def comfy_model(arch: str):
    """ComfyUI's own model for the released checkpoint `arch`, detected and built on meta.
    LookupError when this ComfyUI has no such model class (the pinned 2024 runtime)."""
    import comfy.model_base
    import comfy.model_detection

    if not hasattr(comfy.model_base, MODEL_CLASSES[arch]):
        raise LookupError(f"this ComfyUI has no {MODEL_CLASSES[arch]} model class ({arch})")
    if arch in UNETS:
        import comfy.supported_models

        from test_architectures import SD15, SDXL

        config_class = getattr(comfy.supported_models, UNETS[arch][0])
        with torch.device("meta"):
            return config_class(dict(SD15 if arch == "sd15" else SDXL)).get_model({}, device=torch.device("meta"))
    with torch.device("meta"):
        signature = {k: torch.empty(shape) for k, shape in SIGNATURES[arch].items()}
    config = comfy.model_detection.model_config_from_unet(signature, "")
    assert config is not None, f"ComfyUI does not detect the {arch} signature"
    with torch.device("meta"):
        model = config.get_model({}, device=torch.device("meta"))
    assert type(model).__name__ == MODEL_CLASSES[arch], (arch, type(model).__name__)
    return model


# arch -> (diffusers.loaders.single_file_utils converter, prefix of the checkpoint keys it reads)
CONVERTERS = {
    **dict.fromkeys(("wan21_t2v_14b", "wan21_i2v_14b", "wan21_vace_14b", "wan22_ti2v_5b"),
                    ("convert_wan_transformer_to_diffusers", "")),
    "hunyuan_video": ("convert_hunyuan_video_transformer_to_diffusers", ""),
    "lumina2": ("convert_lumina2_to_diffusers", ""),
    "cosmos1_7b": ("convert_cosmos_transformer_checkpoint_to_diffusers", "net."),
    "cosmos_predict2_2b": ("convert_cosmos_transformer_checkpoint_to_diffusers", "net."),
    "chroma": ("convert_chroma_transformer_checkpoint_to_diffusers", ""),
    "z_image": ("convert_z_image_transformer_checkpoint_to_diffusers", ""),
    "flux1_dev": ("convert_flux_transformer_checkpoint_to_diffusers", ""),
    "sd35_large": ("convert_sd3_transformer_checkpoint_to_diffusers", ""),
    "ltxv": ("convert_ltx_transformer_checkpoint_to_diffusers", ""),
    "auraflow": ("convert_auraflow_transformer_checkpoint_to_diffusers", ""),
    "hidream": ("convert_hidream_transformer_to_diffusers", ""),
    "flux2_dev": ("convert_flux2_transformer_checkpoint_to_diffusers", ""),
}
# diffusers has no single-file converter for these (test_name_tables checks them on diffusers' class)
NO_CONVERTER = set(SIGNATURES) - set(CONVERTERS)


def _converter(arch: str):
    from diffusers.loaders import single_file_utils as s

    if arch in UNETS:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            config = dict(UNet2DConditionModel(**UNETS[arch][1]).config)
        return (lambda checkpoint: s.convert_ldm_unet_checkpoint(checkpoint, config)), "model.diffusion_model."

    name, prefix = CONVERTERS[arch]
    return getattr(s, name), prefix


# ComfyUI parameter name -> released checkpoint name, where ComfyUI renames at load time (BFL's
# RMSNorm `.scale` read as `.weight`; HunyuanVideo's `process_unet_state_dict`). `original_name`
# checks each against ComfyUI's own load-time rename.
_HUNYUAN_VIDEO = (
    ("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
    ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."),
    ("_attn.norm.query_norm.weight", "_attn_q_norm.weight"), ("_attn.norm.key_norm.weight", "_attn_k_norm.weight"),
    (".norm.query_norm.weight", ".q_norm.weight"), (".norm.key_norm.weight", ".k_norm.weight"),
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."), ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("time_in.in_layer.", "time_in.mlp.0."), ("time_in.out_layer.", "time_in.mlp.2."),
    ("guidance_in.in_layer.", "guidance_in.mlp.0."), ("guidance_in.out_layer.", "guidance_in.mlp.2."),
)
_ORIGINAL_NAMES = {
    "chroma": lambda key: re.sub(r"(_norm|norms\.\d+)\.weight$", r"\1.scale", key),
    "flux1_dev": lambda key: re.sub(r"(_norm)\.weight$", r"\1.scale", key),
    "flux2_dev": lambda key: re.sub(r"(_norm)\.weight$", r"\1.scale", key),
    "hunyuan_video": lambda key: _replace_all(key, _HUNYUAN_VIDEO),
    "hunyuan_video15": lambda key: _replace_all(key, _HUNYUAN_VIDEO),
}



def _replace_all(key: str, pairs) -> str:
    for comfy_part, original_part in pairs:
        key = key.replace(comfy_part, original_part)
    return key


def original_names(arch: str, model) -> dict:
    """ComfyUI key -> released checkpoint key, checked by ComfyUI's own load-time conversion."""
    keys = list(model.diffusion_model.state_dict())
    rename = _ORIGINAL_NAMES.get(arch, lambda key: key)
    originals = {key: rename(key) for key in keys}
    process = model.model_config.process_unet_state_dict
    back = process({original: key for key, original in originals.items()})  # processed name -> ComfyUI key
    assert all(back.get(key) == key for key in keys), "ComfyUI does not load these names back"
    return originals


class _KeepsKeys(dict):
    """diffusers' Cosmos converter pops every key before testing which Cosmos version the
    checkpoint is (so it always takes its 2.0 branch): answer `in` from the keys it was given."""

    def __init__(self, items):
        super().__init__(items)
        self._given = set(self)

    def __contains__(self, key):
        return key in self._given


def diffusers_truth(arch: str, model) -> dict:
    """diffusers module -> ComfyUI target (`key` or `(key, (0, start, rows))`), for every
    Linear/Conv weight of `model` (a ComfyUI BaseModel) the converter gives a diffusers name."""
    weights = model.diffusion_model.state_dict()
    adaptable = [k for k, v in weights.items() if k.endswith(".weight") and v.dim() >= 2]
    convert, prefix = _converter(arch)
    ids = {key: i for i, key in enumerate(weights)}
    originals = original_names(arch, model)
    checkpoint = _KeepsKeys({prefix + originals[key]: (ids[key] << 32) + torch.arange(v.shape[0] if v.dim() else 1,
                                                                                     dtype=torch.int64)
                             for key, v in weights.items()})
    converted = convert(checkpoint)
    names = list(weights)
    truth = {}
    for name, values in converted.items():
        if not name.endswith(".weight") or not isinstance(values, torch.Tensor) or values.dim() != 1:
            continue
        source = names[int(values[0]) >> 32]
        rows = values & 0xFFFFFFFF
        if source not in adaptable or not torch.equal(values >> 32, torch.full_like(values, ids[source])):
            continue
        start, length, total = int(rows[0]), len(rows), weights[source].shape[0]
        if not torch.equal(rows, torch.arange(start, start + length)):
            truth[name[: -len(".weight")]] = ("diffusion_model." + source, "rows reordered")
            continue
        key = "diffusion_model." + source
        truth[name[: -len(".weight")]] = key if length == total else (key, (0, start, length))
    return truth
