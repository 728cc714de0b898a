"""diffusers module names -> the model's own weight keys, for architectures whose diffusers names
ComfyUI's LoRA key map does not know (0.28: Wan, HunyuanVideo 1.0/1.5, Lumina 2, Cosmos 1.0 and
Predict2, Chroma's approximator, LTX-Video's embedders, Flux.2's shared modulation).

Trainers that work on the diffusers model (SimpleTuner/LyCORIS, diffusers and PEFT scripts,
ai-toolkit's diffusers mode, OneTrainer) name its modules; ComfyUI loads the released checkpoint,
whose names differ and whose attention projections are often fused (q|k|v, or q|k|v|mlp). Each
table is data: `(diffusers template, checkpoint template[, rows])`, `{}` standing for a block
index (filled in order), `rows` naming the part of a fused weight the module is. The tables were
derived from diffusers' own single-file converters and are checked against them on ComfyUI's
full-size models (tests/in_comfyui/test_name_tables.py). Pure data and one expansion function:
no ComfyUI import, so the command line can use them on any state dict.
"""

from __future__ import annotations

import re

# Fused weights by part: "D" is as many rows as the layer's input width, "R" an equal share of
# the rows left over (HunyuanVideo/Flux: q|k|v of width D each, then the MLP; Lumina 2's GQA:
# q of width D, k and v sharing the rest).
QKV = ("D", "D", "D")
QKV_MLP = ("D", "D", "D", "R")
Q_KV_KV = ("D", "R", "R")


def _rows(layout, part):
    return (layout, part)


Q, K, V = (_rows(QKV, i) for i in range(3))

