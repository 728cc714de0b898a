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
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context).float()
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_fp8_bypass_is_exact_where_merge_loses_the_delta(pack, tmp_path, algo):
    _loras(tmp_path)
    model = tiny_sd15()
    kwargs = {"factor": 4} if algo == "lokr" else {}
    lycoris_file(model.model.diffusion_model, tmp_path / f"{algo}.safetensors", "lora_unet_", algo,
                 conv_dim=4, conv_alpha=2, **kwargs)
    _to_fp8(model)
    stored = {k: v.clone() for k, v in model.model.state_dict().items()}
    reference_base = _dequantised_copy(model)
    y_base = _run(reference_base)
    y_ref = _run(_load(pack, reference_base, f"{algo}.safetensors", 1.0, "merge"))  # W_deq + dW in fp32
    bypassed = _load(pack, model, f"{algo}.safetensors", 1.0, "bypass")
    y_bypass = _run(bypassed)
    for key, value in model.model.state_dict().items():  # after the run: bit-identical base weights
        assert torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 else value,
                           stored[key].view(torch.uint8) if value.dtype.itemsize == 1 else stored[key]), key
    y_merge = _run(_load(pack, model, f"{algo}.safetensors", 1.0, "merge"))
    effect = (y_ref - y_base).norm()
    bypass_error = float((y_bypass - y_ref).norm() / effect)
    merge_error = float((y_merge - y_ref).norm() / effect)
    print(f"{algo} fp8: bypass error {bypass_error:.2e}, merge-into-fp8 error {merge_error:.2e} "
          "(relative to the adapter's effect on the output)")
    assert bypass_error < 1e-4
    assert merge_error > 10 * bypass_error


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
    _loras(tmp_path)
    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, tmp_path / "tlora.safetensors", "lora_unet_", "tlora")
    patched = _load(pack, model, "tlora.safetensors", 1.0, "bypass")
    from lycoris_pack.lycoris_core.algos.tlora import current_timestep

    wrapper = patched.model_options["model_function_wrapper"]
    sigma = torch.tensor([2.5, 2.5])
    seen = []
    wrapper(lambda x, t, **c: seen.append(current_timestep.value), {"input": None, "timestep": sigma, "c": {}})
    assert seen == [pytest.approx(float(model.model.model_sampling.timestep(sigma)[0]))]
    assert "model_function_wrapper" not in model.model_options  # the input model is untouched
