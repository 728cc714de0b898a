"""Bypass mode: run adapters in the layer's forward, y' = g(f(x) + h(x)), never touching the
base weight, so quantized (fp8, GGUF, ...) and offloaded layers keep their full effect.

A layer's `forward` is replaced through a ModelPatcher object patch, which ComfyUI applies when
it loads the model and undoes on unpatch; clones stay independent because each clone gets its
own `BypassForward` (stacking makes a new one holding the previous entries plus the new one).
"""

from __future__ import annotations

import torch

from ..lycoris_core import LayerGeometry

try:
    from comfy.ops import cast_bias_weight
except ImportError:  # pragma: no cover - every known runtime has it
    cast_bias_weight = None


def _layer_weights(module, x):
    """The layer's weight and bias as the layer itself would use them on `x` (dequantised)."""
    if cast_bias_weight is not None and hasattr(module, "weight_function"):
        try:
            return cast_bias_weight(module, x)
        except Exception:  # noqa: BLE001 - custom ops: fall back to the raw parameters
            pass
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype.itemsize >= 2:
        return weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return None, None


class BypassForward:
    """Callable set as `module.forward`: the base forward, then each adapter in turn."""

    def __init__(self, module, entries):
        self.module = module
        self.entries = tuple(entries)  # ((adapter, strength, offset), ...)
        self.geometry = LayerGeometry.of(module)
        self._moved: dict = {}

    def extended(self, adapter, strength: float, offset=None) -> "BypassForward":
        return BypassForward(self.module, self.entries + ((adapter, strength, offset),))

    def _adapters_on(self, device):
        """The adapters' tensors moved to the layer's device once, not every step."""
        moved = self._moved.get(device)
        if moved is None:
            moved = [(adapter.moved(device), strength, offset) for adapter, strength, offset in self.entries]
            self._moved[device] = moved
        return moved

    def needs_weight(self) -> bool:
        return any(adapter.bypass_needs_weight() for adapter, _, _ in self.entries)

    def __call__(self, x, *args, **kwargs):
        y = type(self.module).forward(self.module, x, *args, **kwargs)
        weight = None
        if self.needs_weight():
            weight, bias = _layer_weights(self.module, x)
        else:  # output-side families still need the bias: it is not rotated or scaled
            bias = getattr(self.module, "bias", None)
            bias = bias.to(x.dtype) if isinstance(bias, torch.Tensor) and bias.is_floating_point() else None
        for adapter, strength, offset in self._adapters_on(x.device):
            if offset is None:
                y = adapter.bypass(x, y, weight, bias, self.geometry, strength)
                continue
            # a slice of a fused layer (Flux qkv / linear1): rows of the output
            dim, start, length = offset
            part = y.narrow(-1, start, length)
            w = None if weight is None else weight.narrow(dim, start, length)
            b = None if bias is None else bias.narrow(0, start, length)
            y = y.clone()
            y.narrow(-1, start, length).copy_(adapter.bypass(x, part, w, b, self.geometry, strength))
        return y
