"""Merge patches through ComfyUI's own memory manager equal the full load, for every algorithm.

ComfyUI 0.28 loads patched weights three ways besides the full load: `LowVramPatch` staging
(`memory_required()` -> `prepare(buffer)` rebuilds each weight adapter as
`type(a)(a.loaded_keys, a.weights)` around copies in a byte buffer, then calculates), partial
loading under a memory budget (modules over the budget patch their weight in their forward), and
dynamic VRAM (`ModelPatcherDynamic`, the default on NVIDIA GPUs). Files are written by
lycoris-lora; the oracle is the same patcher loaded in full (`patched_weight` / `patch_model`).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import load_diffusion_model, lycoris_file, tiny_sd15, unet_output, write_tiny_flux

CONV = {"conv_dim": 4, "conv_alpha": 2}
CASES = {  # case -> lycoris-lora create_lycoris arguments
    "lora": {},
    "locon": CONV,
    "locon_tucker": {"algo": "locon", **CONV, "use_tucker": True},
    "loha": CONV,
    "loha_tucker": {"algo": "loha", **CONV, "use_tucker": True},
    "lokr": {"factor": 4, "conv_dim": 2, "conv_alpha": 1},
    "lokr_full_matrix": {"algo": "lokr", "factor": 4, "full_matrix": True},
    "ia3": {},
    "dora": {"algo": "lora", "dora_wd": True},
    "glora": CONV,
    "full": {},
    "diag_oft": {"algo": "diag-oft", "rescaled": True, "constraint": 1e-3},
    "boft": {"algo": "boft"},
    "norm": {"algo": "lora", "train_norm": True},
}
LINEAR_CASES = ("lora", "loha", "lokr", "ia3", "dora", "glora", "full", "diag_oft", "boft")
CPU = torch.device("cpu")
FUSED = ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight")


def _loaded(pack, patcher, path):
    """`path` loaded by the pack's Load LyCORIS (model only, merge mode) on `patcher`."""
    from comfyui_runtime import use_loras_folder
    from lycoris_pack.nodes import cache

    use_loras_folder(path.parent)
    cache.clear()
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    new_model, report = node.load(patcher, path.name, 0.8, "merge")["result"][:2]
    assert new_model.patches and "0 unmatched" in report, report
    return new_model


def _sd15_case(pack, tmp_path, case):
    kwargs = dict(CASES[case])
    algo = kwargs.pop("algo", case)
    model = tiny_sd15()
    targets = ("Linear", "Conv2d", "GroupNorm", "LayerNorm") if case == "norm" else ("Linear", "Conv2d")
    path = tmp_path / "loras" / f"{case}.safetensors"
    path.parent.mkdir()
    lycoris_file(model.model.diffusion_model, path, "lora_unet_", algo, target_module=targets, **kwargs)
    return _loaded(pack, model, path)


class _AttentionSlices(torch.nn.Module):
    """Flux's q/k/v and MLP-in projections as separate Linears, named as diffusers names them, so
    lycoris-lora writes SimpleTuner-style `lycoris_transformer_blocks_0_attn_to_q` files whose
    layers land on slices of ComfyUI's fused `qkv` and `linear1` weights."""

    def __init__(self, hidden=256, mlp=1024):
        super().__init__()
        attn = torch.nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(attn, name, torch.nn.Linear(hidden, hidden))
        double = torch.nn.Module()
        double.attn = attn
        single = torch.nn.Module()
        single.proj_mlp = torch.nn.Linear(hidden, mlp)
        self.transformer_blocks = torch.nn.ModuleList([double])
        self.single_transformer_blocks = torch.nn.ModuleList([single])


def _flux_case(pack, tmp_path, case):
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "Flux"):
        pytest.skip("this ComfyUI has no Flux model class")
    kwargs = dict(CASES[case])
    algo = kwargs.pop("algo", case)
    write_tiny_flux(tmp_path / "diffusion_models" / "tiny_flux.safetensors")
    patcher = load_diffusion_model(tmp_path / "diffusion_models", "tiny_flux.safetensors")
    path = tmp_path / "loras" / f"{case}.safetensors"
    path.parent.mkdir()
    lycoris_file(_AttentionSlices(), path, "lycoris_", algo, target_module=("Linear",), **kwargs)
    new_model = _loaded(pack, patcher, path)
    assert all(len(new_model.patches[key]) == count for key, count in zip(FUSED, (3, 1))), new_model.patches.keys()
    return new_model


