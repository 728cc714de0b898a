"""Turn decoded adapters into ModelPatcher patches.

On runtimes with `comfy.weight_adapter.WeightAdapterBase` a patch is an object that computes the
patched weight lazily, when ComfyUI loads the model, from whatever weight it is handed (a slice
of a fused weight included). Older runtimes only understand tuples: there the patch is a "diff"
computed now from the model's current weight, with the strength left to ComfyUI where the
algorithm is additive.
"""

from __future__ import annotations

import torch

try:  # ComfyUI >= 0.3.3x
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # the pinned March-2024 runtime
    WeightAdapterBase = None

LAZY = WeightAdapterBase is not None


class _LazyPatch(WeightAdapterBase if LAZY else object):
    """One adapter (or its bias part) as a ComfyUI weight adapter."""

    def __init__(self, adapter, bias: bool = False):
        self.adapter = adapter
        self.bias = bias
        self.name = f"lycoris:{adapter.algo}"
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # `weight` may be a narrowed view of a fused weight: write into it in place.
        base = weight.to(torch.float32)
        if self.bias:
            new = self.adapter.patch_bias(base, strength)
        else:
            new, _ = self.adapter.patch(base, strength)
        change = (new - base).to(weight.device)
        if function is not None:
            change = function(change)
        weight += change.to(weight.dtype)
        return weight


def lazy_patch(adapter, bias: bool = False):
    return _LazyPatch(adapter, bias)


def diff_patch(adapter, base: torch.Tensor, strength: float, bias: bool = False):
    """(patch value, strength to hand to add_patches) for runtimes without weight adapters."""
    base32 = base.to(torch.float32)
    if bias:
        return (adapter.patch_bias(base32, strength) - base32,), 1.0
    if adapter.additive and "dora_scale" not in adapter.tensors and "lora_magnitude_vector" not in adapter.tensors:
        return (adapter.delta(base32),), strength
    new, _ = adapter.patch(base32, strength)
    return (new - base32,), 1.0


def embed_slice(change: torch.Tensor, full_shape, offset) -> torch.Tensor:
    """A slice's diff written into zeros of the fused weight's shape (runtimes without offsets)."""
    dim, start, length = offset
    full = torch.zeros(full_shape, dtype=change.dtype)
    full.narrow(dim, start, length).copy_(change)
    return full
