"""Bypass mode on quantized layers: the adapter runs beside the layer, the stored weights are
never rewritten, so fp8 models keep the adapter's full effect."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_models import lycoris_file, tiny_sd15


def _load(pack, model, name, strength, mode):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, name, strength, mode)["result"][0]


def _loras(tmp_path):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)


def _adaptable(diffusion_model):
    return [m for m in diffusion_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _to_fp8(patcher):
    """Store every Linear/Conv weight as float8_e4m3fn, computed through ComfyUI's manual cast."""
    for module in _adaptable(patcher.model.diffusion_model):
        module.weight = torch.nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        module.comfy_cast_weights = True


def _dequantised_copy(patcher):
    """The same model with fp32 weights equal to the fp8 ones (the exact reference's base), built
    afresh from ComfyUI's config class: a BaseModel cannot be deep-copied on every runtime."""
    reference = tiny_sd15()
    weights = {k: v.to(torch.float32) for k, v in patcher.model.diffusion_model.state_dict().items()}
    reference.model.diffusion_model.load_state_dict(weights)
    return reference


def _run(patcher):
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 64)
    with torch.no_grad():  # patched and run without autograd, as ComfyUI samples
        patcher.patch_model()
        try:
            return patcher.model.diffusion_model(x, t, context=context).float()
        finally:
            patcher.unpatch_model()


SD15_ALGOS = {
    "lora": {"algo": "lora", "conv_dim": 4, "conv_alpha": 2},
    "lokr": {"algo": "lokr", "factor": 4, "conv_dim": 4, "conv_alpha": 2},
    "loha": {"algo": "loha", "conv_dim": 4, "conv_alpha": 2},
    "oft": {"algo": "diag-oft"},
    "dora": {"algo": "lora", "dora_wd": True, "conv_dim": 4, "conv_alpha": 2},
    "ia3": {"algo": "ia3"},
}


@pytest.mark.parametrize("form", ["cost", "factored", "patched"])
@pytest.mark.parametrize("algo", list(SD15_ALGOS))
def test_fp8_bypass_is_exact_where_merge_loses_the_delta(pack, tmp_path, bypass_form, algo, form):
    """An SD1.5 UNet (Linear and Conv layers) stored in fp8 as UNETLoader's fp8 weight_dtype
    stores it; reference: lycoris-lora's own forward on the dequantised weights. Each bypass
    form alone, and the cost model's mix (here: patched on the 256-token image layers,
    factored on the 5-token context ones)."""
    _loras(tmp_path)
    patched_calls = bypass_form(form)
    model = tiny_sd15()
    _to_fp8(model)
    stored = {k: v.clone() for k, v in model.model.state_dict().items()}
    reference_base = _dequantised_copy(model)
    _, trained = lycoris_file(reference_base.model.diffusion_model, tmp_path / f"{algo}.safetensors", "lora_unet_",
                              **SD15_ALGOS[algo])
    y_base = _run(reference_base)
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 64)
    with torch.no_grad():
        y_ref = trained(x, t, context=context).float()
    effect = (y_ref - y_base).norm()
    errors = {}
    for mode in ("auto", "bypass", "merge"):
        y = _run(_load(pack, model, f"{algo}.safetensors", 1.0, mode))
        for key, value in model.model.state_dict().items():  # after the run: bit-identical base weights
            assert torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 else value,
                               stored[key].view(torch.uint8) if value.dtype.itemsize == 1 else stored[key]), key
        errors[mode] = float((y - y_ref).norm() / effect)
    print(f"{algo} fp8 SD1.5: " + ", ".join(f"{m} error {e:.2e}" for m, e in errors.items())
          + " (relative to the adapter's effect on the output)")
    assert errors["auto"] < 1e-4 and errors["bypass"] < 1e-4
    assert errors["merge"] > 10 * errors["bypass"]
    assert bool(patched_calls) == (form != "factored")
    if form == "cost":  # the context's k/v see 5 tokens: those stay factored
        context_kv = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
        assert context_kv and not any(any(m is c for c in context_kv) for m in patched_calls)