def _full_load(patcher, key, dtype=torch.float32):
    """The weight a full load computes: ComfyUI's calculate_weight on an fp32 copy of the stored
    weight (rounded to `dtype` first: a model stored in that dtype), cast back once."""
    import comfy.lora

    weight = patcher.model.state_dict()[key].to(dtype).to(torch.float32, copy=True)
    return comfy.lora.calculate_weight(patcher.patches[key], weight, key).to(dtype)


def _staged(patcher, key, order):
    """A LowVramPatch for `key` whose patches were rebuilt around copies in a byte buffer, in the
    order of one of ComfyUI's callers; returns (patch, buffer)."""
    from comfy.model_patcher import LowVramPatch

    patch = LowVramPatch(key, patcher.patches)
    size = patch.memory_required()
    assert size > 0, "no tensor of the patch is staged: it would keep computing from the originals"
    buffer = torch.full((size,), 0xFF, dtype=torch.uint8)  # NaN bytes: unstaged data would show
    if order == "prefetch":  # a prepared copy, as ModelPatcher's prefetch stages it
        patch.prepare(buffer, None, copy=True, commit=True)
    else:  # comfy/ops.py cast_modules_with_vbar: views committed first, bytes copied in afterwards
        patch.prepare(buffer, None, copy=False, commit=True)
        patch.prepare(buffer, None, copy=True, commit=False)
    low, high = buffer.data_ptr(), buffer.data_ptr() + size
    for prepared in patch.prepared_patches:
        tensors = [t for t in prepared[1].weights if isinstance(t, torch.Tensor)]
        assert tensors and all(low <= t.data_ptr() < high for t in tensors), "a rebuilt patch reads outside the buffer"
    return patch, buffer


def _skip_without_staging():
    import comfy.model_patcher

    if not hasattr(getattr(comfy.model_patcher, "LowVramPatch", None), "prepare"):
        pytest.skip("this ComfyUI stages no patches (no LowVramPatch.prepare; it patches with tuples)")


def _check_staged(patcher, keys):
    from lycoris_pack.nodes.patches import LycorisWeightPatch

    for key in keys:
        assert all(isinstance(p[1], LycorisWeightPatch) for p in patcher.patches[key]), key
        for dtype in (torch.float32, torch.bfloat16):
            expected = _full_load(patcher, key, dtype)
            for order in ("prefetch", "dynamic"):
                patch, _ = _staged(patcher, key, order)
                # LowVramPatch hands calculate_weight the weight's own dtype as intermediate dtype
                got = patch(patcher.model.state_dict()[key].to(dtype, copy=True))
                assert got.dtype == dtype and torch.equal(got, expected), (key, dtype, order)


@pytest.mark.parametrize("case", sorted(CASES))
def test_staged_patches_equal_the_full_load(pack, tmp_path, case):
    _skip_without_staging()
    patcher = _sd15_case(pack, tmp_path, case)
    _check_staged(patcher, sorted(patcher.patches))


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_staged_patches_on_fused_slices_equal_the_full_load(pack, tmp_path, case):
    _skip_without_staging()
    patcher = _flux_case(pack, tmp_path, case)
    _check_staged(patcher, sorted(patcher.patches))


def _load_partially(patcher, budget):
    """ComfyUI's partial load of `patcher` on the CPU under `budget` bytes (0.28: `load` with
    lowvram_model_memory; March 2024: `patch_model_lowvram`)."""
    if hasattr(patcher, "patch_model_lowvram"):
        if any(key.endswith(".bias") for key in patcher.patches):
            pytest.skip("the March-2024 runtime's patch_model_lowvram hands a bias the patches of its weight "
                        "(bias_function = LowVramPatch(weight_key, ...)), whoever made them")
        patcher.patch_model_lowvram(CPU, lowvram_model_memory=budget)
    else:
        patcher.patch_model(CPU, lowvram_model_memory=budget)
    patched_in_forward = [m for m in patcher.model.modules() if getattr(m, "weight_function", None)]
    assert patched_in_forward, "nothing was left to the forward: the budget did not bite"


