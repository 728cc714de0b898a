"""Per model call state of scheduled adapters: the sampling step and which batch rows are the
negative pass, published before every call by a model-function wrapper and read by the bypassed
layers, so a strength can change from one call to the next without touching a weight.

Thread-local: ComfyUI's multi-GPU CFG split runs batch chunks in threads, each its own call.
"""

from __future__ import annotations

import logging
import threading

from ..lycoris_core.schedule import Schedule, step_of

NEGATIVE = 1  # ComfyUI's `cond_or_uncond` entry for the unconditional (negative) pass


class CallState(threading.local):
    """The current call as the wrapper saw it (step, steps, cond_or_uncond); step 0 of 1 with
    every row positive outside a sampler (a direct model call)."""

    def __init__(self):
        self.step, self.steps, self.chunks = 0, 1, (0,)

    def begin(self, step: int, steps: int, chunks) -> None:
        self.step, self.steps, self.chunks = step, steps, tuple(chunks) or (0,)


class ScheduledStrength:
    """A bypass entry's strength that follows a schedule: the loader's strength (block weight
    included) times the schedule's multiplier for this call, per batch chunk."""

    def __init__(self, base: float, schedule: Schedule, state: CallState):
        self.base, self.schedule, self.state = float(base), schedule, state

    def now(self) -> tuple[float, ...]:
        """One strength per batch chunk of the current call (ComfyUI's `cond_or_uncond` order)."""
        s = self.state
        return tuple(self.base * self.schedule.multiplier(s.step, s.steps, chunk == NEGATIVE) for chunk in s.chunks)

    def __repr__(self):
        return f"ScheduledStrength({self.base:g}, {self.schedule.describe()})"


def strengths_now(entries):
    """(per-chunk entries or None, entries) for a call: a list of entry tuples per batch chunk when
    scheduled strengths differ between chunks, else None and one list with every strength a number.
    Entries at strength 0 for the call are dropped (the layer runs as if the adapter were absent,
    as a loader at strength 0 leaves it)."""
    if not any(isinstance(m, ScheduledStrength) for _, m, _ in entries):
        return None, entries
    resolved = [(a, m.now() if isinstance(m, ScheduledStrength) else None, offset) for a, m, offset in entries]
    chunks = max((len(m) for _, m, _ in resolved if m is not None), default=1)
    per_chunk = [[(a, m if now is None else now[i], offset) for (a, m, offset), (_, now, _) in zip(entries, resolved)
                  if (m if now is None else now[i]) != 0] for i in range(chunks)]
    if all(chunk == per_chunk[0] for chunk in per_chunk):
        return None, per_chunk[0]
    return per_chunk, None


def publish_calls(patcher, state: CallState) -> None:
    """Wrap the model call so `state` knows each call's step and negative rows, keeping any
    wrapper another node installed. The step comes from the sampler's sigma schedule
    (`sample_sigmas`, ComfyUI >= 0.3.x); without it, from the model's own sigma-to-percent map."""
    previous = patcher.model_options.get("model_function_wrapper")
    loaded_sampling = patcher.model.model_sampling
    warned = []

    def wrapper(apply_model, args):
        options = args.get("c", {}).get("transformer_options", {})
        sigma = float(args["timestep"].reshape(-1)[0])  # one host read per model call, outside the layers
        sample_sigmas = options.get("sample_sigmas")
        if sample_sigmas is not None and len(sample_sigmas) > 1:
            step, steps = step_of(sigma, sample_sigmas)
        else:
            sampling = getattr(getattr(apply_model, "__self__", None), "model_sampling", None) or loaded_sampling
            progress = 1.0 - float(sampling.timestep(args["timestep"]).reshape(-1)[0]) / 1000.0
            step, steps = min(max(int(progress * 1000), 0), 999), 1000
            if not warned:
                warned.append(True)
                logging.warning("LyCORIS schedule: this ComfyUI does not pass the sampler's sigmas to the model; "
                                "progress is read from the noise level instead")
        state.begin(step, steps, args.get("cond_or_uncond") or options.get("cond_or_uncond") or (0,))
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patcher.set_model_unet_function_wrapper(wrapper)


def check_schedule_runtime(schedule: Schedule) -> None:
    """Step-count keyframes need the sampler's sigma schedule, which the March-2024 runtime does
    not pass to the model: say so at load time rather than follow another schedule."""
    try:
        import comfy.patcher_extension  # noqa: F401 - present since the runtimes that pass sample_sigmas
    except ImportError:
        if any(k.in_steps for k in schedule.keyframes):
            raise ValueError("keyframes in steps ('2 steps:0') need a ComfyUI that passes the sampler's sigmas "
                             "to the model (2025 or newer); use fractions of the run (0.1:0) here") from None
