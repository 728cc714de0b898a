"""torch.compile as users run it: core's TorchCompileModel after our loader, ComfyUI's sampler under
`torch.inference_mode()`, inductor on the CPU. Figures come from dynamo's own counters.

- exact: the compiled run equals the uncompiled one, in every mode, on a float and an fp8 model;
- no graph break from our code: a compiled run with our adapters breaks the graph exactly as often
  as the same model without them (ComfyUI's own code may break it; ours adds nothing);
- no recompile on a strength, schedule or same-structure file change: re-running the workflow with
  another strength makes dynamo compile no new frame (the strengths are data, see
  nodes/bypass_staging.py).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import lycoris_file, tiny_flux

STEPS, CFG = 3, 2.0


@pytest.fixture
def recent(comfy):
    try:
        from comfy_extras.nodes_torch_compile import TorchCompileModel  # noqa: F401
    except ImportError:
        pytest.skip("the pinned March-2024 runtime has no TorchCompileModel node")


@pytest.fixture
def folder(pack, tmp_path):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)
    model = tiny_flux(tmp_path)
    for algo, seed in (("lora", 0), ("lora", 1), ("lokr", 2), ("loha", 3)):
        lycoris_file(model.model.diffusion_model, tmp_path / f"{algo}{seed}.safetensors", "lora_unet_", algo,
                     seed=seed, target_module=("Linear",), factor=4)
    return tmp_path


def _sample(model, seed=5):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    positive = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
    negative = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed).float()


def _load(pack, model, name, strength, mode, schedule=None):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, name, strength, mode, schedule=schedule)["result"][0]


def _schedule(pack, keyframes, negative=1.0):
    return pack.NODE_CLASS_MAPPINGS["LycorisSchedule"]().build("always", keyframes, "hold", negative)[0]


def _compiled(model, backend="inductor"):
    """What core's TorchCompileModel node does (its node offers inductor and cudagraphs; the
    counters tests use dynamo's "eager" backend: the same tracing, guards and breaks, no codegen)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    if backend == "inductor":
        return TorchCompileModel.execute(model, "inductor")[0]
    compiled = model.clone(disable_dynamic=True)
    set_torch_compile_wrapper(compiled, backend=backend)
    return compiled


def _counts():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def _fresh_dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("mode, weight_dtype", [("bypass", "fp8_e4m3fn"), ("auto", "fp8_e4m3fn"),
                                                ("merge", "default"), ("bypass", "default")])
def test_compiled_sampling_equals_the_uncompiled_run(pack, recent, folder, mode, weight_dtype):
    from comfy.model_patcher import ModelPatcher

    base = tiny_flux(folder, weight_dtype=weight_dtype)
    model = _load(pack, _load(pack, base, "lora0.safetensors", 0.8, mode), "lokr2.safetensors", 0.6, mode)
    eager = _sample(model)
    _fresh_dynamo()
    compiled = _compiled(model)
    assert isinstance(compiled, ModelPatcher)
    got = _sample(compiled)
    effect = float((eager - _sample(base)).norm())
    assert effect > 0
    assert float((got - eager).norm()) <= 1e-4 * effect + 1e-5 * float(eager.norm())
    assert _counts()[1] > 0, "nothing was compiled"


def test_our_adapters_add_no_graph_break_and_strength_changes_compile_nothing(pack, recent, folder):
    base = tiny_flux(folder)
    _fresh_dynamo()
    _sample(_compiled(base, "eager"))
    plain_breaks, _ = _counts()

    _fresh_dynamo()
    first = _load(pack, base, "lora0.safetensors", 1.0, "bypass")
    first = _load(pack, first, "lokr2.safetensors", 0.7, "bypass")
    _sample(_compiled(first, "eager"))
    breaks, graphs = _counts()
    assert breaks == plain_breaks, f"our bypass added {breaks - plain_breaks} graph breaks"
    assert graphs > 0
    for strengths in ((0.5, 0.7), (0.5, 0.2), (1.3, -0.4)):  # the workflow re-run with other strengths
        model = _load(pack, base, "lora0.safetensors", strengths[0], "bypass")
        model = _load(pack, model, "lokr2.safetensors", strengths[1], "bypass")
        eager = _sample(model)
        got = _sample(_compiled(model, "eager"))
        assert _counts()[1] == graphs, f"strengths {strengths}: {_counts()[1] - graphs} new graphs compiled"
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # a file of the same structure (another LoRA of the same rank and layers) is new data too
    model = _load(pack, _load(pack, base, "lora1.safetensors", 0.9, "bypass"), "lokr2.safetensors", 0.7, "bypass")
    torch.testing.assert_close(_sample(_compiled(model, "eager")), _sample(model), rtol=1e-5, atol=1e-5)
    assert _counts() == (breaks, graphs), "a same-structure file recompiled"


def test_a_schedule_changes_strength_inside_one_compiled_run(pack, recent, folder):
    """A lightning LoRA for the first step, another strength on the negative pass: the compiled run
    follows it exactly, and changing the schedule compiles nothing new."""
    base = tiny_flux(folder)
    _fresh_dynamo()
    first = _load(pack, base, "lora0.safetensors", 1.0, "merge", _schedule(pack, "0:1, 1 steps:0", 0.5))
    torch.testing.assert_close(_sample(_compiled(first, "eager")), _sample(first), rtol=1e-5, atol=1e-5)
    _, graphs = _counts()
    for keyframes, negative in (("0:0.3, 0.5:1", 0.0), ("0:1, 1:0", 2.0)):
        model = _load(pack, base, "lora0.safetensors", 1.0, "merge", _schedule(pack, keyframes, negative))
        torch.testing.assert_close(_sample(_compiled(model, "eager")), _sample(model), rtol=1e-5, atol=1e-5)
        assert _counts()[1] == graphs, f"schedule {keyframes}: new graphs compiled"
