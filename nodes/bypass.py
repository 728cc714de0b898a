"""Bypass mode: run adapters in the layer's forward, y' = g(f(x) + h(x)), never touching the
base weight, so quantized (fp8, int8, mxfp8, nvfp4, GGUF, ...) and offloaded layers keep the
adapter's full effect.

A `BypassPlan` is plain data bound to layer paths, not to module objects: when a patcher applies
it, it looks each layer up in *that patcher's* model. ComfyUI 0.28 builds fresh models for the
same patches (MultiGPU deep clones, dynamic-VRAM delegates), and each then runs its own layers.
Where the runtime has injections (`ModelPatcher.set_injections`) the plan is one; older runtimes
(no injections, no re-instantiated models) get one object patch of `<path>.forward` per layer.
Either way ComfyUI undoes it on unpatch. Stacking builds a new plan (previous entries plus the new
ones), so clones stay independent.

Each call runs in one of two forms, whichever the core's cost model says is cheaper for its
token count: factored (the adapters' small products beside the layer's own forward: cost grows
with tokens) or patched (on layers whose forward reads a dequantised copy of the weight anyway,
the adapters are merged into that transient copy and the layer's op runs on it: cost per call,
whatever the tokens). Both leave the stored weight untouched and give the merge's result.
"""

from __future__ import annotations

import math

import comfy.utils
import torch
import torch.nn.functional as F

from ..lycoris_core.algos.base import COMPUTE_DTYPE, chain_inputs, patching_cheaper, plan_bypass, weight_token
from .layers import computes_on_cast_weight, geometry, is_quantized_tensor

try:
    from comfy.ops import cast_bias_weight
except ImportError:  # pragma: no cover - every known runtime has it
    cast_bias_weight = None
try:  # ComfyUI 0.28: casts hand back an offload handle that must be released (dynamic VRAM pins)
    from comfy.ops import uncast_bias_weight
except ImportError:
    uncast_bias_weight = None

try:  # ComfyUI 0.28: each layer op checks for an interrupt first
    from comfy.ops import run_every_op
except ImportError:
    run_every_op = None

try:  # ComfyUI >= 0.3.4x
    from comfy.patcher_extension import PatcherInjection
except ImportError:  # the pinned March-2024 runtime
    PatcherInjection = None

INJECTION_KEY = "lycoris_bypass"


def _no_release():
    return None


def _layer_weights(module, x):
    """(weight, bias, release): the layer's weight and bias, dequantised, as the layer itself would
    use them on `x`; call `release()` once done with them."""
    release = _no_release
    own_cast = getattr(type(module), "cast_bias_weight", None)  # op classes with their own dequantiser (GGUF)
    try:
        if callable(own_cast):
            weight, bias = module.cast_bias_weight(x)[:2]
        elif cast_bias_weight is not None and uncast_bias_weight is not None and hasattr(module, "weight_function"):
            weight, bias, handle = cast_bias_weight(module, x, offloadable=True)
            release = lambda: uncast_bias_weight(module, weight, bias, handle)  # noqa: E731
        elif cast_bias_weight is not None and hasattr(module, "weight_function"):
            weight, bias = cast_bias_weight(module, x)[:2]
        else:
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    except Exception:  # noqa: BLE001 - an op class with another signature: use the raw parameters
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if is_quantized_tensor(weight):  # a runtime that hands the stored form back
        weight = weight.dequantize()
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype.itemsize >= 2):
        return None, None, release
    return weight.to(x.dtype), None if bias is None else bias.to(x.dtype), release


