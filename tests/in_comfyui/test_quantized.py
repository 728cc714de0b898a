"""Every mode on quantized models loaded by the runtimes' own loaders (UNETLoader's fp8 weight_dtype,
ComfyUI 0.28 comfy_quant checkpoints in four formats, ComfyUI-GGUF Q8_0 / Q4_0), against the
trainer's forward (lycoris-lora's network) on the dequantised weights.

Error = |output - trainer's output| / |trainer's output - base output|, i.e. relative to the
adapter's effect. Where the runtime's kernel is not dequantise-then-matmul (int8 computes its own
way), the format's compute floor (the same measure between the quantized and the dequantised base
model without any adapter) is allowed on top of 1e-4.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from quantized_models import FORMATS, dequantised_weights, load_quantized_flux, stored_bytes
from tiny_models import load_diffusion_model, lycoris_file

ALGOS = {
    "lora": {"algo": "lora"},
    "lokr": {"algo": "lokr", "factor": 4},
    "loha": {"algo": "loha"},
    "oft": {"algo": "diag-oft"},
    "dora": {"algo": "lora", "dora_wd": True},
    "ia3": {"algo": "ia3"},
}
FIGURES: dict = {}  # (format, algo, mode) -> error, printed at the end of the module


@pytest.fixture(scope="module")
def recent(comfy):
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        pytest.skip("the pinned March-2024 runtime has no Flux class, no quantized ops and no GGUF loader")
    yield
    for key, value in sorted(FIGURES.items()):
        print(f"{key[0]:>16} {key[1]:>10} {key[2]:>6}: error {value:.2e} of the adapter's effect")


class Quantized:
    """One format: the quantized model, its dequantised float twin, and the compute floor."""

    def __init__(self, root, fmt):
        self.fmt = fmt
        self.folder = root / fmt
        self.model, _ = load_quantized_flux(self.folder, fmt)
        save_file(dequantised_weights(self.model), str(self.folder / "dequantised.safetensors"))
        self.float_model = load_diffusion_model(self.folder, "dequantised.safetensors")
        self.y_base = run(self.float_model)
        self.y_quantized_base = run(self.model)

    def error(self, y, y_ref) -> float:
        return float((y - y_ref).norm() / (y_ref - self.y_base).norm())

    def tolerance(self, y_ref) -> float:
        floor = float((self.y_quantized_base - self.y_base).norm() / (y_ref - self.y_base).norm())
        return 1e-4 + 2 * floor


@pytest.fixture(scope="module")
def formats(recent, pack, tmp_path_factory):
    """fmt -> Quantized, built once per module."""
    root = tmp_path_factory.mktemp("quantized")
    return functools.cache(lambda fmt: Quantized(root, fmt))


def flux_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 16, generator=g))


def run(patcher, check=None):
    """The patched model's output, patched and run without autograd as ComfyUI samples; `check()`
    runs while the patches are applied."""
    with torch.no_grad():
        patcher.patch_model()
        try:
            y = patcher.model.diffusion_model(*flux_inputs()).float()
            if check is not None:
                check()
            return y
        finally:
            patcher.unpatch_model()


def load(pack, model, name, strength, mode):
    """(patched model, report) from Load LyCORIS (model only); the loras folder is set by the caller."""
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, name, strength, mode)["result"][:2]


def assert_stored_unchanged(model, stored, quantized_only=False):
    now = stored_bytes(model, quantized_only)
    assert now.keys() <= stored.keys()
    for key, value in now.items():
        assert torch.equal(now[key], value), f"stored bytes of {key} changed"


def trainer_file(q: Quantized, algo: str):
    """(file name, trainer's output): lycoris-lora's network on the dequantised model."""
    from comfyui_runtime import use_loras_folder

    use_loras_folder(q.folder)
    name = f"{algo}.safetensors"
    _, wrapped = lycoris_file(q.float_model.model.diffusion_model, q.folder / name, "lora_unet_",
                              target_module=("Linear",), **ALGOS[algo])
    with torch.no_grad():
        return name, wrapped(*flux_inputs()).float()


def diffusers_file(q: Quantized):
    """(file name, ComfyUI's own LoraLoader output on the dequantised model) for a diffusers-named
    Flux LoRA whose to_q/to_k/to_v land in slices of the fused qkv and linear1 weights."""
    import comfy.sd
    import comfy.utils
    from comfyui_runtime import use_loras_folder

    use_loras_folder(q.folder)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for block in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        for part in ("to_q", "to_k", "to_v"):
            prefix = f"transformer.{block}.{part}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 256, generator=g) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(256, 4, generator=g) * 0.05
    save_file(tensors, str(q.folder / "diffusers.safetensors"))
    lora = comfy.utils.load_torch_file(str(q.folder / "diffusers.safetensors"), safe_load=True)
    reference, _ = comfy.sd.load_lora_for_models(q.float_model, None, lora, 1.0, 0.0)
    return "diffusers.safetensors", run(reference)


@pytest.mark.parametrize("algo", list(ALGOS) + ["diffusers"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_mode_on_quantized_weights(pack, formats, fmt, algo):
    q = formats(fmt)
    name, y_ref = diffusers_file(q) if algo == "diffusers" else trainer_file(q, algo)
    stored = stored_bytes(q.model)
    tolerance = q.tolerance(y_ref)
    FIGURES[(fmt, algo, "floor")] = (tolerance - 1e-4) / 2
    for mode in ("auto", "bypass", "merge"):
        patched, report = load(pack, q.model, name, 1.0, mode)
        # quantized weights are never rewritten in auto/bypass, even while patched (float ones auto merges)
        y = run(patched, check=lambda: assert_stored_unchanged(q.model, stored, True) if mode != "merge" else None)
        assert_stored_unchanged(q.model, stored)
        FIGURES[(fmt, algo, mode)] = error = q.error(y, y_ref)
        assert "cannot be bypassed" not in report, report
        if mode == "merge" and not fmt.startswith("gguf"):  # ComfyUI requantizes the merged weight
            assert "merged into quantized weights" in report, report
            continue
        if mode == "merge":  # ComfyUI-GGUF keeps the patch and applies it to the dequantised weight
            assert "merged into GGUF weights" in report, report
        else:
            assert "on quantized weights:" in report, report
        assert error <= tolerance, f"{fmt} {algo} {mode}: error {error:.2e} > {tolerance:.2e}\n{report}"


@pytest.mark.parametrize("algo", list(ALGOS) + ["diffusers"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_patched_form_on_quantized_weights(pack, formats, bypass_form, fmt, algo):
    """Bypass's patched form (the adapter merged into the transient weight the layer dequantises
    for its op) runs where the layer computes on a cast weight (UNETLoader's fp8, GGUF) and is as
    exact as the factored one; QuantizedTensor layers keep their own kernels, hence the factored
    form. The stored bytes never change."""
    calls = bypass_form("patched")
    q = formats(fmt)
    name, y_ref = diffusers_file(q) if algo == "diffusers" else trainer_file(q, algo)
    stored = stored_bytes(q.model)
    patched, report = load(pack, q.model, name, 1.0, "bypass")
    y = run(patched, check=lambda: assert_stored_unchanged(q.model, stored, True))
    assert_stored_unchanged(q.model, stored)
    FIGURES[(fmt, algo, "patched")] = error = q.error(y, y_ref)
    assert error <= q.tolerance(y_ref), f"{fmt} {algo}: error {error:.2e}\n{report}"
    casts_weight = fmt == "fp8_e4m3fn" or fmt.startswith("gguf")
    quantized_calls = [m for m in calls if m.weight.dtype.itemsize == 1 or hasattr(m.weight, "tensor_type")]
    assert bool(quantized_calls) == casts_weight, (fmt, len(calls))


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_stacked_loaders_both_apply(pack, formats, fmt):
    q = formats(fmt)
    trainer_file(q, "lora")
    trainer_file(q, "lokr")
    expected = []
    for model, mode in ((q.float_model, "merge"), (q.model, "auto")):
        once, _ = load(pack, model, "lora.safetensors", 0.7, mode)
        twice, _ = load(pack, once, "lokr.safetensors", 1.1, mode)
        expected.append(run(twice))
    y_ref, y = expected
    FIGURES[(fmt, "lora+lokr", "auto")] = error = q.error(y, y_ref)
    assert error <= q.tolerance(y_ref)


def test_a_deep_clone_runs_its_own_layers(pack, formats):
    """ComfyUI 0.28's MultiGPU deep clone builds a fresh model from the loader: bypass must run
    the clone's layers, computing exactly what the original does, whatever happens to the
    original's modules afterwards."""
    q = formats("fp8_e4m3fn")
    name, _ = trainer_file(q, "lora")
    patched, _ = load(pack, q.model, name, 1.0, "bypass")
    y_original = run(patched)
    clone = patched.deepclone_multigpu()
    assert clone.model is not patched.model
    y_clone = run(clone)
    torch.testing.assert_close(y_clone, y_original, rtol=0, atol=0)
    biases = [m.bias for m in patched.model.diffusion_model.modules() if getattr(m, "bias", None) is not None]
    saved = [b.detach().clone() for b in biases]
    with torch.no_grad():  # the original's weights now differ: the clone must not notice
        for bias in biases:
            bias.copy_((bias.float() + 1.0).to(bias.dtype))
    try:
        torch.testing.assert_close(run(clone), y_original, rtol=0, atol=0)
        assert not torch.allclose(run(patched), y_original)
    finally:
        with torch.no_grad():
            for bias, value in zip(biases, saved):
                bias.copy_(value)


def test_a_second_patcher_on_the_same_model_replaces_the_first(pack, formats):
    """Two clones of one model, both injected at once (never stacked twice), then fully undone."""
    q = formats("fp8_e4m3fn")
    name, _ = trainer_file(q, "lora")
    first, _ = load(pack, q.model, name, 1.0, "bypass")
    second, _ = load(pack, q.model, name, 0.5, "bypass")
    y_second = run(second)
    with torch.no_grad():
        first.patch_model()
        try:
            second.patch_model()
            try:
                y = second.model.diffusion_model(*flux_inputs()).float()
            finally:
                second.unpatch_model()
        finally:
            first.unpatch_model()
    torch.testing.assert_close(y, y_second, rtol=0, atol=0)
    assert not [n for n, m in q.model.model.diffusion_model.named_modules() if "forward" in m.__dict__]
