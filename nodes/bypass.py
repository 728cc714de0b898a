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
import types
import weakref

import comfy.utils
import torch
import torch.nn.functional as F

from ..lycoris_core.algos.base import COMPUTE_DTYPE, chain_inputs, patching_cheaper, plan_bypass, tensor_version
from .call_state import strengths_now
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

    def __init__(self, module, entries, previous=None, moved=None, plan=None):
        self.module = module
        self.plan = plan  # the BypassPlan that installed it (None: an object patch)
        self.entries = tuple(entries)  # ((adapter, strength, offset), ...)
        self.previous = previous  # an instance-level forward this one wraps (another object patch)
        self.geometry = geometry(module)
        self._moved = {} if moved is None else moved  # device -> adapters there, shared by re-injections
        self.patchable = previous is None and computes_on_cast_weight(module) and bool(self.geometry.weight_shape)
        self.has_bias = getattr(module, "bias", None) is not None
        self.active = True  # False once ejected

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
        if not self.active:  # ejected, then put back by another patch's eject: the layer as it was
            return self._base_forward()(x, *args, **kwargs)
        per_chunk, entries = strengths_now(self._adapters_on(x.device))
        if per_chunk is not None and x.shape[0] % len(per_chunk) == 0:
            # scheduled strengths that differ between the positive and negative rows of the batch
            return torch.cat([self._run(part, chunk, args, kwargs) if chunk else self._base_forward()(part, *args, **kwargs)
                              for part, chunk in zip(x.chunk(len(per_chunk)), per_chunk)])
        if per_chunk is not None:
            entries = per_chunk[0]
        if not entries:  # every adapter of the layer is at strength 0 for this call
            return self._base_forward()(x, *args, **kwargs)
        return self._run(x, entries, args, kwargs)

    def _run(self, x, entries, args, kwargs):
        """The layer's forward with `entries` ((adapter, strength, offset), strengths numbers)."""
        own_op = self.patchable and not args and not kwargs
        if own_op and self._patching_cheaper(x, entries):
            out = self._patched_forward(x, entries)
            if out is not None:
                return out
        # only adapters that keep something computed from W read the weight's token (built per call)
        token = weight_source_token(self.module) if any(a.caches_on_weight for a, _, _ in entries) else None
        # input-side transforms (rotations, scales, GLoRA's x + a(x)) run before the base forward
        steps, needs_weight = plan_bypass([(a, m, offset is None) for a, m, offset in entries], self.geometry, token)
        needs_bias = self.has_bias and any(adapter.bypass_reads_bias for adapter, _, _ in entries)
        if own_op and (needs_weight or needs_bias):
            return self._factored_on_cast(x, entries, steps, token)
        if needs_weight and any(side for _, _, side in steps):
            # the input side reads W: one cast for it, released before the layer casts again
            with _cast(self.module, x) as (weight, _):
                inputs = chain_inputs(x, steps, weight, self.geometry, token)
        else:
            inputs = chain_inputs(x, steps, None, self.geometry, token)
        y = self._base_forward()(inputs[0], *args, **kwargs)
        if not (needs_weight or needs_bias):
            return self._outputs(y, entries, steps, inputs, None, None, token)
        # the layer's own cast is over: the adapters get theirs (W, b as that cast hands them, on
        # the compute device), one at a time, never nested inside another
        with _cast(self.module, x) as (weight, bias):
            return self._outputs(y, entries, steps, inputs, weight, bias, token)

    def _factored_on_cast(self, x, entries, steps, token):
        """Factored form on a layer whose forward is "cast W and b, then the op": one cast serves the
        layer's op and the adapters, held until they are done."""
        with _cast(self.module, x) as (weight, bias):
            if weight is None:  # no float weight to be had: the layer's forward, adapters without W
                inputs = chain_inputs(x, steps, None, self.geometry, token)
                return self._outputs(self._base_forward()(inputs[0]), entries, steps, inputs, None, None, token)
            if run_every_op is not None:
                run_every_op()  # what the layer's own forward does first (honours interrupts)
            inputs = chain_inputs(x, steps, weight, self.geometry, token)
            return self._outputs(self._op(inputs[0], weight, bias), entries, steps, inputs, weight, bias, token)

    def _outputs(self, y, entries, steps, inputs, weight, bias, token):
        """Each adapter's output side on the base output `y`, in order."""
        for (adapter, strength, offset), (_, _, side), x_k in zip(entries, steps, inputs[1:]):
            if offset is None:
                y = adapter.bypass(x_k, y, weight, bias, self.geometry, strength, token=token, input_applied=side)
                continue
            # a slice of a fused layer (Flux qkv / linear1): rows of the output, written in place
            dim, start, length = offset
            w = None if weight is None else weight.narrow(dim, start, length)
            b = None if bias is None else bias.narrow(0, start, length)
            part = y.narrow(-1, start, length)
            new = adapter.bypass(x_k, part.clone(), w, b, self.geometry, strength, token=token)
            part.copy_(new)
        return y

    def _base_forward(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def _op(self, x, weight, bias):
        """The layer's op on a weight and bias it would cast itself (torch's conv/linear)."""
        conv = getattr(self.module, "_conv_forward", None)
        return conv(x, weight, bias) if conv is not None and not self.geometry.linear else F.linear(x, weight, bias)

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
            return self._op(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        finally:
            release()


def _rows(shape, offset):
    """The shape of the rows a fused layer's slice (dim, start, length) covers."""
    dim, _, length = offset
    return tuple(length if i == dim else n for i, n in enumerate(shape))


class _Same:
    """A token part equal only to the very same live object. Held weakly where the object allows
    it (a stale cache entry must not keep a replaced, weight-sized tensor alive), strongly
    otherwise (lists, tuples, bound methods: small patch lists), so its identity is never reused."""

    __slots__ = ("ref", "strong")

    def __init__(self, obj):
        self.strong = isinstance(obj, types.MethodType)
        try:
            self.ref = obj if self.strong else weakref.ref(obj)
        except TypeError:
            self.ref, self.strong = obj, True

    def get(self):
        return self.ref if self.strong else self.ref()

    def __eq__(self, other):
        if not isinstance(other, _Same):
            return False
        mine = self.get()
        return mine is not None and mine is other.get()

    def __hash__(self):
        return id(self.get())


def _patch_entries(function):
    """What a cast-time weight function applies: a LowVramPatch's patch list for its key (a new
    list per strength or clone), else the function itself."""
    patches, key = getattr(function, "patches", None), getattr(function, "key", None)
    if isinstance(patches, dict) and key in patches:
        return _Same(function), _Same(patches[key]), tuple(_Same(p) for p in patches[key])
    return _Same(function)


def weight_source_token(module):
    """Equal while the weight this layer computes with has the same values, so adapters may keep
    what depends on it (DoRA's norms, T-LoRA's SVD): the stored tensor (identity, and version
    where it has one: inference tensors have none, and ComfyUI replaces a patched Parameter rather
    than writing it), plus every patch applied to it at cast time (low-VRAM and dynamic-VRAM
    `weight_function`s and `weight_lowvram_function`, ComfyUI-GGUF's `patches`). None where the
    layer has no tensor to key on."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    try:
        ptr = weight.data_ptr()
    except Exception:  # noqa: BLE001 - tensor subclasses without plain storage
        ptr = None
    functions = getattr(module, "weight_function", None) or ()
    if not isinstance(functions, (list, tuple)):  # the March-2024 runtime sets one function
        functions = (functions,)
    casts = tuple(_patch_entries(f) for f in functions)
    lowvram = getattr(module, "weight_lowvram_function", None)
    gguf = tuple((_Same(p), k) for p, k in getattr(weight, "patches", ()) or ())
    return (_Same(weight), ptr, tensor_version(weight), tuple(weight.shape), weight.dtype, str(weight.device),
            casts, None if lowvram is None else _patch_entries(lowvram), gguf)


class _cast:
    """`with _cast(module, x) as (weight, bias)`: the layer's weight and bias as its own forward
    would cast them for `x` (dequantised, patched, on x's device), released on exit."""

    def __init__(self, module, x):
        self.module, self.x = module, x

    def __enter__(self):
        weight, bias, self.release = _layer_weights(self.module, self.x)
        return weight, bias

    def __exit__(self, *exc):
        self.release()
        return False


class BypassPlan:
    """Layer path -> adapter entries; applied to whichever model the patcher holds."""

    def __init__(self, layers: dict):
        self.layers = layers  # path -> ((adapter, strength, offset), ...)
        self._moved: dict = {}  # path -> {device: moved adapters}
        self._installed: dict = {}  # id(module) -> the BypassForward injected there

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
            module.forward = BypassForward(module, entries, previous, self._moved.setdefault(path, {}), self)
            self._installed[id(module)] = module.forward

    def eject(self, patcher) -> None:
        for path in self.layers:
            module = comfy.utils.get_attr(patcher.model, path)
            self._moved.get(path, {}).clear()  # the adapters' device copies and caches go with the model
            ours = self._installed.pop(id(module), None)
            if ours is None:
                continue
            ours.active = False  # if another patch later puts it back, it is the layer's plain forward
            if module.__dict__.get("forward") is ours:
                if ours.previous is None:
                    del module.forward
                else:
                    module.forward = ours.previous


if PatcherInjection is not None:
    class PlanInjection(PatcherInjection):
        """An injection that installs a plan (bypass forwards, cast-time patches) into whichever
        model the patcher injects, keeping the plan so a later load can extend it."""

        def __init__(self, plan):
            super().__init__(plan.inject, plan.eject)
            self.plan = plan


def extend_injected_plan(patcher, key: str, empty_plan, additions) -> bool:
    """Where the runtime has injections: `patcher`'s plan under `key` (or `empty_plan`) extended
    with `additions`, set as its one injection there; False on runtimes without injections."""
    if PatcherInjection is None or not hasattr(patcher, "set_injections"):
        return False
    current = [i.plan for i in (patcher.get_injections(key) or []) if isinstance(getattr(i, "plan", None),
                                                                                 type(empty_plan))]
    plan = (current[0] if current else empty_plan).extended(additions)
    patcher.set_injections(key, [PlanInjection(plan)])
    return True


def add_bypass(patcher, additions) -> None:
    """Run `additions` ((path, adapter, strength, offset), ...) beside their layers on `patcher`
    (a clone), after whatever bypass it already has."""
    if not additions or extend_injected_plan(patcher, INJECTION_KEY, BypassPlan({}), additions):
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
