"""Bypass where NVIDIA users run it: parameters off the compute device, cast per call.

ComfyUI keeps the layers' parameters on the CPU under dynamic VRAM (0.28's default on NVIDIA),
low-VRAM partial loads and ComfyUI-GGUF's offloading, and casts each layer's weight and bias to
the GPU in its forward. Without a GPU the same paths run with the inputs on the `meta` device:
ComfyUI's own partial load leaves every layer to cast in its forward, its ops then cast every weight
and bias to `meta` as they would to CUDA, a tensor read from the wrong device raises, and so does
any host read (`float()`, `.item()`) of a device tensor. The plain model runs this way; every
adapter, in both bypass forms and in `auto`, must too (two calls: the second runs on what the
first cached).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import lycoris_file, tiny_sd15

META = torch.device("meta")
CPU = torch.device("cpu")
CONV = {"conv_dim": 4, "conv_alpha": 2}
ALGOS = {
    "lora": {"algo": "lora", **CONV},
    "lokr": {"algo": "lokr", "factor": 4, **CONV},
    "loha": {"algo": "loha", **CONV},
    "ia3": {"algo": "ia3"},
    "diag-oft": {"algo": "diag-oft"},
    "boft": {"algo": "boft"},
    "glora": {"algo": "glora", **CONV},
    "dora": {"algo": "lora", "dora_wd": True, **CONV},
    "dora_in": {"algo": "lora", "dora_wd": True, "wd_on_output": False},
    "full": {"algo": "full"},
}


@pytest.fixture
def meta_compute(comfy, monkeypatch):
    """ComfyUI's memory manager answers for the `meta` device as for an empty GPU."""
    import comfy.model_management as mm

    real = mm.get_free_memory

    def free(dev=None, torch_free_too=False):
        if getattr(dev, "type", None) == "meta":
            return (1 << 34, 1 << 34) if torch_free_too else 1 << 34
        return real(dev, torch_free_too)

    monkeypatch.setattr(mm, "get_free_memory", free)


def _partial_load(patcher):
    """ComfyUI's own partial load on the CPU with a budget of one byte: every layer keeps its
    parameters where they are and casts them in its forward (0.28: `patch_model` with
    lowvram_model_memory; March 2024: `patch_model_lowvram`)."""
    if hasattr(patcher, "patch_model_lowvram"):
        patcher.patch_model_lowvram(CPU, lowvram_model_memory=1)
    else:
        patcher.patch_model(CPU, lowvram_model_memory=1)
    cast = [m for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert cast, "the partial load left no layer to cast in its forward"


def _run_on_meta(patcher, inputs, kwargs=None):
    """Two calls of the partially loaded model with inputs on `meta`; the output's shape."""
    _partial_load(patcher)
    try:
        args = [a.to(META) for a in inputs]
        extra = {k: v.to(META) for k, v in (kwargs or {}).items()}
        for _ in range(2):
            y = patcher.model.diffusion_model(*args, **extra)
        assert y.device.type == "meta"
        return tuple(y.shape)
    finally:
        patcher.unpatch_model()


def _load(pack, model, name, mode):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, name, 0.8, mode)["result"][:2]


SD15_INPUTS = (torch.randn(1, 4, 8, 8), torch.tensor([400.0]))


@pytest.fixture(scope="module")
def sd15_files(comfy, tmp_path_factory):
    """algo -> (folder, file name) of lycoris-lora files for the tiny SD1.5 UNet."""
    folder = tmp_path_factory.mktemp("offloaded")
    model = tiny_sd15()
    for algo, kwargs in ALGOS.items():
        kwargs = dict(kwargs)
        lycoris_file(model.model.diffusion_model, folder / f"{algo}.safetensors", "lora_unet_", kwargs.pop("algo"),
                     **kwargs)
    return folder


def test_the_plain_model_runs_with_parameters_off_the_compute_device(comfy, meta_compute):
    shape = _run_on_meta(tiny_sd15(), SD15_INPUTS, {"context": torch.randn(1, 3, 64)})
    assert shape == (1, 4, 8, 8)


@pytest.mark.parametrize("form", ["factored", "patched", "cost"])
@pytest.mark.parametrize("mode", ["bypass", "auto"])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algorithm_runs_with_parameters_off_the_compute_device(pack, sd15_files, meta_compute, bypass_form,
                                                                     algo, mode, form):
    """Weight and bias come from the layer's own cast (on the compute device), scales are numbers
    frozen when the adapter is staged, nothing is read back to the host."""
    from comfyui_runtime import use_loras_folder

    use_loras_folder(sd15_files)
    bypass_form(form)
    model, report = _load(pack, tiny_sd15(), f"{algo}.safetensors", mode)
    assert "0 unmatched" in report, report
    assert _run_on_meta(model, SD15_INPUTS, {"context": torch.randn(1, 3, 64)}) == (1, 4, 8, 8)


def _recent_formats():
    return ("fp8_e4m3fn", "float8_e4m3fn", "nvfp4", "gguf_Q4_0")


@pytest.fixture(scope="module")
def flux_models(comfy, tmp_path_factory):
    """fmt -> (ModelPatcher, folder with every algorithm's file) for a tiny Flux in `fmt`, loaded
    by the runtime's own loaders (0.28 only: the pinned runtime has no Flux and no quantized ops)."""
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        pytest.skip("the pinned March-2024 runtime has no Flux class, no quantized ops and no GGUF loader")
    import functools

    from quantized_models import dequantised_weights, load_quantized_flux
    from safetensors.torch import save_file
    from tiny_models import load_diffusion_model

    root = tmp_path_factory.mktemp("offloaded_flux")

    @functools.cache
    def build(fmt):
        folder = root / fmt
        model, _ = load_quantized_flux(folder, fmt)
        save_file(dequantised_weights(model), str(folder / "dequantised.safetensors"))
        float_model = load_diffusion_model(folder, "dequantised.safetensors")
        for algo, kwargs in ALGOS.items():
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("conv")}
            if algo == "boft":  # Flux's 1536/1792 features take butterfly blocks of 12/14, not factor 4's
                kwargs["linear_dim"] = 16
            lycoris_file(float_model.model.diffusion_model, folder / f"{algo}.safetensors", "lora_unet_",
                         kwargs.pop("algo"), target_module=("Linear",), **kwargs)
        return model, folder

    return build


@pytest.mark.parametrize("form", ["factored", "patched"])
@pytest.mark.parametrize("mode", ["bypass", "auto"])
@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("fmt", _recent_formats())
def test_quantized_models_run_with_parameters_off_the_compute_device(pack, flux_models, meta_compute, bypass_form,
                                                                     fmt, algo, mode, form):
    """UNETLoader's fp8, 0.28 comfy_quant files (QuantizedTensor layers) and ComfyUI-GGUF: Flux's
    Linears have biases, so the output-side families and DoRA need the cast bias."""
    from comfyui_runtime import use_loras_folder
    from test_quantized import flux_inputs

    model, folder = flux_models(fmt)
    use_loras_folder(folder)
    bypass_form(form)
    patched, report = _load(pack, model, f"{algo}.safetensors", mode)
    assert "0 unmatched" in report, report
    assert _run_on_meta(patched, flux_inputs()) == (1, 16, 8, 8)
