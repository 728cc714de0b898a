"""Resize / DyLoRA slice / combine nodes: files from the loras folder to a new, sanitised file there."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import lycoris_file, tiny_sd15


@pytest.fixture
def loras(pack, tmp_path):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)
    return tmp_path


def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def test_resize_node_writes_a_lower_rank_file(pack, loras):
    from lycoris_pack.lycoris_core import load_adapter_file

    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, loras / "big.safetensors", "lora_unet_", "lora", linear_dim=8,
                 linear_alpha=4)
    out = _node(pack, "LycorisResize").run("big.safetensors", "fixed", 2, 0.0, "../small")
    report = out["result"][0]
    written = loras / "small.safetensors"  # the '../' never leaves the loras folder
    assert written.is_file() and not (loras.parent / "small.safetensors").exists(), report
    assert load_adapter_file(written).ranks() == [2]
    assert "relative error" in report and out["ui"]["text"] == [report]


def test_combine_node_is_exact_by_concatenation(pack, loras):
    from lycoris_pack.lycoris_core import load_adapter_file, merge_into_state_dict

    model = tiny_sd15()
    root = model.model.diffusion_model
    lycoris_file(root, loras / "a.safetensors", "lora_unet_", "lora", seed=1)
    lycoris_file(root, loras / "b.safetensors", "lora_unet_", "lora", seed=2)
    _node(pack, "LycorisCombine").run("a.safetensors", 0.5, "b.safetensors", -1.2, "none", 1.0, 0, "ab")
    base = {k: v.clone() for k, v in root.state_dict().items()}
    one, _ = merge_into_state_dict(base, [(load_adapter_file(loras / "ab.safetensors"), 1.0)])
    two, _ = merge_into_state_dict(base, [(load_adapter_file(loras / "a.safetensors"), 0.5),
                                          (load_adapter_file(loras / "b.safetensors"), -1.2)])
    for key in base:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_combine_node_writes_a_plain_lora_that_comfyuis_own_lora_loader_takes(pack, loras, dtype):
    """LoKr + LoHa -> 'plain lora': every key is one ComfyUI's LoraLoader applies as a LoRA patch (the only
    kind Nunchaku's SVDQuant patchers accept), and the patched weights are the two inputs' at full rank."""
    import comfy.sd
    import comfy.utils
    from lycoris_pack.lycoris_core import load_adapter_file, merge_into_state_dict
    from lycoris_pack.nodes.weights import patched_weight

    model = tiny_sd15()
    root = model.model.diffusion_model
    lycoris_file(root, loras / "k.safetensors", "lora_unet_", "lokr", seed=1, factor=4)
    lycoris_file(root, loras / "h.safetensors", "lora_unet_", "loha", seed=2)
    out = _node(pack, "LycorisCombine").run("k.safetensors", 0.8, "none", 1.0, "none", 1.0, 0, "plain",
                                            lora_stack=[("h.safetensors", -0.5, 1.0)], output="plain lora",
                                            dtype=dtype)
    report = out["result"][0]
    tensors = comfy.utils.load_torch_file(str(loras / "plain.safetensors"), safe_load=True)
    assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in tensors), report
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {getattr(torch, {"fp32": "float32",
                                                                                            "fp16": "float16"}[dtype])}
    assert "relative error: mean" in report and "rank min" in report
    theirs, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0)
    modules = load_adapter_file(loras / "plain.safetensors").adapters
    assert len(theirs.patches) == len(modules) > 0  # nothing "not loaded"
    for entries in theirs.patches.values():
        adapter = entries[-1][1]
        assert (adapter[0] if isinstance(adapter, tuple) else type(adapter).__name__) in ("lora", "LoRAAdapter")
    base = {k: v.detach().clone() for k, v in root.state_dict().items()}
    expected, _ = merge_into_state_dict(base, [(load_adapter_file(loras / "k.safetensors"), 0.8),
                                               (load_adapter_file(loras / "h.safetensors"), -0.5)])
    tolerance = 1e-5 if dtype == "fp32" else 2e-3  # the report's own bound after rounding to fp16
    for key in theirs.patches:
        inner = key[len("diffusion_model."):]
        change = (expected[inner] - base[inner]).norm()
        error = (patched_weight(theirs, key).float() - expected[inner]).norm()
        assert float(error / change) < tolerance, key


def test_combine_node_plain_lora_of_a_dora_needs_the_base_model(pack, loras):
    """DoRA renormalises by the base weight: refused by name without `model`, exact for that model with it."""
    from lycoris_pack.lycoris_core import load_adapter_file, merge_into_state_dict

    model = tiny_sd15()
    root = model.model.diffusion_model
    lycoris_file(root, loras / "d.safetensors", "lora_unet_", "lora", seed=3, dora_wd=True)
    node = _node(pack, "LycorisCombine")
    with pytest.raises(ValueError, match=r"d\.safetensors: lora_unet_\S+ \(lora with DoRA.*base"):
        node.run("d.safetensors", 1.0, "none", 1.0, "none", 1.0, 0, "dplain", output="plain lora")
    assert not (loras / "dplain.safetensors").exists()
    node.run("d.safetensors", 0.7, "none", 1.0, "none", 1.0, 0, "dplain", output="plain lora", dtype="fp32",
             model=model)
    base = {k: v.detach().clone() for k, v in root.state_dict().items()}
    plain = load_adapter_file(loras / "dplain.safetensors")
    assert {a.algo for a in plain.adapters.values()} == {"lora"} and not any(a.has_dora for a in plain.adapters.values())
    ours, _ = merge_into_state_dict(base, [(plain, 1.0)])
    expected, _ = merge_into_state_dict(base, [(load_adapter_file(loras / "d.safetensors"), 0.7)])
    changed = [k for k in base if not torch.equal(expected[k], base[k])]
    assert changed
    for key in changed:
        assert float((ours[key] - expected[key]).norm() / (expected[key] - base[key]).norm()) < 1e-5, key


def test_dylora_slice_node_names_its_alpha_policy(pack, loras):
    from lycoris_pack.lycoris_core import load_adapter_file

    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(8, 16, generator=g),
               "lora_unet_x.lora_up.weight": torch.randn(32, 8, generator=g), "lora_unet_x.alpha": torch.tensor(4.0)}
    save_file(tensors, str(loras / "dy.safetensors"),
              {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "2"})})
    report = _node(pack, "LycorisDyLoRASlice").run("dy.safetensors", 4, "kohya-extractor", "dy4")["result"][0]
    sliced = load_adapter_file(loras / "dy4.safetensors")
    assert sliced.ranks() == [4] and sliced.adapters["lora_unet_x"].alpha == 4.0
    assert "kohya-extractor" in json.dumps(sliced.metadata) or "kohya-extractor" in report
    with pytest.raises(ValueError, match="DyLoRA slice"):
        _node(pack, "LycorisDyLoRASlice").run("dy.safetensors", 3, "trainer", "dy3")  # not a multiple of unit


def test_extract_node_writes_lokr(pack, loras):
    from lycoris_pack.lycoris_core import load_adapter_file

    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, loras / "p.safetensors", "lora_unet_", "lora")
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    tuned = loader.load(model, "p.safetensors", 1.0, "merge")["result"][0]
    _node(pack, "LycorisExtract").run(model, tuned, "fixed", 4, 0, 0.0, False, "kron", algo="lokr", factor=4)
    assert set(load_adapter_file(loras / "kron.safetensors").algorithms()) == {"lokr"}


def test_extract_node_recovers_a_loaded_lora(pack, loras, tmp_path):
    """Base model vs the same model with a LoRA loaded upstream: the extracted file, loaded on
    the base, gives back the tuned weights (fp16 output: within fp16 rounding of the delta)."""
    from lycoris_pack.nodes.weights import patched_weight

    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, loras / "planted.safetensors", "lora_unet_", "locon",
                 conv_dim=4, conv_alpha=2)
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    tuned = loader.load(model, "planted.safetensors", 1.0, "merge")["result"][0]
    report = _node(pack, "LycorisExtract").run(model, tuned, "fixed", 8, 8, 0.0, False, "extracted")["result"][0]
    assert (loras / "extracted.safetensors").is_file(), report
    reloaded = loader.load(model, "extracted.safetensors", 1.0, "merge")["result"][0]
    assert "0 unmatched" in loader.load(model, "extracted.safetensors", 1.0, "merge")["result"][1]
    worst = 0.0
    for key in tuned.patches:
        want, got, base = patched_weight(tuned, key), patched_weight(reloaded, key), model.model.state_dict()[key]
        worst = max(worst, float((got - want).norm() / (want - base).norm()))
    assert worst < 2e-3, (worst, report)


def test_rank_and_alpha_patterns_on_the_nodes(pack, loras):
    """PEFT-style per-layer patterns: one REGEX=NUMBER per line, first match wins, 0 skips a layer."""
    from lycoris_pack.lycoris_core import load_adapter_file

    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, loras / "src.safetensors", "lora_unet_", "lora", linear_dim=8,
                 linear_alpha=4)
    _node(pack, "LycorisResize").run("src.safetensors", "fixed", 2, 0.0, "patterned",
                                     rank_pattern="attn2.to_k=6\n\nproj_out=0")
    adapters = load_adapter_file(loras / "patterned.safetensors").adapters
    assert {a.rank for n, a in adapters.items() if n.endswith("attn2_to_k")} == {6}
    assert not any(n.endswith("proj_out") for n in adapters)
    assert {a.rank for n, a in adapters.items() if n.endswith("attn1_to_q")} == {2}
    loader = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    tuned = loader.load(model, "src.safetensors", 1.0, "merge")["result"][0]
    _node(pack, "LycorisExtract").run(model, tuned, "fixed", 4, 0, 0.0, False, "ex", rank_pattern="to_v=1",
                                      alpha_pattern="to_v=0.5")
    extracted = load_adapter_file(loras / "ex.safetensors")
    to_v = [a for n, a in extracted.adapters.items() if n.endswith("to_v")]
    assert to_v and all(a.rank == 1 and abs(a.alpha - 0.5) < 1e-6 for a in to_v)
    with pytest.raises(ValueError, match="rank_pattern 'to_v=x'"):
        _node(pack, "LycorisResize").run("src.safetensors", "fixed", 2, 0.0, "bad", rank_pattern="to_v=x")
