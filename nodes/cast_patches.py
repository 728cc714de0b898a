"""Norm adapters beside quantized norm layers: applied by the layer's own cast.

Bypass wraps Linear/Conv forwards; a norm layer's adapter (LyCORIS `w_norm`/`b_norm`) changes the
weight and bias the norm layer computes with, and merging it into an fp8-stored norm weight rounds
it away. ComfyUI's cast layers (`comfy.ops`, which fp8 models use for their norms) run every
function in `weight_function` / `bias_function` on the weight they cast for each call: the adapter
goes there, so the stored weight is never written and the change is kept in full.

0.28 injects them (lists of functions, added after each load and removed before the next); the
March-2024 runtime has one function per layer and casts only layers with `comfy_cast_weights`,
both set as object patches that unpatch restores.
"""

from __future__ import annotations

import comfy.utils

from .bypass import extend_injected_plan

INJECTION_KEY = "lycoris_cast_patches"


class CastTimePatch:
    """`f(tensor) -> tensor` for a layer's `weight_function`/`bias_function`: the cast weight (or
    bias) plus the adapter's change at `strength`, in the cast's dtype."""

    def __init__(self, adapter, strength: float, part: str, previous=None):
        self.adapter, self.strength, self.part, self.previous = adapter, float(strength), part, previous
        self._moved = {}  # device -> the adapter's copy there

    def __call__(self, tensor):
        if self.previous is not None:  # the March-2024 runtime's single function, kept in front of ours
            tensor = self.previous(tensor)
        adapter = self._moved.get(tensor.device)
        if adapter is None:
            adapter = self._moved[tensor.device] = self.adapter.moved(tensor.device)
        if self.part == "weight":
            new = adapter.patch(tensor, self.strength)[0]
        else:
            new = adapter.patch_bias(tensor, self.strength)
        return new.to(tensor.dtype)


def casts_in_forward(layer) -> bool:
    """Whether the layer is one of ComfyUI's cast ops (it applies weight/bias functions per call)."""
    return layer is not None and hasattr(layer, "weight_function") and hasattr(layer, "comfy_cast_weights")


def _parts(adapter):
    return ("weight", "bias") if adapter.changes_bias() else ("weight",)


class CastPatchPlan:
    """Layer path -> ((adapter, strength), ...), installed in whichever model the patcher holds."""

    def __init__(self, layers: dict):
        self.layers = layers

    def extended(self, additions) -> "CastPatchPlan":
        layers = dict(self.layers)
        for path, adapter, strength in additions:
            layers[path] = layers.get(path, ()) + ((adapter, strength),)
        return CastPatchPlan(layers)

    def inject(self, patcher) -> None:
        for path, entries in self.layers.items():
            module = comfy.utils.get_attr(patcher.model, path)
            for adapter, strength in entries:
                for part in _parts(adapter):
                    functions = list(getattr(module, f"{part}_function", None) or [])
                    functions.append(_Owned(CastTimePatch(adapter, strength, part), self))
                    setattr(module, f"{part}_function", functions)

    def eject(self, patcher) -> None:
        for path in self.layers:
            module = comfy.utils.get_attr(patcher.model, path)
            for part in ("weight", "bias"):
                functions = getattr(module, f"{part}_function", None)
                if isinstance(functions, list):
                    setattr(module, f"{part}_function",
                            [f for f in functions if not (isinstance(f, _Owned) and f.plan is self)])


class _Owned:
    """A CastTimePatch tagged with the plan that installed it (eject removes only its own)."""

    def __init__(self, patch: CastTimePatch, plan: CastPatchPlan):
        self.patch, self.plan = patch, plan

    def __call__(self, tensor):
        return self.patch(tensor)


def add_cast_patches(patcher, additions) -> None:
    """Apply `additions` ((path, adapter, strength), ...) in the layers' own casts on `patcher`."""
    if not additions or extend_injected_plan(patcher, INJECTION_KEY, CastPatchPlan({}), additions):
        return
    for path, adapter, strength in additions:  # March 2024: one function per layer, chained
        module = comfy.utils.get_attr(patcher.model, path)
        for part in _parts(adapter):
            name = f"{path}.{part}_function"
            previous = patcher.object_patches.get(name, getattr(module, f"{part}_function", None))
            patcher.add_object_patch(name, CastTimePatch(adapter, strength, part, previous))
        patcher.add_object_patch(f"{path}.comfy_cast_weights", True)