class QuantLinear(torch.nn.Linear):
    """A stand-in for GGUF-style layers: int8 storage, its own dequantising forward, no usable
    floating-point `.weight`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach()
        self.scale = w.abs().amax() / 127
        self.weight = torch.nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantised(self):
        return self.weight.to(torch.float32) * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantised().to(x.dtype), self.bias)


def test_bypass_on_a_layer_without_a_float_weight(pack, tmp_path):
    _loras(tmp_path)
    model = tiny_sd15()
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    block.attn1.to_q = QuantLinear(block.attn1.to_q)
    layer = block.attn1.to_q
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    up, down = torch.randn(32, 4, generator=g) * 0.1, torch.randn(4, 32, generator=g) * 0.1
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(2.0)},
              str(tmp_path / "q.safetensors"))
    patched = _load(pack, model, "q.safetensors", 0.8, "bypass")
    x = torch.randn(3, 7, 32, generator=g)
    patched.patch_model()
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        patched.unpatch_model()
    expected = F.linear(x, layer.dequantised() + 0.8 * (2.0 / 4) * up @ down, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.weight.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantised(), layer.bias))  # unpatched again


def test_tlora_bypass_publishes_the_sampling_timestep(pack, tmp_path):
    """The model-function wrapper writes each call's timestep into the plan's tensor on the call's
    device, where T-LoRA's copies read it (no process-wide state)."""
    _loras(tmp_path)
    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, tmp_path / "tlora.safetensors", "lora_unet_", "tlora")
    patched = _load(pack, model, "tlora.safetensors", 1.0, "bypass")
    from lycoris_pack.nodes.bypass import bypass_plans

    wrapper = patched.model_options["model_function_wrapper"]
    sigma = torch.tensor([2.5, 2.5])
    plans = bypass_plans(patched)  # one (0.28) or one per layer (the March-2024 runtime's object patches)
    assert plans
    seen = []
    x = torch.zeros(2, 4, 8, 8)
    wrapper(lambda x, t, **c: seen.extend(float(p.staged(x.device).timestep) for p in plans),
            {"input": x, "timestep": sigma, "c": {}})
    assert seen == [pytest.approx(float(model.model.model_sampling.timestep(sigma)[0]))] * len(plans)
    for plan in plans:
        clocks = {id(a.clock) for entries in plan.staged(x.device).layers.values() for a, *_ in entries}
        assert clocks == {id(plan.staged(x.device).timestep)}
    assert "model_function_wrapper" not in model.model_options  # the input model is untouched


def test_a_norm_adapter_runs_in_the_layers_own_cast(pack, tmp_path):
    """A norm-layer adapter has no forward of its own to wrap: in bypass it is applied by the norm
    layer's own cast (its weight and bias functions), never merged into the stored weight, and the
    output equals the merge's. An fp8-stored norm weight thus keeps the whole change."""
    _loras(tmp_path)
    model = tiny_sd15()
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    norm = "lora_unet_input_blocks_1_1_norm"
    to_q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{norm}.w_norm": torch.randn(32, generator=g) * 0.1, f"{norm}.b_norm": torch.randn(32, generator=g) * 0.1,
               f"{to_q}.lora_up.weight": torch.randn(32, 4, generator=g), f"{to_q}.lora_down.weight": torch.randn(4, 32, generator=g)},
              str(tmp_path / "norm.safetensors"))
    stored = model.model.diffusion_model.input_blocks[1][1].norm.weight.clone()
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    patched, report = node.load(model, "norm.safetensors", 1.0, "bypass")["result"][:2]
    merged, _ = node.load(model, "norm.safetensors", 1.0, "merge")["result"][:2]
    assert "bypass: 2 layers run the adapter beside the layer" in report and "cannot be bypassed" not in report, report
    assert "diffusion_model.input_blocks.1.1.norm.weight" not in patched.patches  # not merged
    y_bypass, y_merge, y_plain = _run(patched), _run(merged), _run(model)
    assert torch.equal(model.model.diffusion_model.input_blocks[1][1].norm.weight, stored)
    effect = float((y_merge - y_plain).norm())
    assert effect > 0 and float((y_bypass - y_merge).norm()) <= 1e-5 * effect


