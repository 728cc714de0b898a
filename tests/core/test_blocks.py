"""Block ids of model keys and adapter module names, architecture detection, per-block norms."""

import math

import pytest
import torch

from lycoris_core import decode_tensors
from lycoris_core.blocks import architecture_blocks, block_id, block_norms, detect_architecture

# -- SD UNet layouts (ldm), written out block by block --------------------------------------
# Each input/output block: the kinds of its sub-layers in order. "res" ResBlock, "attn"
# SpatialTransformer (with its transformer depth), "down" Downsample, "up" Upsample.
SD1_IN = [["conv"], ["res", "attn1"], ["res", "attn1"], ["down"], ["res", "attn1"], ["res", "attn1"], ["down"],
          ["res", "attn1"], ["res", "attn1"], ["down"], ["res"], ["res"]]
SD1_OUT = [["res"], ["res"], ["res", "up"], ["res", "attn1"], ["res", "attn1"], ["res", "attn1", "up"],
           ["res", "attn1"], ["res", "attn1"], ["res", "attn1", "up"], ["res", "attn1"], ["res", "attn1"],
           ["res", "attn1"]]
SDXL_IN = [["conv"], ["res"], ["res"], ["down"], ["res", "attn2"], ["res", "attn2"], ["down"],
           ["res", "attn10"], ["res", "attn10"]]
SDXL_OUT = [["res", "attn10"], ["res", "attn10"], ["res", "attn10", "up"], ["res", "attn2"], ["res", "attn2"],
            ["res", "attn2", "up"], ["res"], ["res"], ["res"]]


def _sub_keys(prefix, kind):
    if kind == "conv":
        return [f"{prefix}.weight", f"{prefix}.bias"]
    if kind == "res":
        return [f"{prefix}.{n}.weight" for n in ("in_layers.2", "emb_layers.1", "out_layers.3", "skip_connection")]
    if kind == "down":
        return [f"{prefix}.op.weight"]
    if kind == "up":
        return [f"{prefix}.conv.weight"]
    depth = int(kind[4:])
    keys = [f"{prefix}.proj_in.weight", f"{prefix}.proj_out.weight"]
    for t in range(depth):
        for n in ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
            keys.append(f"{prefix}.transformer_blocks.{t}.{n}.weight")
    return keys


def ldm_unet_keys(inputs, outputs, middle_depth, sdxl):
    """(key, expected id) for a whole ldm UNet state dict."""
    out = []
    for n, kinds in enumerate(inputs):
        for j, kind in enumerate(kinds):
            prefix = f"diffusion_model.input_blocks.{n}" + ("" if kind == "conv" else f".{j}")
            out += [(k, f"IN{n:02d}") for k in _sub_keys(prefix, kind)]
    for j, kind in enumerate(["res", f"attn{middle_depth}", "res"]):
        out += [(k, "M00") for k in _sub_keys(f"diffusion_model.middle_block.{j}", kind)]
    for n, kinds in enumerate(outputs):
        for j, kind in enumerate(kinds):
            out += [(k, f"OUT{n:02d}") for k in _sub_keys(f"diffusion_model.output_blocks.{n}.{j}", kind)]
    base = ["time_embed.0.weight", "time_embed.2.weight", "out.0.weight", "out.0.bias", "out.2.weight"]
    if sdxl:
        base += ["label_emb.0.0.weight", "label_emb.0.2.weight"]
    out += [(f"diffusion_model.{k}", "BASE") for k in base]
    return out


def diffusers_unet_names(inputs, outputs):
    """(diffusers module name, ldm id) from the same layout: the down/up blocks walk the ldm
    blocks in order, resnets/attentions numbered within a diffusers block."""
    out = [("conv_in", "IN00")]
    n, block = 1, 0
    while n < len(inputs):
        layer = 0
        while n < len(inputs) and inputs[n] != ["down"]:
            for kind in inputs[n]:
                what = "resnets" if kind == "res" else "attentions"
                out.append((f"down_blocks.{block}.{what}.{layer}", f"IN{n:02d}"))
            layer, n = layer + 1, n + 1
        if n < len(inputs):
            out.append((f"down_blocks.{block}.downsamplers.0.conv", f"IN{n:02d}"))
            n += 1
        block += 1
    out += [("mid_block.resnets.0", "M00"), ("mid_block.attentions.0", "M00"), ("mid_block.resnets.1", "M00")]
    for n, kinds in enumerate(outputs):
        block, layer = divmod(n, 3)
        for kind in kinds:
            if kind == "up":
                out.append((f"up_blocks.{block}.upsamplers.0.conv", f"OUT{n:02d}"))
            else:
                out.append((f"up_blocks.{block}.{'resnets' if kind == 'res' else 'attentions'}.{layer}",
                            f"OUT{n:02d}"))
    out += [("conv_out", "BASE"), ("conv_norm_out", "BASE"), ("time_embedding.linear_1", "BASE"),
            ("add_embedding.linear_1", "BASE")]
    return out


