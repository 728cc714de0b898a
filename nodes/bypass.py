"""Bypass mode: run adapters in the layer's forward, y' = g(f(x) + h(x)), never touching the
base weight, so quantized (fp8, GGUF, ...) and offloaded layers keep their full effect.

A layer's `forward` is replaced through a ModelPatcher object patch, which ComfyUI applies when
it loads the model and undoes on unpatch; clones stay independent because each clone gets its
own `BypassForward` (stacking makes a new one holding the previous entries plus the new one).
"""

from __future__ import annotations

import torch

from ..lycoris_core import LayerGeometry
from ..lycoris_core.algos.base import chain_inputs, plan_bypass, weight_token

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

    def __call__(self, x, *args, **kwargs):
        entries = self._adapters_on(x.device)
        token = _stored_weight_token(self.module)
        # input-side transforms (rotations, scales, GLoRA's x + a(x)) run before the base forward
        steps, needs_weight = plan_bypass([(a, m, offset is None) for a, m, offset in entries], self.geometry, token)
        weight = None
        if needs_weight:
            weight, bias = _layer_weights(self.module, x)
        else:  # output-side families still need the bias: it is not rotated or scaled
            bias = getattr(self.module, "bias", None)
            bias = bias.to(x.dtype) if isinstance(bias, torch.Tensor) and bias.is_floating_point() else None
        inputs = chain_inputs(x, steps, weight, self.geometry, token)
        y = type(self.module).forward(self.module, inputs[0], *args, **kwargs)
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
        return y


def _stored_weight_token(module):
    """Identity and version of the layer's stored weight, so adapters can keep what depends on W
    (DoRA's norms) until it changes; None where the layer has no plain tensor to key on."""
    weight = getattr(module, "weight", None)
    try:
        return weight_token(weight) if isinstance(weight, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - tensor subclasses without storage: no caching
        return None