class BypassForward:
    """Callable set as `module.forward`: the layer's own forward, then each adapter in turn."""

    def __init__(self, module, entries, previous=None, moved=None):
        self.module = module
        self.entries = tuple(entries)  # ((adapter, strength, offset), ...)
        self.previous = previous  # an instance-level forward this one wraps (another object patch)
        self.geometry = geometry(module)
        self._moved = {} if moved is None else moved  # device -> adapters there, shared by re-injections
        self.patchable = previous is None and computes_on_cast_weight(module) and bool(self.geometry.weight_shape)

    def extended(self, adapter, strength: float, offset=None) -> "BypassForward":
        return BypassForward(self.module, self.entries + ((adapter, strength, offset),), self.previous)

    def _adapters_on(self, device):
        """The adapters' tensors moved to the layer's device once, not every step."""
        moved = self._moved.get(device)
        if moved is None:
            moved = [(adapter.moved(device), strength, offset) for adapter, strength, offset in self.entries]
            self._moved[device] = moved
        return moved

    def __call__(self, x, *args, **kwargs):
        entries = self._adapters_on(x.device)
        if self.patchable and not args and not kwargs and self._patching_cheaper(x, entries):
            out = self._patched_forward(x, entries)
            if out is not None:
                return out
        token = _stored_weight_token(self.module)
        # input-side transforms (rotations, scales, GLoRA's x + a(x)) run before the base forward
        steps, needs_weight = plan_bypass([(a, m, offset is None) for a, m, offset in entries], self.geometry, token)
        weight, release = None, _no_release
        if needs_weight:
            weight, bias, release = _layer_weights(self.module, x)
        else:  # output-side families still need the bias: it is not rotated or scaled
            bias = getattr(self.module, "bias", None)
            bias = bias.to(x.dtype) if isinstance(bias, torch.Tensor) and bias.is_floating_point() else None
        try:
            inputs = chain_inputs(x, steps, weight, self.geometry, token)
            base_forward = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
            y = base_forward(inputs[0], *args, **kwargs)
            for (adapter, strength, offset), (_, _, side), x_k in zip(entries, steps, inputs[1:]):
                if offset is None:
                    y = adapter.bypass(x_k, y, weight, bias, self.geometry, strength, token=token, input_applied=side)
                    continue
                # a slice of a fused layer (Flux qkv / linear1): rows of the output
                dim, start, length = offset
                part = y.narrow(-1, start, length)
                w = None if weight is None else weight.narrow(dim, start, length)
                b = None if bias is None else bias.narrow(0, start, length)
                y = y.clone()
                y.narrow(-1, start, length).copy_(adapter.bypass(x_k, part, w, b, self.geometry, strength, token=token))
        finally:
            release()
        return y

    def _patching_cheaper(self, x, entries) -> bool:
        """The core's cost model for this call: its output positions, the shape each entry patches."""
        shape = self.geometry.weight_shape
        if self.geometry.linear:
            tokens = x.numel() // max(1, x.shape[-1])
        else:  # output positions of the conv (stride shrinks them)
            tokens = x.numel() // max(1, x.shape[1] * math.prod(self.geometry.stride))
        parts = [(adapter, shape if offset is None else _rows(shape, offset)) for adapter, _, offset in entries]
        return patching_cheaper(parts, tokens, shape)

    def _patched_forward(self, x, entries):
        """The layer's op on W' = merge(W) for the weight it reads this call (a transient copy:
        the stored weight is never written); None when the layer hands back no float weight."""
        weight, bias, release = _layer_weights(self.module, x)
        try:
            if weight is None:
                return None
            if run_every_op is not None:
                run_every_op()  # what the layer's own forward does first (honours interrupts)
            w, b, owned = weight, bias, False
            for adapter, strength, offset in entries:
                if offset is None:
                    w, b = adapter.patch(w, strength, b, inplace=owned)  # fp32; a new tensor unless owned
                else:  # rows of a fused layer, patched where they lie in a copy of our own
                    if not owned:
                        w = w.to(COMPUTE_DTYPE, copy=True)
                    dim, start, length = offset
                    rows = w.narrow(dim, start, length)
                    part = None if b is None or dim != 0 else b.narrow(0, start, length)
                    new_rows, new_part = adapter.patch(rows, strength, part, inplace=True)
                    if new_rows.data_ptr() != rows.data_ptr():
                        rows.copy_(new_rows)
                    if part is not None and adapter.changes_bias():
                        b = b.to(COMPUTE_DTYPE, copy=True)
                        b.narrow(0, start, length).copy_(new_part)
                owned = True
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
            conv = getattr(self.module, "_conv_forward", None)
            return conv(x, w, b) if conv is not None and not self.geometry.linear else F.linear(x, w, b)
        finally:
            release()