LAYOUTS = {"sd1": (SD1_IN, SD1_OUT, 1, False), "sdxl": (SDXL_IN, SDXL_OUT, 10, True)}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_ldm_key_gets_its_block(arch):
    inputs, outputs, depth, sdxl = LAYOUTS[arch]
    pairs = ldm_unet_keys(inputs, outputs, depth, sdxl)
    keys = [k for k, _ in pairs]
    assert detect_architecture(keys) == arch
    ids = architecture_blocks(arch, keys)
    assert {want for _, want in pairs} == set(ids) - {"TE", "TE1", "TE2"}
    for key, want in pairs:
        assert block_id(key, arch) == want, key
        assert block_id("model." + key, arch) == want, key  # checkpoint spelling
        # LBW's underscore form and kohya's ldm form of the same module
        module = key[len("diffusion_model."):].rsplit(".", 1)[0]
        assert block_id("diffusion_model_" + module.replace(".", "_"), arch) == want, key
        assert block_id("lora_unet_" + module.replace(".", "_"), arch) == want, key


def test_block_lists():
    assert architecture_blocks("sd1") == (["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"]
                                          + [f"OUT{i:02d}" for i in range(12)] + ["TE"])
    assert architecture_blocks("sd2") == architecture_blocks("sd1")
    assert architecture_blocks("sdxl") == (["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"]
                                           + [f"OUT{i:02d}" for i in range(9)] + ["TE1", "TE2"])
    flux = architecture_blocks("flux")
    assert flux == (["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["TE1", "TE2"])
    assert architecture_blocks("sd3", ["diffusion_model.joint_blocks.37.x.weight"])[1:4] == ["J00", "J01", "J02"]
    assert len(architecture_blocks("sd3", ["diffusion_model.joint_blocks.37.x.weight"])) == 1 + 38 + 3
    assert architecture_blocks("wan", [f"diffusion_model.blocks.{i}.ffn.0.weight" for i in range(40)])[-2:] == ["B39", "TE"]
    assert architecture_blocks("unknown") == ["BASE", "TE"]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_and_kohya_unet_names(arch):
    inputs, outputs, _, _ = LAYOUTS[arch]
    for name, want in diffusers_unet_names(inputs, outputs):
        assert block_id("lora_unet_" + name.replace(".", "_") + "_proj_in", arch) == want, name  # kohya
        assert block_id("unet." + name + ".proj_in", arch) == want, name  # diffusers / PEFT
        assert block_id("lycoris_" + name.replace(".", "_"), arch) == want, name
        assert block_id("base_model.model." + name + ".to_q", arch) == want, name


def test_diffusers_mapping_by_hand():
    sd1 = {"down_blocks_0_attentions_0": "IN01", "down_blocks_0_attentions_1": "IN02",
           "down_blocks_0_downsamplers_0_conv": "IN03", "down_blocks_1_resnets_0": "IN04",
           "down_blocks_2_attentions_1": "IN08", "down_blocks_2_downsamplers_0_conv": "IN09",
           "down_blocks_3_resnets_0": "IN10", "down_blocks_3_resnets_1": "IN11", "mid_block_attentions_0": "M00",
           "up_blocks_0_resnets_0": "OUT00", "up_blocks_0_upsamplers_0_conv": "OUT02",
           "up_blocks_1_attentions_0": "OUT03", "up_blocks_3_attentions_2": "OUT11", "conv_in": "IN00",
           "time_embedding_linear_1": "BASE", "conv_out": "BASE"}
    for name, want in sd1.items():
        assert block_id(f"lora_unet_{name}", "sd1") == want, name
    sdxl = {"down_blocks_0_resnets_1": "IN02", "down_blocks_1_attentions_0": "IN04",
            "down_blocks_1_downsamplers_0_conv": "IN06", "down_blocks_2_attentions_1": "IN08",
            "up_blocks_0_attentions_0": "OUT00", "up_blocks_1_attentions_2": "OUT05",
            "up_blocks_2_resnets_2": "OUT08", "add_embedding_linear_2": "BASE"}
    for name, want in sdxl.items():
        assert block_id(f"lora_unet_{name}", "sdxl") == want, name


def _attention_lora(arch):
    inputs, outputs, _, _ = LAYOUTS[arch]
    names = [n for n, _ in diffusers_unet_names(inputs, outputs) if ".attentions." in n]
    return [f"lora_unet_{n.replace('.', '_')}_transformer_blocks_0_attn1_to_q" for n in names]


def test_attention_lora_covers_the_lbw_short_layouts():
    # A standard (attention-only) LoRA touches exactly the blocks of LBW's 17 / 12 slot layouts.
    sd1 = {block_id(n, "sd1") for n in _attention_lora("sd1")}
    assert sd1 == {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(3, 12)}
    sdxl = {block_id(n, "sdxl") for n in _attention_lora("sdxl")}
    assert sdxl == {"IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(6)}
    assert detect_architecture(_attention_lora("sd1")) == "sd1"
    assert detect_architecture(n.replace("transformer_blocks_0", "transformer_blocks_1")
                               for n in _attention_lora("sdxl")) == "sdxl"
    assert detect_architecture(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                                "lora_te2_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"


def test_text_encoders():
    assert block_id("clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "sd1") == "TE"
    assert block_id("lora_te_text_model_encoder_layers_3_mlp_fc1", "sd1") == "TE"
    assert block_id("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "sd1") == "TE"
    assert block_id("clip_h.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "sd2") == "TE"
    for key, want in [("clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "TE1"),
                      ("clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "TE2"),
                      ("lora_te1_text_model_encoder_layers_3_mlp_fc1", "TE1"),
                      ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "TE2"),
                      ("text_encoder_2.text_model.encoder.layers.3.mlp.fc1", "TE2"),
                      ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", "TE2"),
                      ("text_encoders.clip_g.transformer.text_model.final_layer_norm.weight", "TE2")]:
        assert block_id(key, "sdxl") == want, key
    assert block_id("t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "flux") == "TE2"
    assert block_id("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "flux") == "TE2"  # kohya Flux T5
    assert block_id("lora_te1_text_model_encoder_layers_0_mlp_fc1", "flux") == "TE1"
    assert block_id("t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "sd3") == "TE3"
    assert block_id("umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "wan") == "TE"
    assert block_id("qwen25_7b.transformer.model.layers.0.mlp.up_proj.weight", "qwen_image") == "TE"
    # a text encoder's `layers.N` is not a Lumina block
    assert block_id("gemma2_2b.transformer.model.layers.3.mlp.up_proj.weight", "lumina") == "TE"


def flux_keys(double=19, single=38):
    keys = []
    for i in range(double):
        keys += [f"diffusion_model.double_blocks.{i}.{n}.weight" for n in
                 ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "txt_attn.qkv", "txt_mlp.2", "img_mod.lin")]
    for i in range(single):
        keys += [f"diffusion_model.single_blocks.{i}.{n}.weight" for n in ("linear1", "linear2", "modulation.lin")]
    keys += [f"diffusion_model.{n}.weight" for n in ("img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer",
                                                     "guidance_in.in_layer", "final_layer.linear",
                                                     "final_layer.adaLN_modulation.1")]
    return keys


def test_flux_keys():
    keys = flux_keys()
    assert detect_architecture(keys + ["clip_l.transformer.text_model.embeddings.token_embedding.weight"]) == "flux"
    ids = architecture_blocks("flux", keys)
    assert ids[1:20] == [f"D{i:02d}" for i in range(19)] and ids[20:58] == [f"S{i:02d}" for i in range(38)]
    for key in keys:
        got = block_id(key, "flux")
        if ".double_blocks." in key:
            assert got == "D%02d" % int(key.split(".")[2])
        elif ".single_blocks." in key:
            assert got == "S%02d" % int(key.split(".")[2])
        else:
            assert got == "BASE", key
    for name, want in [("lycoris_transformer_blocks_3_attn_to_q", "D03"),
                       ("lycoris_single_transformer_blocks_7_attn_to_q", "S07"),
                       ("transformer.single_transformer_blocks.37.proj_out", "S37"),
                       ("transformer.transformer_blocks.18.ff_context.net.2", "D18"),
                       ("lora_unet_double_blocks_3_img_attn_qkv", "D03"),
                       ("lora_unet_single_blocks_10_linear1", "S10"),
                       ("lora_transformer_single_transformer_blocks_0_norm_linear", "S00"),
                       ("transformer.x_embedder", "BASE"), ("lora_unet_final_layer_linear", "BASE")]:
        assert block_id(name, "flux") == want, name
    single_only = [f"lycoris_single_transformer_blocks_{i}_attn_to_q" for i in range(38)]
    assert detect_architecture(single_only) == "flux"
    # a single-blocks-only adapter still has the double-block ids
    assert architecture_blocks("flux", single_only) == architecture_blocks("flux")


@pytest.mark.parametrize("keys, arch", [
    ([f"diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(24)], "sd3"),
    ([f"diffusion_model.blocks.{i}.self_attn.q.weight" for i in range(30)] + ["diffusion_model.head.head.weight"], "wan"),
    ([f"diffusion_model.transformer_blocks.{i}.img_mod.1.weight" for i in range(60)], "qwen_image"),
    ([f"lora_unet_transformer_blocks_{i}_img_mlp_net_0_proj" for i in range(3)], "qwen_image"),
    ([f"diffusion_model.transformer_blocks.{i}.attn1.to_q.weight" for i in range(28)]
     + ["diffusion_model.adaln_single.linear.weight"], "ltx"),
    ([f"diffusion_model.layers.{i}.attention.qkv.weight" for i in range(30)]
     + ["diffusion_model.noise_refiner.0.attention.qkv.weight"], "lumina"),
    (flux_keys() + ["diffusion_model.distilled_guidance_layer.in_proj.weight"], "chroma"),
    (flux_keys(20, 40), "hunyuan_video"),
    (flux_keys(8, 48), "flux2"),
    ([f"transformer.transformer_blocks.{i}.attn.add_q_proj" for i in range(24)], "sd3"),
    ([f"transformer.transformer_blocks.{i}.attn.add_q_proj" for i in range(19)], "flux"),
    ([f"transformer.transformer_blocks.{i}.attn.add_q_proj" for i in range(60)], "qwen_image"),
    (["some.other.weight"], "unknown"),
])
def test_detect_dits(keys, arch):
    assert detect_architecture(keys) == arch


def test_dit_ids():
    assert block_id("diffusion_model.joint_blocks.5.context_block.attn.qkv.weight", "sd3") == "J05"
    assert block_id("transformer.transformer_blocks.5.attn.to_q", "sd3") == "J05"
    assert block_id("diffusion_model.blocks.12.cross_attn.k.weight", "wan") == "B12"
    assert block_id("lora_unet_blocks_12_cross_attn_k", "wan") == "B12"
    assert block_id("diffusion_model.transformer_blocks.59.img_mlp.net.2.weight", "qwen_image") == "T59"
    assert block_id("diffusion_model.layers.3.feed_forward.w1.weight", "z_image") == "L03"
    assert block_id("diffusion_model.context_refiner.0.attention.qkv.weight", "lumina") == "BASE"
    assert block_id("diffusion_model.txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight",
                    "hunyuan_video") == "BASE"
    assert block_id("diffusion_model.double_stream_blocks.3.block.attn1.to_q.weight", "hidream") == "D03"
    assert block_id("diffusion_model.transformer_blocks.3.attn1.to_q.weight", "unknown") == "BASE"
    with pytest.raises(ValueError, match="unknown architecture"):
        block_id("x", "sd9")


def test_block_norms():
    gen = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    layers = {"lora_unet_down_blocks_1_attentions_0_proj_in": ("IN04", 2.0),
              "lora_unet_input_blocks_4_1_proj_out": ("IN04", 4.0),
              "lora_unet_mid_block_attentions_0_proj_in": ("M00", 1.0),
              "lora_unet_time_embedding_linear_1": ("BASE", 8.0),
              "lora_te_text_model_encoder_layers_0_mlp_fc1": ("TE", 4.0)}
    for name, (block, alpha) in layers.items():
        up, down = torch.randn(6, 4, generator=gen), torch.randn(4, 5, generator=gen)
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(alpha)})
        expected[block] = expected.get(block, 0.0) + float(((alpha / 4) * up @ down).square().sum())
    tensors["lora_unet_up_blocks_1_attentions_0_proj_in.weight"] = torch.randn(6, generator=gen)  # IA3
    tensors["lora_unet_up_blocks_1_attentions_0_proj_in.on_input"] = torch.tensor(False)
    adapter_file = decode_tensors(tensors)
    norms = block_norms(adapter_file, None, "sd1")
    assert list(norms) == architecture_blocks("sd1")
    for block in norms:
        assert norms[block] == pytest.approx(math.sqrt(expected.get(block, 0.0)), rel=1e-5), block
    assert norms.layers == {"IN04": 2, "M00": 1, "BASE": 1, "TE": 1}
    assert norms.skipped == ["lora_unet_up_blocks_1_attentions_0_proj_in"]
    assert block_norms(adapter_file, None, "auto").architecture == "sd1"