WAN = {
    "detect": "head.modulation",
    "rules": (
        ("patch_embedding", "patch_embedding"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
        ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
        ("blocks.{}.attn1.to_q", "blocks.{}.self_attn.q"),
        ("blocks.{}.attn1.to_k", "blocks.{}.self_attn.k"),
        ("blocks.{}.attn1.to_v", "blocks.{}.self_attn.v"),
        ("blocks.{}.attn1.to_out.0", "blocks.{}.self_attn.o"),
        ("blocks.{}.attn1.norm_q", "blocks.{}.self_attn.norm_q"),
        ("blocks.{}.attn1.norm_k", "blocks.{}.self_attn.norm_k"),
        ("blocks.{}.attn2.to_q", "blocks.{}.cross_attn.q"),
        ("blocks.{}.attn2.to_k", "blocks.{}.cross_attn.k"),
        ("blocks.{}.attn2.to_v", "blocks.{}.cross_attn.v"),
        ("blocks.{}.attn2.to_out.0", "blocks.{}.cross_attn.o"),
        ("blocks.{}.attn2.add_k_proj", "blocks.{}.cross_attn.k_img"),
        ("blocks.{}.attn2.add_v_proj", "blocks.{}.cross_attn.v_img"),
        ("blocks.{}.attn2.norm_q", "blocks.{}.cross_attn.norm_q"),
        ("blocks.{}.attn2.norm_k", "blocks.{}.cross_attn.norm_k"),
        ("blocks.{}.attn2.norm_added_k", "blocks.{}.cross_attn.norm_k_img"),
        ("blocks.{}.ffn.net.0.proj", "blocks.{}.ffn.0"),
        ("blocks.{}.ffn.net.2", "blocks.{}.ffn.2"),
        ("blocks.{}.norm2", "blocks.{}.norm3"),  # diffusers swaps Wan's norm2 and norm3
        ("proj_out", "head.head"),
        # VACE
        ("vace_patch_embedding", "vace_patch_embedding"),
        ("vace_blocks.{}.proj_in", "vace_blocks.{}.before_proj"),
        ("vace_blocks.{}.proj_out", "vace_blocks.{}.after_proj"),
        ("vace_blocks.{}.attn1.to_q", "vace_blocks.{}.self_attn.q"),
        ("vace_blocks.{}.attn1.to_k", "vace_blocks.{}.self_attn.k"),
        ("vace_blocks.{}.attn1.to_v", "vace_blocks.{}.self_attn.v"),
        ("vace_blocks.{}.attn1.to_out.0", "vace_blocks.{}.self_attn.o"),
        ("vace_blocks.{}.attn2.to_q", "vace_blocks.{}.cross_attn.q"),
        ("vace_blocks.{}.attn2.to_k", "vace_blocks.{}.cross_attn.k"),
        ("vace_blocks.{}.attn2.to_v", "vace_blocks.{}.cross_attn.v"),
        ("vace_blocks.{}.attn2.to_out.0", "vace_blocks.{}.cross_attn.o"),
        ("vace_blocks.{}.ffn.net.0.proj", "vace_blocks.{}.ffn.0"),
        ("vace_blocks.{}.ffn.net.2", "vace_blocks.{}.ffn.2"),
        ("vace_blocks.{}.norm2", "vace_blocks.{}.norm3"),
    ),
}

_REFINER = "txt_in.individual_token_refiner.blocks.{}"
HUNYUAN_VIDEO = {
    "detect": "txt_in.individual_token_refiner.blocks.0.norm1.weight",
    "rules": (
        ("x_embedder.proj", "img_in.proj"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder.proj_in", "txt_in.input_embedder"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer"),
        ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer"),
        ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer"),
        ("context_embedder.token_refiner.refiner_blocks.{}.attn.to_q", _REFINER + ".self_attn.qkv", Q),
        ("context_embedder.token_refiner.refiner_blocks.{}.attn.to_k", _REFINER + ".self_attn.qkv", K),
        ("context_embedder.token_refiner.refiner_blocks.{}.attn.to_v", _REFINER + ".self_attn.qkv", V),
        ("context_embedder.token_refiner.refiner_blocks.{}.attn.to_out.0", _REFINER + ".self_attn.proj"),
        ("context_embedder.token_refiner.refiner_blocks.{}.ff.net.0.proj", _REFINER + ".mlp.0"),
        ("context_embedder.token_refiner.refiner_blocks.{}.ff.net.2", _REFINER + ".mlp.2"),
        ("context_embedder.token_refiner.refiner_blocks.{}.norm_out.linear", _REFINER + ".adaLN_modulation.1"),
        ("transformer_blocks.{}.norm1.linear", "double_blocks.{}.img_mod.lin"),
        ("transformer_blocks.{}.norm1_context.linear", "double_blocks.{}.txt_mod.lin"),
        ("transformer_blocks.{}.attn.to_q", "double_blocks.{}.img_attn.qkv", Q),
        ("transformer_blocks.{}.attn.to_k", "double_blocks.{}.img_attn.qkv", K),
        ("transformer_blocks.{}.attn.to_v", "double_blocks.{}.img_attn.qkv", V),
        ("transformer_blocks.{}.attn.add_q_proj", "double_blocks.{}.txt_attn.qkv", Q),
        ("transformer_blocks.{}.attn.add_k_proj", "double_blocks.{}.txt_attn.qkv", K),
        ("transformer_blocks.{}.attn.add_v_proj", "double_blocks.{}.txt_attn.qkv", V),
        ("transformer_blocks.{}.attn.to_out.0", "double_blocks.{}.img_attn.proj"),
        ("transformer_blocks.{}.attn.to_add_out", "double_blocks.{}.txt_attn.proj"),
        ("transformer_blocks.{}.ff.net.0.proj", "double_blocks.{}.img_mlp.0"),
        ("transformer_blocks.{}.ff.net.2", "double_blocks.{}.img_mlp.2"),
        ("transformer_blocks.{}.ff_context.net.0.proj", "double_blocks.{}.txt_mlp.0"),
        ("transformer_blocks.{}.ff_context.net.2", "double_blocks.{}.txt_mlp.2"),
        ("single_transformer_blocks.{}.attn.to_q", "single_blocks.{}.linear1", _rows(QKV_MLP, 0)),
        ("single_transformer_blocks.{}.attn.to_k", "single_blocks.{}.linear1", _rows(QKV_MLP, 1)),
        ("single_transformer_blocks.{}.attn.to_v", "single_blocks.{}.linear1", _rows(QKV_MLP, 2)),
        ("single_transformer_blocks.{}.proj_mlp", "single_blocks.{}.linear1", _rows(QKV_MLP, 3)),
        ("single_transformer_blocks.{}.proj_out", "single_blocks.{}.linear2"),
        ("single_transformer_blocks.{}.norm.linear", "single_blocks.{}.modulation.lin"),
        ("proj_out", "final_layer.linear"),
        # norm_out.linear is final_layer.adaLN_modulation.1 with its halves swapped: no row slice says that.
        # HunyuanVideo 1.5 (diffusers' convert_hunyuan_video1_5_to_diffusers.py)
        ("time_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("context_embedder_2.linear_1", "byt5_in.fc1"),
        ("context_embedder_2.linear_2", "byt5_in.fc2"),
        ("context_embedder_2.linear_3", "byt5_in.fc3"),
        ("image_embedder.linear_1", "vision_in.proj.1"),
        ("image_embedder.linear_2", "vision_in.proj.3"),
        ("cond_type_embed", "cond_type_embedding"),
    ),
    # The released checkpoint's own names, which ComfyUI renames at load (musubi-tuner and
    # diffusion-pipe write these); where only the dots differ, ComfyUI's map already has them.
    "checkpoint_rules": (
        ("double_blocks.{}.img_mod.linear", "double_blocks.{}.img_mod.lin"),
        ("double_blocks.{}.txt_mod.linear", "double_blocks.{}.txt_mod.lin"),
        ("double_blocks.{}.img_mlp.fc1", "double_blocks.{}.img_mlp.0"),
        ("double_blocks.{}.img_mlp.fc2", "double_blocks.{}.img_mlp.2"),
        ("double_blocks.{}.txt_mlp.fc1", "double_blocks.{}.txt_mlp.0"),
        ("double_blocks.{}.txt_mlp.fc2", "double_blocks.{}.txt_mlp.2"),
        ("single_blocks.{}.modulation.linear", "single_blocks.{}.modulation.lin"),
        (_REFINER + ".mlp.fc1", _REFINER + ".mlp.0"),
        (_REFINER + ".mlp.fc2", _REFINER + ".mlp.2"),
        ("time_in.mlp.0", "time_in.in_layer"),
        ("time_in.mlp.2", "time_in.out_layer"),
        ("guidance_in.mlp.0", "guidance_in.in_layer"),
        ("guidance_in.mlp.2", "guidance_in.out_layer"),
        ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.in_layer"),
        ("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
        ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
        ("txt_in.c_embedder.linear_2", "txt_in.c_embedder.out_layer"),
        # HunyuanVideo 1.5's release keeps q, k and v apart; ComfyUI's model fuses them.
        ("double_blocks.{}.img_attn_q", "double_blocks.{}.img_attn.qkv", Q),
        ("double_blocks.{}.img_attn_k", "double_blocks.{}.img_attn.qkv", K),
        ("double_blocks.{}.img_attn_v", "double_blocks.{}.img_attn.qkv", V),
        ("double_blocks.{}.txt_attn_q", "double_blocks.{}.txt_attn.qkv", Q),
        ("double_blocks.{}.txt_attn_k", "double_blocks.{}.txt_attn.qkv", K),
        ("double_blocks.{}.txt_attn_v", "double_blocks.{}.txt_attn.qkv", V),
    ),
}

_LUMINA_BLOCK = (
    ("attn.to_q", "attention.qkv", _rows(Q_KV_KV, 0)),
    ("attn.to_k", "attention.qkv", _rows(Q_KV_KV, 1)),
    ("attn.to_v", "attention.qkv", _rows(Q_KV_KV, 2)),
    ("attn.to_out.0", "attention.out"),
    ("feed_forward.linear_1", "feed_forward.w1"),
    ("feed_forward.linear_2", "feed_forward.w2"),
    ("feed_forward.linear_3", "feed_forward.w3"),
    ("norm1.linear", "adaLN_modulation.1"),
)
LUMINA2 = {
    "detect": "cap_embedder.1.weight",
    "rules": (
        ("x_embedder", "x_embedder"),
        ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("time_caption_embed.caption_embedder.1", "cap_embedder.1"),
        ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
        ("norm_out.linear_2", "final_layer.linear"),
        *((f"{stack}.{{}}.{d}", f"{stack}.{{}}.{c}", *rows) for stack in ("layers", "noise_refiner", "context_refiner")
          for d, c, *rows in _LUMINA_BLOCK),
    ),
}

_COSMOS1_BLOCK = (
    ("attn1.to_q", "0.block.attn.to_q.0"), ("attn1.to_k", "0.block.attn.to_k.0"),
    ("attn1.to_v", "0.block.attn.to_v.0"), ("attn1.to_out.0", "0.block.attn.to_out.0"),
    ("attn2.to_q", "1.block.attn.to_q.0"), ("attn2.to_k", "1.block.attn.to_k.0"),
    ("attn2.to_v", "1.block.attn.to_v.0"), ("attn2.to_out.0", "1.block.attn.to_out.0"),
    ("ff.net.0.proj", "2.block.layer1"), ("ff.net.2", "2.block.layer2"),
    ("norm1.linear_1", "0.adaLN_modulation.1"), ("norm1.linear_2", "0.adaLN_modulation.2"),
    ("norm2.linear_1", "1.adaLN_modulation.1"), ("norm2.linear_2", "1.adaLN_modulation.2"),
    ("norm3.linear_1", "2.adaLN_modulation.1"), ("norm3.linear_2", "2.adaLN_modulation.2"),
)
_COSMOS_COMMON = (
    ("patch_embed.proj", "x_embedder.proj.1"),
    ("time_embed.t_embedder.linear_1", "t_embedder.1.linear_1"),
    ("time_embed.t_embedder.linear_2", "t_embedder.1.linear_2"),
    ("proj_out", "final_layer.linear"),
)
COSMOS1 = {
    "detect": "blocks.block0.blocks.0.block.attn.to_q.0.weight",
    "rules": _COSMOS_COMMON + (
        ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
        ("norm_out.linear_2", "final_layer.adaLN_modulation.2"),
        *((f"transformer_blocks.{{}}.{d}", f"blocks.block{{}}.blocks.{c}") for d, c in _COSMOS1_BLOCK),
    ),
}
_COSMOS2_BLOCK = (
    ("attn1.to_q", "self_attn.q_proj"), ("attn1.to_k", "self_attn.k_proj"), ("attn1.to_v", "self_attn.v_proj"),
    ("attn1.to_out.0", "self_attn.output_proj"),
    ("attn2.to_q", "cross_attn.q_proj"), ("attn2.to_k", "cross_attn.k_proj"), ("attn2.to_v", "cross_attn.v_proj"),
    ("attn2.to_out.0", "cross_attn.output_proj"),
    ("ff.net.0.proj", "mlp.layer1"), ("ff.net.2", "mlp.layer2"),
    ("norm1.linear_1", "adaln_modulation_self_attn.1"), ("norm1.linear_2", "adaln_modulation_self_attn.2"),
    ("norm2.linear_1", "adaln_modulation_cross_attn.1"), ("norm2.linear_2", "adaln_modulation_cross_attn.2"),
    ("norm3.linear_1", "adaln_modulation_mlp.1"), ("norm3.linear_2", "adaln_modulation_mlp.2"),
)
COSMOS_PREDICT2 = {
    "detect": "blocks.0.mlp.layer1.weight",
    "rules": _COSMOS_COMMON + (
        ("norm_out.linear_1", "final_layer.adaln_modulation.1"),
        ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
        *((f"transformer_blocks.{{}}.{d}", f"blocks.{{}}.{c}") for d, c in _COSMOS2_BLOCK),
    ),
}

# ComfyUI maps Chroma's double/single blocks through its Flux table; the approximator is Chroma's own.
CHROMA = {
    "detect": "distilled_guidance_layer.in_proj.weight",
    "rules": (
        ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
        ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
        ("distilled_guidance_layer.layers.{}.linear_1", "distilled_guidance_layer.layers.{}.in_layer"),
        ("distilled_guidance_layer.layers.{}.linear_2", "distilled_guidance_layer.layers.{}.out_layer"),
        ("distilled_guidance_layer.norms.{}", "distilled_guidance_layer.norms.{}"),
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
    ),
}

# LTX-Video: ComfyUI's transformer blocks already carry diffusers' names; the embedders do not.
LTXV = {
    "detect": "adaln_single.linear.weight",
    "rules": (
        ("proj_in", "patchify_proj"),
        ("time_embed.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
        ("time_embed.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
        ("time_embed.linear", "adaln_single.linear"),
    ),
}

# Flux.2: ComfyUI's Flux table has its blocks; not its shared modulation and timestep embedders.
FLUX2 = {
    "detect": "double_stream_modulation_img.lin.weight",
    "rules": (
        ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
        ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
        ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ),
}

TABLES = {"wan": WAN, "hunyuan_video": HUNYUAN_VIDEO, "lumina2": LUMINA2, "cosmos1": COSMOS1,
          "cosmos_predict2": COSMOS_PREDICT2, "chroma": CHROMA, "ltxv": LTXV,
          "flux2": FLUX2}


def _part_rows(layout, part: int, rows: int, width: int) -> tuple[int, int]:
    """(start, length) of part `part` of a fused weight with `rows` rows and input width `width`."""
    shares = layout.count("R")
    rest = rows - width * layout.count("D")
    if rest < 0 or (shares and rest % shares) or (not shares and rest):
        raise ValueError(f"a fused weight of {rows} rows and width {width} is not {'|'.join(layout)}")
    sizes = [width if p == "D" else rest // shares for p in layout]
    return sum(sizes[:part]), sizes[part]


def diffusers_targets(shapes: dict, prefix: str = "diffusion_model.") -> dict:
    """Module name (diffusers, or the released checkpoint's where ComfyUI renames it) -> weight
    key, or `(key, (0, start, rows))` for part of a fused weight, for every table whose `detect`
    key `shapes` (weight key -> shape, or None when unknown: fused parts are then left out) holds."""
    found: dict = {}
    for table in TABLES.values():
        if prefix + table["detect"] not in shapes:
            continue
        for diffusers_name, checkpoint_name, *rows in table["rules"] + table.get("checkpoint_rules", ()):
            pattern = re.compile(re.escape(prefix + checkpoint_name + ".weight").replace(r"\{\}", r"(\d+)"))
            for key, shape in shapes.items():
                match = pattern.fullmatch(key)
                if match is None:
                    continue
                name = diffusers_name.format(*match.groups())
                if not rows:
                    found.setdefault(name, key)
                    continue
                try:
                    start, length = _part_rows(*rows[0], shape[0], shape[1])
                except (ValueError, IndexError, TypeError):
                    continue  # no shape, or not the fused layout this rule describes: leave it unmapped
                found.setdefault(name, (key, (0, start, length)))
    return found


# where a generic state dict keeps the diffusion model's keys (a bare release, a ComfyUI checkpoint)
STATE_DICT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def whole_weight_targets(model_keys) -> dict:
    """diffusers module name -> weight key of a generic state dict, for the table entries that
    are a whole weight (the command line's merge has no row slices)."""
    shapes = dict.fromkeys(model_keys)
    found: dict = {}
    for prefix in STATE_DICT_PREFIXES:
        for name, target in diffusers_targets(shapes, prefix).items():
            if isinstance(target, str):
                found.setdefault(name, target)
    return found