@pytest.mark.parametrize("case", sorted(CASES))
def test_partial_load_forward_equals_the_full_load(pack, tmp_path, case):
    patcher = _sd15_case(pack, tmp_path, case)
    g = torch.Generator().manual_seed(5)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 3, 64, generator=g)
    expected = unet_output(patcher, x, t, context)
    size = patcher.model_size()
    _load_partially(patcher, size // 3)
    try:
        with torch.no_grad():
            got = patcher.model.diffusion_model(x, t, context=context)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        if hasattr(patcher, "partially_load") and not hasattr(patcher, "patch_model_lowvram"):
            # memory freed: the patches left to the forward are now merged into the weights. (A
            # smaller step can turn a merged module back into a low-VRAM one, which 0.28 then
            # patches twice, with ComfyUI's own LoraLoader patches as well.)
            patcher.partially_load(CPU, extra_memory=size)
            assert not any(getattr(m, "weight_function", None) for m in patcher.model.modules())
            with torch.no_grad():
                got = patcher.model.diffusion_model(x, t, context=context)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_partial_load_of_fused_slices_equals_the_full_load(pack, tmp_path, case):
    import comfy.ops

    patcher = _flux_case(pack, tmp_path, case)
    expected = {key: _full_load(patcher, key) for key in FUSED}
    _load_partially(patcher, 1)
    try:
        for key in FUSED:
            module = patcher.model.get_submodule(key[: -len(".weight")])
            assert module.weight_function, key
            # the module's own cast, as its forward runs it: weight functions applied to a copy
            weight, _ = comfy.ops.cast_bias_weight(module, torch.zeros(1, dtype=torch.float32))
            assert torch.equal(weight, expected[key]), key
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("case", ["loha", "diag_oft"])
def test_dynamic_vram_steps_that_run_on_the_cpu(pack, tmp_path, case):
    """ModelPatcherDynamic cannot run on a CPU-only machine: its constructor returns a plain
    ModelPatcher for a CPU load device, and building one anyway fails in `register_load_device`,
    which allocates a `comfy_aimdo.host_buffer.HostBuffer` from comfy_aimdo's native library
    (CUDA virtual memory and pinned host buffers), not loaded without an NVIDIA GPU; its weight
    cast (`comfy/ops.py cast_modules_with_vbar`) faults the module's aimdo VBAR.

    What runs here is each step it takes with a patch: `setup_param` force-loads a weight whose
    `comfy.lora.calculate_shape` differs from its shape (ours never do), attaches a
    `LowVramPatch`, and the cast commits views into a staging buffer before copying the bytes
    in (`_staged(..., "dynamic")`), then calls the patch on the weight in the compute dtype.
    """
    import comfy.lora
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)")
    patcher = _sd15_case(pack, tmp_path, case)
    rerouted = comfy.model_patcher.ModelPatcherDynamic(tiny_sd15().model, load_device=CPU, offload_device=CPU)
    assert type(rerouted) is comfy.model_patcher.ModelPatcher
    weights = patcher.model.state_dict()
    for key, patches in patcher.patches.items():
        assert comfy.lora.calculate_shape(patches, weights[key], key) == weights[key].shape, key
    _check_staged(patcher, sorted(patcher.patches))


@pytest.mark.parametrize("form", ["factored", "patched"])
@pytest.mark.parametrize("case", ["loha", "dora", "diag_oft"])
def test_bypass_over_a_partial_load_equals_the_full_load(pack, tmp_path, bypass_form, form, case):
    """A merged adapter that a partial load leaves to the forward (its LowVramPatch in the layer's
    weight_function) under a bypassed LoRA: bypass reads the weight through the layer's own cast,
    with the merge applied, in both of its forms."""
    calls = bypass_form(form)
    merged = _sd15_case(pack, tmp_path, case)
    lycoris_file(tiny_sd15().model.diffusion_model, tmp_path / "loras" / "bypassed.safetensors", "lora_unet_", "lora")
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    both, report = node.load(merged, "bypassed.safetensors", 0.9, "bypass")["result"][:2]
    assert "bypass:" in report, report
    g = torch.Generator().manual_seed(6)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0]), torch.randn(1, 3, 64, generator=g)
    expected = unet_output(both, x, t, context)
    assert not torch.equal(expected, unet_output(merged, x, t, context))
    calls.clear()
    _load_partially(both, both.model_size() // 3)
    try:
        with torch.no_grad():
            got = both.model.diffusion_model(x, t, context=context)
        left_to_forward = [m for m in calls if getattr(m, "weight_function", None)]
    finally:
        both.unpatch_model()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert bool(calls) == (form == "patched")
    assert bool(left_to_forward) == (form == "patched")  # patched on top of a merge done in the forward