def _rows(shape, offset):
    """The shape of the rows a fused layer's slice (dim, start, length) covers."""
    dim, _, length = offset
    return tuple(length if i == dim else n for i, n in enumerate(shape))


def _stored_weight_token(module):
    """Identity and version of the layer's stored weight, so adapters can keep what depends on W
    (DoRA's norms) until it changes; None where the layer has no plain tensor to key on."""
    weight = getattr(module, "weight", None)
    try:
        return weight_token(weight) if isinstance(weight, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - tensor subclasses without storage: no caching
        return None


class BypassPlan:
    """Layer path -> adapter entries; applied to whichever model the patcher holds."""

    def __init__(self, layers: dict):
        self.layers = layers  # path -> ((adapter, strength, offset), ...)
        self._moved: dict = {}  # path -> {device: moved adapters}

    def extended(self, additions) -> "BypassPlan":
        layers = dict(self.layers)
        for path, adapter, strength, offset in additions:
            layers[path] = layers.get(path, ()) + ((adapter, strength, offset),)
        return BypassPlan(layers)

    def inject(self, patcher) -> None:
        for path, entries in self.layers.items():
            module = comfy.utils.get_attr(patcher.model, path)
            previous = module.__dict__.get("forward")
            if isinstance(previous, BypassForward):  # another plan still on a shared model: replace it, never stack
                previous = previous.previous
            module.forward = BypassForward(module, entries, previous, self._moved.setdefault(path, {}))

    def eject(self, patcher) -> None:
        for path in self.layers:
            module = comfy.utils.get_attr(patcher.model, path)
            current = module.__dict__.get("forward")
            if not isinstance(current, BypassForward):
                continue
            if current.previous is None:
                del module.forward
            else:
                module.forward = current.previous


if PatcherInjection is not None:
    class _BypassInjection(PatcherInjection):
        def __init__(self, plan: BypassPlan):
            super().__init__(plan.inject, plan.eject)
            self.plan = plan


def add_bypass(patcher, additions) -> None:
    """Run `additions` ((path, adapter, strength, offset), ...) beside their layers on `patcher`
    (a clone), after whatever bypass it already has."""
    if not additions:
        return
    if PatcherInjection is not None and hasattr(patcher, "set_injections"):
        current = [i for i in (patcher.get_injections(INJECTION_KEY) or []) if isinstance(i, _BypassInjection)]
        plan = (current[0].plan if current else BypassPlan({})).extended(additions)
        patcher.set_injections(INJECTION_KEY, [_BypassInjection(plan)])
        return
    for path, adapter, strength, offset in additions:  # older runtimes: one object patch per layer
        name = f"{path}.forward"
        existing = patcher.object_patches.get(name)
        if isinstance(existing, BypassForward):
            patcher.add_object_patch(name, existing.extended(adapter, strength, offset))
        else:
            module = comfy.utils.get_attr(patcher.model, path)
            patcher.add_object_patch(name, BypassForward(module, [(adapter, strength, offset)]))


def bypassed_layers(patcher) -> dict:
    """Layer path -> adapter entries that `patcher` runs in bypass mode."""
    getter = getattr(patcher, "get_injections", None)
    injections = (getter(INJECTION_KEY) or []) if getter is not None else []
    for injection in injections:
        plan = getattr(injection, "plan", None)
        if plan is not None:
            return dict(plan.layers)
    return {name[: -len(".forward")]: value.entries for name, value in patcher.object_patches.items()
            if isinstance(value, BypassForward)}
