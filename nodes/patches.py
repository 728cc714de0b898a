"""Turn decoded adapters into ModelPatcher patches.

On runtimes with `comfy.weight_adapter.WeightAdapterBase` a patch is an object that computes the
patched weight lazily, when ComfyUI loads the model, from whatever weight it is handed (a slice
of a fused weight included). Older runtimes only understand tuples: there the patch is a "diff"
computed now from the model's current weight, with the strength left to ComfyUI where the
algorithm is additive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lycoris_core.algos.base import COMPUTE_DTYPE

try:  # ComfyUI >= 0.3.3x
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # the pinned March-2024 runtime
    WeightAdapterBase = None

LAZY = WeightAdapterBase is not None


@dataclass(frozen=True)
class PatchRecipe:
    """The non-tensor part of a patch: how to rebuild its core `Adapter` from tensors.

    `template` is the adapter without tensors (family, module name, file context, and its scale
    frozen as a number, so a rebuilt patch never reads a scalar back from a staged GPU tensor);
    `suffixes` names the tensors that follow the recipe in `weights`, in order. Not a tuple on
    purpose: ComfyUI's prefetch walks tuples and lists, and passes other objects through."""

    template: object
    suffixes: tuple
    bias: bool


class LycorisWeightPatch(WeightAdapterBase if LAZY else object):
    """One adapter (or its bias part) as a ComfyUI weight adapter.

    Honours the contract ComfyUI 0.28's memory manager relies on: built as
    `cls(loaded_keys, weights)`, with `weights = (PatchRecipe, *tensors)` holding every tensor
    the patch reads. Dynamic VRAM and low-VRAM loading copy those tensors into a staging buffer
    on the GPU and rebuild the patch around the copies; the rebuilt patch computes from them.
    """

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self.name = f"lycoris:{weights[0].template.algo}"

    @classmethod
    def of(cls, adapter, bias: bool = False) -> "LycorisWeightPatch":
        template = adapter.with_tensors({})
        template.scale_override = adapter.scale
        suffixes = tuple(adapter.tensors)
        return cls(set(), (PatchRecipe(template, suffixes, bias),) + tuple(adapter.tensors[s] for s in suffixes))

    def adapter(self, device):
        """The core adapter computing from this patch's tensors, moved to `device` where a
        caller hands a weight on another device than the tensors (unstaged low-VRAM patches)."""
        recipe, tensors = self.weights[0], self.weights[1:]
        tensors = (t if t.device == device else t.to(device) for t in tensors)
        return recipe.template.with_tensors(dict(zip(recipe.suffixes, tensors)))

    def calculate_shape(self, key):
        """None: an adapter never changes a weight's shape (so dynamic VRAM need not force-load)."""
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Patch `weight` in place and return it.

        `weight` may be a narrowed view of a fused weight (ComfyUI keeps the full tensor), so the
        result is written into it. ComfyUI's `function` maps the change, as for its own adapters;
        it is the identity for every patch this pack adds (its targets carry none), and then the
        change of an additive family goes straight into the weight (LoRA: one fused addmm).
        The math runs in fp32 whatever `intermediate_dtype` says (low-VRAM passes the weight's own
        fp16/bf16 there): the trainers' formulas (Hadamard products, Cayley inverses, DoRA norms)
        lose digits in half precision, the factors are small, and rounding once at the end makes
        a staged patch give bit for bit the weight a full load computes. Full-size fp32
        temporaries: the change (none for an in-place LoRA), plus one copy of a non-fp32 weight.
        """
        adapter = self.adapter(weight.device)
        work = weight if weight.dtype == COMPUTE_DTYPE else weight.to(COMPUTE_DTYPE)
        additive = adapter.additive and not adapter.has_dora and not self.weights[0].bias
        if additive and _is_identity(function, work):
            work = adapter.add_delta(work, strength, inplace=True)
        else:
            if self.weights[0].bias:
                change = adapter.patch_bias(work, strength) - work
            elif additive:
                change = adapter.delta(work)  # may be a stored tensor itself (Full): never scaled in place
                change = change if strength == 1 else change * strength
            else:
                change = adapter.patch(work, strength)[0] - work
            work += function(change) if function is not None else change
        if work is not weight:
            weight.copy_(work)
        return weight


def _is_identity(function, like: torch.Tensor) -> bool:
    """Whether ComfyUI's patch `function` leaves a change as it is (calculate_weight hands an
    identity lambda where the patch target names none)."""
    if function is None:
        return True
    probe = like.new_empty(0)
    return function(probe) is probe


def lazy_patch(adapter, bias: bool = False):
    return LycorisWeightPatch.of(adapter, bias)


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
