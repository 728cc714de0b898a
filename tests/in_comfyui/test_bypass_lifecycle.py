"""What bypass keeps between calls, and what it leaves behind.

- DoRA's per-channel scale is cached per weight: the cache must hold exactly while the weight the
  layer computes with keeps its values, whoever changes it (ComfyUI replacing a patched Parameter on
  a full load, cast-time patches on a partial load), with the model loaded under inference mode as
  the executor loads it (its tensors keep no version counter).
- Eject: ComfyUI's own bypass LoRA after ours on the same layers restores, on its eject, the forward
  it replaced (ours): that forward must then run the plain layer, never our adapter.
- Memory: the adapters' device copies and caches go when the model is unloaded.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import lycoris_file, tiny_sd15

CPU = torch.device("cpu")


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 3, 64, generator=g)


def _run(patcher, partial=False):
    x, t, context = _inputs()
    if partial:
        if hasattr(patcher, "patch_model_lowvram"):
            patcher.patch_model_lowvram(CPU, lowvram_model_memory=1)
        else:
            patcher.patch_model(CPU, lowvram_model_memory=1)
    else:
        patcher.patch_model()
    try:
        return patcher.model.diffusion_model(x, t, context=context).float()
    finally:
        patcher.unpatch_model()


def _ours(pack, model, name, mode="bypass", strength=0.9):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, name, strength, mode)["result"][0]


def _core(model, lora, strength):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]


@pytest.fixture
def files(comfy, tmp_path):
    """The tiny SD1.5 model, a LyCORIS DoRA and a plain LoRA for ComfyUI's own loader (same layers)."""
    from comfyui_runtime import use_loras_folder
    from safetensors.torch import load_file

    use_loras_folder(tmp_path)
    model = tiny_sd15()
    unet = model.model.diffusion_model
    lycoris_file(unet, tmp_path / "dora.safetensors", "lora_unet_", "lora", dora_wd=True, target_module=("Linear",))
    lycoris_file(unet, tmp_path / "lora.safetensors", "lora_unet_", "lora", seed=4, target_module=("Linear",))
    return model, load_file(str(tmp_path / "lora.safetensors"))


@pytest.mark.parametrize("partial", [False, True], ids=["full_load", "partial_load"])
def test_dora_scale_follows_the_weight_another_loader_patches(pack, files, partial):
    """Ours (DoRA, bypass) then ComfyUI's LoraLoader on the same layers at two strengths: the two
    clones share our plan and its cache, yet each must equal a fresh load (no cache) of the same
    stack. Full load: ComfyUI replaces each patched Parameter; partial load: the patch is applied
    to a cast copy in the forward (weight_function), the stored weight never changes."""
    model, lora = files
    if partial and hasattr(model, "patch_model_lowvram"):
        pytest.skip("the March-2024 runtime's partial load is not repeatable with ComfyUI's own LoRA alone "
                    "(it hands each bias its weight's patches): no oracle")
    ours = _ours(pack, model, "dora.safetensors")
    outputs = [_run(_core(ours, lora, strength), partial) for strength in (0.3, 1.2, 0.3)]
    fresh = [_run(_core(_ours(pack, model, "dora.safetensors"), lora, strength), partial) for strength in (0.3, 1.2)]
    assert float((fresh[1] - fresh[0]).norm()) > 1e-3 * float(fresh[0].norm()), "the two strengths differ too little"
    for got, expected in zip(outputs, fresh + fresh[:1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_dora_scale_is_computed_once_per_weight(pack, files, monkeypatch, bypass_form):
    """...and is kept while the weight holds: in the factored form, the second and third calls
    compute no norm (the patched form merges DoRA into its transient weight every call)."""
    import importlib

    bypass_form("factored")
    base = importlib.import_module(f"{pack.__name__}.lycoris_core.algos.base")
    model, _ = files
    ours = _ours(pack, model, "dora.safetensors")
    calls = []
    real = base.dora_channel_scale
    monkeypatch.setattr(base, "dora_channel_scale", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours.patch_model()
    try:
        x, t, context = _inputs()
        counts = []
        for _ in range(3):
            ours.model.diffusion_model(x, t, context=context)
            counts.append(len(calls))
    finally:
        ours.unpatch_model()
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts


def _injected_plan(pack, patcher):
    bypass = __import__(f"{pack.__name__}.nodes.bypass", fromlist=["INJECTION_KEY"])
    injections = patcher.get_injections(bypass.INJECTION_KEY) or []
    return injections[0].plan


def test_comfyui_bypass_after_ours_never_resurrects_our_forward(pack, files):
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no bypass LoRA loader of its own (ComfyUI >= 0.8)")
    model, lora = files
    plain = _run(model)
    ours = _ours(pack, model, "dora.safetensors")
    alone = _run(ours)
    both = comfy.sd.load_bypass_lora_for_models(ours, None, lora, 1.0, 0)[0]
    stacked = _run(both)
    assert float((stacked - alone).norm()) > 0, "ComfyUI's bypass LoRA did not apply"
    torch.testing.assert_close(_run(model), plain, rtol=0, atol=0)  # the checkpoint's other users: plain
    torch.testing.assert_close(_run(ours), alone, rtol=0, atol=0)  # and ours applies again where asked


def test_device_copies_are_released_with_the_model(pack, files):
    if not hasattr(tiny_sd15(), "set_injections"):
        pytest.skip("the March-2024 runtime has no injections: its object patches keep their copies with the patcher")
    model, _ = files
    ours = _ours(pack, model, "dora.safetensors")
    plan = _injected_plan(pack, ours)
    ours.patch_model()
    try:
        x, t, context = _inputs()
        ours.model.diffusion_model(x, t, context=context)
        assert plan._staged, "no device copy was made"
    finally:
        ours.unpatch_model()
    assert not plan._staged, "device copies outlived the unload"
