"""What changes from one model call to the next in bypass: each adapter's strength (a schedule's
step, the negative pass) and T-LoRA's timestep. A model-function wrapper works them out before
every call, outside any compiled region, and writes them into the bypass plans' tensors on the
call's device (`BypassPlan.begin_call`); the bypassed layers only read those tensors.

No process-wide or thread-wide state: each plan keeps its own tensors per device, so two models
sampled at once (Wan 2.2's experts, multi-GPU threads, two samplers) never see each other's.
"""

from __future__ import annotations

import logging

from ..lycoris_core.schedule import Schedule, step_of

NEGATIVE = 1  # ComfyUI's `cond_or_uncond` entry for the unconditional (negative) pass


class ScheduledStrength:
    """A bypass entry's strength that follows a schedule: the loader's strength (block weight
    included) times the schedule's multiplier at a step, on the positive or the negative pass."""

    def __init__(self, base: float, schedule: Schedule):
        self.base, self.schedule = float(base), schedule

    def at(self, step: int, steps: int, negative: bool) -> float:
        return self.base * self.schedule.multiplier(step, steps, negative)

    @property
    def rows_vary(self) -> bool:
        """Whether the negative pass can get another strength than the positive one."""
        return self.schedule.negative != 1.0

    def __repr__(self):
        return f"ScheduledStrength({self.base:g}, {self.schedule.describe()})"


class PlanCalls:
    """The model-function wrapper: the call's step, negative rows and timestep into every plan,
    then the call (through whatever wrapper another node installed before us)."""

    def __init__(self, plans, previous, loaded_sampling):
        self.plans = tuple(plans)
        self.previous = previous
        self.loaded_sampling = loaded_sampling
        self.scheduled = any(plan.scheduled for plan in self.plans)
        self.timed = any(plan.uses_timestep for plan in self.plans)
        self.warned = False

    def __call__(self, apply_model, args):
        x, t = args["input"], args["timestep"]
        options = args.get("c", {}).get("transformer_options", {})
        chunks = tuple(args.get("cond_or_uncond") or options.get("cond_or_uncond") or (0,))
        sampling = getattr(getattr(apply_model, "__self__", None), "model_sampling", None) or self.loaded_sampling
        step = steps = timestep = None
        if self.scheduled:
            step, steps = self._step(t, options, sampling)
        if self.timed:  # stays on the device: T-LoRA's mask is computed there
            timestep = sampling.timestep(t).reshape(-1)[0]
        for plan in self.plans:
            plan.begin_call(x.device, step, steps, chunks, timestep)
        probing = [plan for plan in self.plans if plan.probe_calls_left > 0] if not _compiled(options) else []
        for plan in probing:
            plan.ran = set() if plan.ran is None else plan.ran
        try:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, t, **args["c"])
        finally:
            for plan in probing:
                plan.end_probe_call()

    def _step(self, t, options, sampling):
        """(step, steps) of this call: from the sampler's sigma schedule (`sample_sigmas`, ComfyUI >=
        0.3.x); without it, from the model's own sigma-to-percent map."""
        sigma = float(t.reshape(-1)[0])  # one host read per model call, outside the layers
        sample_sigmas = options.get("sample_sigmas")
        if sample_sigmas is not None and len(sample_sigmas) > 1:
            return step_of(sigma, sample_sigmas)
        if not self.warned:
            self.warned = True
            logging.warning("LyCORIS schedule: this ComfyUI does not pass the sampler's sigmas to the model; "
                            "progress is read from the noise level instead")
        progress = 1.0 - float(sampling.timestep(t).reshape(-1)[0]) / 1000.0
        return min(max(int(progress * 1000), 0), 999), 1000


def _compiled(options) -> bool:
    """Whether core's TorchCompileModel wraps this call (a traced forward records nothing to probe)."""
    wrappers = options.get("wrappers") or {}
    return any(isinstance(v, dict) and "torch.compile" in v for v in wrappers.values())


def publish_calls(patcher, plans) -> None:
    """Wrap `patcher`'s model call so `plans` get each call's data first. A wrapper of ours already
    there (an earlier loader's, for plans these extend) is replaced; another node's is kept inside."""
    previous = patcher.model_options.get("model_function_wrapper")
    if isinstance(previous, PlanCalls):
        previous = previous.previous
    patcher.set_model_unet_function_wrapper(PlanCalls(plans, previous, patcher.model.model_sampling))


def check_schedule_runtime(schedule: Schedule) -> None:
    """Step-count keyframes need the sampler's sigma schedule, which the March-2024 runtime does
    not pass to the model: say so at load time rather than follow another schedule."""
    try:
        import comfy.patcher_extension  # noqa: F401 - present since the runtimes that pass sample_sigmas
    except ImportError:
        if any(k.in_steps for k in schedule.keyframes):
            raise ValueError("keyframes in steps ('2 steps:0') need a ComfyUI that passes the sampler's sigmas "
                             "to the model (2025 or newer); use fractions of the run (0.1:0) here") from None
