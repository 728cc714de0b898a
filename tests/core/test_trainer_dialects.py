"""Trainer dialects the reader must decode as trained, and the coverage groups of a load.

OneTrainer's OFT_2 ("scaled OFT"): OneTrainer's OFTRotationModule is PEFT's OFT v2 rotation with
its stored `oft_R` divided by 2 sqrt(bs - 1) before the Cayley-Neumann series, flagged by a boolean
`oft_R.scaled_oft` buffer. No OneTrainer here: the oracle is PEFT's own OFT layer
(`merge_and_unload`) holding the divided parameters, and the file is built as OneTrainer names it
(`<module>.oft_R.weight` + `<module>.oft_R.scaled_oft`).
"""

from __future__ import annotations

import math

import pytest
import torch

from lycoris_core import decode_tensors
from lycoris_core.matching import match_generic
from lycoris_core.reader import trainer_notes


def _peft_oft_merged(block_size: int, features: int, seed: int):
    """(base weight, PEFT's merged weight, PEFT's oft_R parameter) for one Linear."""
    import peft

    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(features, 12))
    base = model.proj.weight.detach().clone()
    config = peft.OFTConfig(r=0, oft_block_size=block_size, target_modules=["proj"], init_weights=False)
    wrapped = peft.get_peft_model(model, config)
    parameter = next(p for n, p in wrapped.named_parameters() if "oft_R" in n)
    with torch.no_grad():
        parameter.normal_(0, 0.2)
    stored = parameter.detach().clone()
    merged = wrapped.merge_and_unload().state_dict()["proj.weight"]
    return base, merged, stored


@pytest.mark.parametrize("block_size", [4, 8])
def test_onetrainer_scaled_oft_is_peft_oft_on_the_divided_parameters(block_size):
    base, merged, stored = _peft_oft_merged(block_size, 16, seed=block_size)
    scale = 2 * math.sqrt(block_size - 1)
    onetrainer = {"proj.oft_R.weight": stored * scale, "proj.oft_R.scaled_oft": torch.tensor(True)}
    adapter_file = decode_tensors(onetrainer, path="onetrainer_oft.safetensors")
    assert adapter_file.unknown_keys == [] and list(adapter_file.adapters) == ["proj"]
    patched, _ = adapter_file.adapters["proj"].patch(base, 1.0)
    torch.testing.assert_close(patched, merged, rtol=1e-5, atol=1e-6)
    # the same file without the flag is read as plain PEFT OFT: a different (stronger) rotation
    plain = decode_tensors({"proj.oft_R.weight": stored * scale}).adapters["proj"].patch(base, 1.0)[0]
    assert not torch.allclose(plain, merged, atol=1e-4)


def test_trainer_notes_show_simpletuner_and_diffusers_metadata():
    metadata = {"lycoris_config": '{"algo": "lokr", "factor": 16, "linear_dim": 10000, "full_matrix": true}',
                "trained_words": "ohwx man,  red car ,", "lora_adapter_metadata": '{"transformer.r": 4, '
                '"transformer.lora_alpha": 8}'}
    adapter_file = decode_tensors({"transformer.x.lora_A.weight": torch.ones(4, 3),
                                   "transformer.x.lora_B.weight": torch.ones(5, 4)}, metadata)
    notes = trainer_notes(adapter_file.metadata, adapter_file.context.peft_config)
    assert notes == ['LyCORIS config: algo="lokr", factor=16, linear_dim=10000, full_matrix=true',
                     "trained words: ohwx man, red car",
                     "PEFT config from lora_adapter_metadata: r=4, lora_alpha=8"]
    assert adapter_file.adapters["transformer.x"].scale == pytest.approx(2.0)  # alpha / r from the header
    assert trainer_notes({"lycoris_config": "not json", "trained_words": " "}) == []


