"""Scheduled adapters through ComfyUI's own sampler: at every step (and on each of the positive and
negative passes) the output equals the model merged at that step's strength.

The oracle samples a plain model whose model function, at each call, runs models merged by the
pack's merge mode at the strength the schedule gives that call's step and batch rows (a fresh
model per strength, so each keeps its own merged weights).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import lycoris_file, tiny_sd15

STEPS, CFG = 4, 2.5


def _schedule(pack, keyframes, negative=1.0, interpolation="hold"):
    node = pack.NODE_CLASS_MAPPINGS["LycorisSchedule"]()
    return node.build("always", keyframes, interpolation, negative)[0]


def _load(pack, model, strength, mode, schedule=None):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    return node.load(model, "adapter.safetensors", strength, mode, schedule=schedule)["result"][:2]


def _sample(model):
    import comfy.sample

    g = torch.Generator().manual_seed(11)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    positive = [[torch.randn(1, 3, 64, generator=g), {}]]
    negative = [[torch.randn(1, 3, 64, generator=g), {}]]
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=11).float()


def _oracle(pack, schedule, strength, base_weights=None):
    """A plain model whose every call is answered, chunk by chunk, by models merged at the call's
    scheduled strengths."""
    from lycoris_pack.lycoris_core.schedule import step_of

    merged = {}

    def merged_at(m):
        if m not in merged:
            model = tiny_sd15()
            if base_weights is not None:
                model.model.diffusion_model.load_state_dict(base_weights)
            merged[m] = model if m == 0 else _load(pack, model, m, "merge")[0]
            merged[m].patch_model()
        return merged[m]

    def wrapper(apply_model, args):
        options = args["c"].get("transformer_options", {})
        sigma = float(args["timestep"].reshape(-1)[0])
        sample_sigmas = options.get("sample_sigmas")
        step, steps = step_of(sigma, sample_sigmas) if sample_sigmas is not None else (None, None)
        chunks = args["cond_or_uncond"]
        outputs = []
        for i, chunk in enumerate(chunks):
            m = strength * schedule.multiplier(step, steps, chunk == 1)
            out = merged_at(m).model.apply_model(args["input"], args["timestep"], **args["c"])
            outputs.append(out.chunk(len(chunks))[i])
        return torch.cat(outputs)

    plain = tiny_sd15()
    if base_weights is not None:
        plain.model.diffusion_model.load_state_dict(base_weights)
    plain.set_model_unet_function_wrapper(wrapper)
    return plain, merged


@pytest.fixture
def adapter(comfy, tmp_path):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)
    lycoris_file(tiny_sd15().model.diffusion_model, tmp_path / "adapter.safetensors", "lora_unet_", "lora",
                 conv_dim=4, conv_alpha=2)


def _needs_sample_sigmas():
    try:
        import comfy.patcher_extension  # noqa: F401
    except ImportError:
        pytest.skip("the March-2024 sampler passes no sigma schedule to the model: no step to follow")


@pytest.mark.parametrize("keyframes, negative, interpolation", [
    ("0:1, 2 steps:0", 1.0, "hold"),        # a lightning LoRA for the first 2 steps
    ("0:0.2, 0.5:1", 0.0, "hold"),          # late, and kept out of the negative pass
    ("0:0, 1:1", 0.5, "linear"),            # a ramp, half as strong on the negative pass
])
@pytest.mark.parametrize("storage", ["fp32", "fp8"])
def test_scheduled_sampling_equals_the_model_merged_at_each_steps_strength(pack, adapter, keyframes, negative,
                                                                          interpolation, storage):
    _needs_sample_sigmas()
    import comfy.model_patcher

    schedule = _schedule(pack, keyframes, negative, interpolation)
    model = tiny_sd15()
    if storage == "fp8":
        from test_bypass import _to_fp8

        _to_fp8(model)
    base_weights = {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    ours, report = _load(pack, model, 0.9, "merge", schedule)
    assert "schedule:" in report and "follow it in bypass" in report, report
    assert type(ours) is type(model) and isinstance(ours, comfy.model_patcher.ModelPatcher)
    got = _sample(ours)
    oracle, merged = _oracle(pack, schedule, 0.9, base_weights)
    try:
        expected = _sample(oracle)
    finally:
        for patcher in merged.values():
            patcher.unpatch_model()
    assert len(merged) >= 2, f"the schedule used only the strengths {sorted(merged)}: nothing was scheduled"
    plain = _sample(tiny_sd15() if storage == "fp32" else _plain_from(base_weights))
    effect = float((expected - plain).norm())
    assert effect > 0
    # fp32 roundoff (bypass and merge order their sums differently) grows with the output's own size
    error = float((got - expected).norm())
    assert error <= 1e-4 * effect + 1e-6 * float(expected.norm()), (error, effect)


def _plain_from(weights):
    model = tiny_sd15()
    model.model.diffusion_model.load_state_dict(weights)
    return model


def test_fraction_keyframes_run_on_every_runtime(pack, adapter):
    """'0:1, 0.5:0' needs no step count: on a runtime without the sampler's sigmas it follows the
    noise level; a strength-0 phase leaves the output as the plain model's."""
    schedule = _schedule(pack, "0:0")
    ours, report = _load(pack, tiny_sd15(), 1.0, "auto", schedule)
    assert "follow it in bypass" in report
    torch.testing.assert_close(_sample(ours), _sample(tiny_sd15()), rtol=0, atol=0)


def test_schedule_node_errors_name_the_keyframe(pack):
    node = pack.NODE_CLASS_MAPPINGS["LycorisSchedule"]()
    with pytest.raises(ValueError, match=r"'0,5:'.*did you mean 0\.5"):
        node.build("always", "0:1; 0,5:0", "hold", 1.0)
    with pytest.raises(ValueError, match="fraction of the steps"):
        node.build("always", "0:1, 3:0", "hold", 1.0)