def test_auto_on_a_float_model_is_merge(pack, tmp_path):
    """Nothing is quantized: auto hands ComfyUI the same weight patches as merge, and no bypass."""
    _loras(tmp_path)
    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, tmp_path / "lora.safetensors", "lora_unet_", "lora",
                 conv_dim=4, conv_alpha=2)
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    auto, report = node.load(model, "lora.safetensors", 1.0, "auto")["result"][:2]
    merged, _ = node.load(model, "lora.safetensors", 1.0, "merge")["result"][:2]
    from lycoris_pack.nodes.bypass import bypassed_layers

    assert not bypassed_layers(auto) and "bypass:" not in report and "warning" not in report, report
    assert auto.patches.keys() == merged.patches.keys() and auto.patches
    assert torch.equal(_run(auto), _run(merged))


@pytest.mark.parametrize("algo, kwargs", [
    ("dora", {"algo": "lora", "dora_wd": True, "wd_on_output": True}),
    ("dora_in", {"algo": "lora", "dora_wd": True, "wd_on_output": False}),
    ("glora", {"algo": "glora"}),
    ("loha", {"algo": "loha"}),
    ("diag-oft", {"algo": "diag-oft", "linear_alpha": 0, "conv_alpha": 0}),
])
def test_fp8_factored_bypass_casts_each_layer_once_per_call(pack, tmp_path, monkeypatch, bypass_form, algo, kwargs):
    """In its factored form a bypassed layer is cast at most once per call, whoever needs the cast
    weight or bias (the layer's op, DoRA's norms, an output rotation's bias): never a second,
    nested cast. DoRA builds its scale on the first step only (kept per weight). Both steps equal
    the merge into the dequantised weights."""
    import collections
    import importlib

    import comfy.ops
    import comfy.utils

    _loras(tmp_path)
    bypass_form("factored")
    model = tiny_sd15()
    kwargs = dict(kwargs)
    lycoris_file(model.model.diffusion_model, tmp_path / f"{algo}.safetensors", "lora_unet_", kwargs.pop("algo"),
                 conv_dim=4, conv_alpha=kwargs.pop("conv_alpha", 2), **kwargs)
    _to_fp8(model)
    reference_base = _dequantised_copy(model)
    y_base = _run(reference_base)
    y_ref = _run(_load(pack, reference_base, f"{algo}.safetensors", 0.8, "merge"))
    bypass_module = importlib.import_module(f"{pack.__name__}.nodes.bypass")
    base_module = importlib.import_module(f"{pack.__name__}.lycoris_core.algos.base")
    casts = collections.Counter()
    real_cast = comfy.ops.cast_bias_weight

    def counted_cast(module, *args, **kwargs):
        casts[id(module)] += 1
        return real_cast(module, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counted_cast)
    monkeypatch.setattr(bypass_module, "cast_bias_weight", counted_cast)
    scales = []
    real_scale = base_module.dora_channel_scale
    monkeypatch.setattr(base_module, "dora_channel_scale", lambda *a, **k: scales.append(1) or real_scale(*a, **k))
    bypassed = _load(pack, model, f"{algo}.safetensors", 0.8, "bypass")
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 64)
    bypassed.patch_model()
    try:
        with torch.no_grad():
            first = bypassed.model.diffusion_model(x, t, context=context).float()
            casts_first, scales_first = dict(casts), len(scales)
            casts.clear()
            second = bypassed.model.diffusion_model(x, t, context=context).float()
    finally:
        bypassed.unpatch_model()
    assert casts_first and max(casts_first.values()) == 1, "a layer was cast twice in one call"
    assert casts == casts_first, "the second step cast other layers or cast them more often"
    assert (scales_first > 0) == algo.startswith("dora"), scales_first
    assert len(scales) == scales_first, "the second step rebuilt DoRA's scale"
    effect = (y_ref - y_base).norm()
    for y in (first, second):
        assert float((y - y_ref).norm() / effect) < 1e-4


def _sample_steps(model, steps):
    """`steps` steps of ComfyUI's sampler with CFG (one model call per step: cond and uncond batched)."""
    import comfy.sample

    g = torch.Generator().manual_seed(3)
    latent = torch.zeros(1, 4, 8, 8)
    conds = [[[torch.randn(1, 3, 64, generator=g), {}]] for _ in range(2)]
    return comfy.sample.sample(model, torch.randn(latent.shape, generator=g), steps, 2.0, "euler", "normal",
                               conds[0], conds[1], latent, disable_pbar=True, seed=3)