def test_two_modules_for_one_layer_report_which_was_applied():
    tensors = {}
    for name in ("lycoris_lin", "lora_unet_lin", "lycoris_other"):
        tensors[f"{name}.lora_up.weight"] = torch.ones(4, 1)
        tensors[f"{name}.lora_down.weight"] = torch.ones(1, 3)
    coverage = match_generic(decode_tensors(tensors, path="dup.safetensors"), ["lin.weight", "other.weight"])
    assert coverage.matched == {"lycoris_lin": "lin.weight", "lycoris_other": "other.weight"}
    assert coverage.duplicates == ["lora_unet_lin: lin.weight is already patched by lycoris_lin (applied); "
                                   "this one left out"]
    assert not coverage.complete
    lines = coverage.lines()
    assert "2/3 modules matched, 0 unmatched, 0 keys not understood, 0 modules with errors, 1 duplicates" in lines[0]
    assert lines[1:] == ["  duplicate: a layer or rows another module already patches (1):",
                         "    " + coverage.duplicates[0]]


def test_command_line_matching_knows_diffusers_names_of_whole_weights():
    """A released Wan checkpoint (original names, as `merge --base` reads it) and a SimpleTuner file
    (diffusers names): whole weights match through the name tables, including Wan's norm2/norm3
    swap; a fused-row slice (HunyuanVideo's linear1) is not guessed, it stays unmatched."""
    keys = ["model.diffusion_model.head.modulation", "model.diffusion_model.blocks.0.self_attn.q.weight",
            "model.diffusion_model.blocks.0.cross_attn.k_img.weight", "model.diffusion_model.blocks.0.norm3.weight",
            "model.diffusion_model.blocks.0.ffn.0.weight"]
    tensors = {}
    for name in ("lycoris_blocks_0_attn1_to_q", "lycoris_blocks_0_attn2_add_k_proj", "lycoris_blocks_0_ffn_net_0_proj",
                 "lora_unet_blocks_0_self_attn_q"):
        tensors[f"{name}.lora_up.weight"] = torch.ones(4, 1)
        tensors[f"{name}.lora_down.weight"] = torch.ones(1, 4)
    tensors["lycoris_blocks_0_norm2.diff"] = torch.ones(4)
    coverage = match_generic(decode_tensors(tensors, path="wan.safetensors"), keys)
    assert coverage.matched == {
        "lycoris_blocks_0_attn1_to_q": "model.diffusion_model.blocks.0.self_attn.q.weight",
        "lycoris_blocks_0_attn2_add_k_proj": "model.diffusion_model.blocks.0.cross_attn.k_img.weight",
        "lycoris_blocks_0_ffn_net_0_proj": "model.diffusion_model.blocks.0.ffn.0.weight",
        "lycoris_blocks_0_norm2": "model.diffusion_model.blocks.0.norm3.weight",
    }
    assert [line.split(":")[0] for line in coverage.duplicates] == ["lora_unet_blocks_0_self_attn_q"]
    hunyuan = ["txt_in.individual_token_refiner.blocks.0.norm1.weight", "single_blocks.0.linear1.weight",
               "single_blocks.0.linear2.weight"]
    sliced = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(1, 4),
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 1),
              "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.ones(1, 4),
              "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.ones(4, 1)}
    coverage = match_generic(decode_tensors(sliced, path="hv.safetensors"), hunyuan)
    assert coverage.matched == {"transformer.single_transformer_blocks.0.proj_out": "single_blocks.0.linear2.weight"}
    assert coverage.unmatched == ["transformer.single_transformer_blocks.0.attn.to_q"]