def test_a_layer_computed_without_its_forward_is_reported_loudly(pack, tmp_path, caplog):
    """ComfyUI >= 0.37 computes some Linear layers with `cast_bias_weight` and a fused kernel and never
    calls their forward (`comfy.ops.linear_input_act`); emulated here on one layer of the tiny UNet. The
    adapter cannot act there, and the first model calls say so, naming the layer."""
    import logging

    import comfy.ops
    import comfy.utils

    _loras(tmp_path)
    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, tmp_path / "lora.safetensors", "lora_unet_", "lora")
    patched = _load(pack, model, "lora.safetensors", 1.0, "bypass")
    path = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    layer = comfy.utils.get_attr(patched.model, path)

    class FusedKernel(type(layer)):  # what linear_input_act does: the cast, then the op, no forward
        def __call__(self, x):
            weight, bias = comfy.ops.cast_bias_weight(self, x)[:2]
            return torch.nn.functional.linear(x, weight, bias)

    original = type(layer)
    layer.__class__ = FusedKernel
    try:
        with caplog.at_level(logging.WARNING):
            _sample_steps(patched, 2)
    finally:
        layer.__class__ = original
    warnings = [r.getMessage() for r in caplog.records if "did not run their forward" in r.getMessage()]
    assert len(warnings) == 1 and path in warnings[0] and "1 of" in warnings[0], warnings


def test_layers_this_comfyui_computes_without_their_forward_are_merged_in_auto(pack, tmp_path, monkeypatch):
    """Where the runtime has `linear_input_act` (ComfyUI >= 0.37, emulated: 0.28 has none), int8-tensorwise
    Linear layers never run their forward (nor, with fp16 accumulation on, any Linear: a CUDA setting this
    machine cannot turn on): bypass is never chosen for them."""
    import comfy.ops

    from lycoris_pack.nodes.layers import forward_skipped

    linear, conv = torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 3)
    assert not forward_skipped(linear, "int8_tensorwise") or hasattr(comfy.ops, "linear_input_act")
    monkeypatch.setattr(comfy.ops, "linear_input_act", lambda *a, **k: None, raising=False)
    assert forward_skipped(linear, "int8_tensorwise")
    assert not forward_skipped(linear, "float8_e4m3fn") and not forward_skipped(conv, "int8_tensorwise")


def test_stacked_loras_run_as_one_summed_rank_product_and_equal_the_merge(pack, tmp_path, bypass_form):
    """Three LoRA/LoCon files and a LoKr on the same layers, chained in bypass at mixed strengths (one
    negative) on an fp8 UNet: each layer runs the LoRAs as one product of their summed rank, and the
    output equals the same files merged into the dequantised float model."""
    from lycoris_pack.nodes.bypass import bypass_plans

    _loras(tmp_path)
    bypass_form("factored")
    model = tiny_sd15()
    _to_fp8(model)
    reference = _dequantised_copy(model)
    files = [("lora", 0, {"linear_dim": 4}), ("lora", 1, {"linear_dim": 8}), ("lora", 2, {"linear_dim": 2}),
             ("lokr", 3, {"factor": 4})]
    strengths = (0.7, -0.4, 1.2, 0.5)
    for algo, seed, kwargs in files:
        lycoris_file(reference.model.diffusion_model, tmp_path / f"{algo}{seed}.safetensors", "lora_unet_", algo,
                     seed=seed, conv_dim=4, conv_alpha=2, **kwargs)
    ours, merged = model, reference
    for (algo, seed, _), m in zip(files, strengths):
        ours = _load(pack, ours, f"{algo}{seed}.safetensors", m, "bypass")
        merged = _load(pack, merged, f"{algo}{seed}.safetensors", m, "merge")
    y, y_ref, y_base = _run(ours), _run(merged), _run(reference)
    effect = float((y_ref - y_base).norm())
    assert effect > 0 and float((y - y_ref).norm()) <= 1e-5 * effect + 1e-6 * float(y_ref.norm())
    cpu = torch.device("cpu")  # 0.28: one plan; the March-2024 runtime: one per layer
    ranks = {path: group.down.shape[0] for plan in bypass_plans(ours) for path, group in plan.staged(cpu).groups.items()}
    # every adapted layer holds one group: linear_dim 4 + 8 + 2 on Linear layers, conv_dim 4 x 3 on convs
    assert set(ranks) == {path for plan in bypass_plans(ours) for path in plan.layers}
    assert set(ranks.values()) == {4 + 8 + 2, 3 * 4}, ranks