def test_wan_distillation_keys_merge_into_a_generic_state_dict():
    """lightx2v/Wan 2.1 I2V distillation keys on a Wan T2V state dict (the command line's generic
    matching): `diff_m` changes the block's and the head's `modulation` parameter, `diff_b` beside
    LoRA factors the layer's bias, `diff` a norm's weight; the I2V-only layers are "not in this
    model", not unmatched."""
    from lycoris_core import merge_into_state_dict

    g = torch.Generator().manual_seed(0)
    dim, rank = 8, 2
    base = {"blocks.0.modulation": torch.randn(1, 6, dim, generator=g),
            "blocks.0.self_attn.q.weight": torch.randn(dim, dim, generator=g),
            "blocks.0.self_attn.q.bias": torch.randn(dim, generator=g),
            "blocks.0.cross_attn.norm_k.weight": torch.randn(dim, generator=g),
            "head.modulation": torch.randn(1, 2, dim, generator=g),
            "head.head.weight": torch.randn(4, dim, generator=g),
            "head.head.bias": torch.randn(4, generator=g)}
    t = {name: torch.randn(shape, generator=g) * 0.1 for name, shape in {
        "diffusion_model.blocks.0.diff_m": (1, 6, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (rank, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (dim, rank),
        "diffusion_model.blocks.0.self_attn.q.diff_b": (dim,),
        "diffusion_model.blocks.0.cross_attn.norm_k.diff": (dim,),
        "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": (rank, dim),
        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": (dim, rank),
        "diffusion_model.blocks.0.cross_attn.k_img.diff_b": (dim,),
        "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": (dim,),
        "diffusion_model.img_emb.proj.1.diff_b": (dim,),
        "diffusion_model.head.diff_m": (1, 2, dim),
        "diffusion_model.head.head.diff_b": (4,),
    }.items()}
    adapter_file = decode_tensors(t)
    assert adapter_file.unknown_keys == [] and adapter_file.problems == []
    merged, (coverage,) = merge_into_state_dict(base, [(adapter_file, 0.5)])
    assert coverage.unmatched == [] and coverage.problems == []
    assert sorted(line.split(" ")[0] for line in coverage.absent) == [
        "diffusion_model.blocks.0.cross_attn.k_img", "diffusion_model.blocks.0.cross_attn.norm_k_img",
        "diffusion_model.img_emb.proj.1"]
    assert any("not in this model (I2V-only" in line for line in coverage.lines())
    p = "diffusion_model."
    expected = {
        "blocks.0.modulation": base["blocks.0.modulation"] + 0.5 * t[p + "blocks.0.diff_m"],
        "blocks.0.self_attn.q.weight": base["blocks.0.self_attn.q.weight"]
        + 0.5 * t[p + "blocks.0.self_attn.q.lora_up.weight"] @ t[p + "blocks.0.self_attn.q.lora_down.weight"],
        "blocks.0.self_attn.q.bias": base["blocks.0.self_attn.q.bias"] + 0.5 * t[p + "blocks.0.self_attn.q.diff_b"],
        "blocks.0.cross_attn.norm_k.weight": base["blocks.0.cross_attn.norm_k.weight"]
        + 0.5 * t[p + "blocks.0.cross_attn.norm_k.diff"],
        "head.modulation": base["head.modulation"] + 0.5 * t[p + "head.diff_m"],
        "head.head.weight": base["head.head.weight"],  # a bias delta alone leaves the weight as it is
        "head.head.bias": base["head.head.bias"] + 0.5 * t[p + "head.head.diff_b"],
    }
    for key, want in expected.items():
        torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-6, msg=key)


def test_wan_distillation_keys_survive_combine_with_their_names():
    """Combine writes `diff_m` back under its own key (`blocks.N.diff_m`) scaled by the input's weight,
    and keeps a LoRA's `diff_b` (the exact path copies it; weighted, the layer is materialised with it)."""
    from lycoris_core.combine import combine

    g = torch.Generator().manual_seed(1)
    t = {"diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 8, generator=g),
         "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, 8, generator=g),
         "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(8, 2, generator=g),
         "diffusion_model.blocks.0.ffn.0.diff_b": torch.randn(8, generator=g)}
    source = decode_tensors(t)
    for weight in (1.0, 0.5):
        result = combine([(source, weight)], dtype="fp32")
        again = decode_tensors(result.tensors)
        assert "diffusion_model.blocks.0.diff_m" in result.tensors and again.unknown_keys == []
        torch.testing.assert_close(again.adapters["diffusion_model.blocks.0.modulation"].t("diff_m"),
                                   weight * t["diffusion_model.blocks.0.diff_m"])
        ffn = again.adapters["diffusion_model.blocks.0.ffn.0"]
        torch.testing.assert_close(ffn.bias_delta(torch.zeros(8)), weight * t["diffusion_model.blocks.0.ffn.0.diff_b"])
        up, down = t["diffusion_model.blocks.0.ffn.0.lora_up.weight"], t["diffusion_model.blocks.0.ffn.0.lora_down.weight"]
        torch.testing.assert_close(ffn.patch(torch.zeros(8, 8))[0], weight * up @ down, rtol=1e-5, atol=1e-6)
