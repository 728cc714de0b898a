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

import logging
import math
import types
import weakref

import comfy.utils
import torch
import torch.nn.functional as F

from ..lycoris_core.algos.base import COMPUTE_DTYPE, chain_inputs, patching_cheaper, plan_bypass, tensor_version
from .bypass_staging import Staged, scaled
from .call_state import NEGATIVE, ScheduledStrength
from .layers import computes_on_cast_weight, geometry, is_quantized_tensor, layer_list

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
PROBE_CALLS = 2  # model calls after a load in which bypass checks that every adapted layer ran
_FORWARD_SLOT = "_lycoris_bypass_forward"  # where a layer keeps its BypassForward between plans


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
    """Callable set as `module.forward`: the layer's own forward, then each adapter in turn.

    What a call reads comes from its plan's state on the input's device (`Staged`): the moved
    adapters and the strengths as tensors. Traced by torch.compile it reads nothing else per call
    (no host numbers, addresses or versions), so a strength or schedule change is new data; eager
    calls also read the strengths as numbers, to skip an adapter at strength 0 and to choose the
    patched form."""

    def __init__(self, module, previous=None):
        self.module = module
        self.previous = previous  # an instance-level forward this one wraps (another object patch)
        self.geometry = geometry(module)
        self.patchable = previous is None and computes_on_cast_weight(module) and bool(self.geometry.weight_shape)
        self.has_bias = getattr(module, "bias", None) is not None
        self.path, self.plan, self.active = None, None, False

    @classmethod
    def on(cls, module, previous=None) -> "BypassForward":
        """The layer's one forward object, kept on the module across plans: torch.compile guards on
        the identity of a callable set as `forward`, so a new plan (another strength, schedule or
        file of the same structure) binds this object instead of replacing it, and no compiled
        frame is invalidated."""
        forward = module.__dict__.get(_FORWARD_SLOT)
        if not isinstance(forward, cls) or forward.previous is not previous:
            forward = cls(module, previous)
            module.__dict__[_FORWARD_SLOT] = forward
        return forward

    def bind(self, path: str, plan) -> "BypassForward":
        self.path, self.plan, self.active = path, plan, True
        plan.geometries[path] = self.geometry
        return self

    def unbind(self) -> None:
        """Ejected: if another patch later puts it back, it is the layer's plain forward."""
        self.plan, self.active = None, False

    def __call__(self, x, *args, **kwargs):
        if not self.active:  # ejected, then put back by another patch's eject: the layer as it was
            return self._base(x, *args, **kwargs)
        staged = self.plan.staged(x.device)
        entries = staged.layers[self.path]
        chunks = staged.table.shape[0] if staged.table.dim() == 2 else 0
        if torch.compiler.is_compiling() or _capturing(x):  # data only: nothing here may read the host
            if chunks and any(not a.strength_linear for a, _, _, _ in entries) and x.shape[0] % chunks == 0:
                return torch.cat([self._run(part, entries, staged, i, args, kwargs, False)
                                  for i, part in enumerate(x.chunk(chunks))])
            return self._run(x, entries, staged, None, args, kwargs, False)
        if self.plan.ran is not None:  # the plan checks which layers ran their adapters (eager only)
            self.plan.ran.add(self.path)
        rows = staged.host if chunks else (staged.host,)
        live = [e for e in entries if any(row[e[3]] != 0 for row in rows)]  # strength 0 all call: skipped
        if not live:
            return self._base(x, *args, **kwargs)
        differ = [e for e in live if not e[0].strength_linear and len({row[e[3]] for row in rows}) > 1]
        if differ and x.shape[0] % chunks == 0:  # a non-linear adapter with other strengths per pass
            return torch.cat([self._run(part, [e for e in live if row[e[3]] != 0], staged, i, args, kwargs, True)
                              if any(row[e[3]] != 0 for e in live) else self._base(part, *args, **kwargs)
                              for i, (part, row) in enumerate(zip(x.chunk(chunks), rows))])
        return self._run(x, live, staged, None, args, kwargs, True)

    def _run(self, x, entries, staged, chunk, args, kwargs, eager):
        """The layer's forward with `entries` ((adapter, strength, offset, slot), ...); `chunk`: the
        batch chunk `x` is (its row of the strength table), None for the whole batch."""
        table = staged.table if chunk is None else staged.table[chunk]
        numbers = []  # (adapter, strength as a number or None, offset, slot)
        for adapter, _, offset, slot in entries:
            # compiled, a number is a guarded constant: read only where the strength enters as code
            known = (eager and table.dim() == 1) or not adapter.strength_linear
            numbers.append((adapter, self._number(staged, chunk, slot) if known else None, offset, slot))
        own_op = self.patchable and not args and not kwargs
        if eager and own_op and table.dim() == 1 and self._patching_cheaper(x, numbers):
            out = self._patched_forward(x, numbers)
            if out is not None:
                return out
        group = staged.groups.get(self.path)
        if group is not None:
            numbers = [e for e in numbers if e[3] not in group.slots]
        # only adapters that keep something computed from W read the weight's token (built per call)
        token = weight_source_token(self.module) if eager and any(a.caches_on_weight for a, *_ in numbers) else None
        # input-side transforms (rotations, scales, GLoRA's x + a(x)) run before the base forward
        steps, needs_weight = plan_bypass([(a, 1.0 if m is None else m, offset is None) for a, m, offset, _ in numbers],
                                          self.geometry, token)
        needs_bias = self.has_bias and any(a.bypass_reads_bias for a, *_ in numbers)
        run = _Outputs(self, numbers, steps, token, table, group)
        if own_op and (needs_weight or needs_bias):
            return self._factored_on_cast(x, steps, run)
        if needs_weight and any(side for _, _, side in steps):
            # the input side reads W: one cast for it, released before the layer casts again
            with _cast(self.module, x) as (weight, _):
                inputs = chain_inputs(x, steps, weight, self.geometry, token)
        else:
            inputs = chain_inputs(x, steps, None, self.geometry, token)
        y = self._base(inputs[0], *args, **kwargs)
        if not (needs_weight or needs_bias):
            return run(y, x, inputs, None, None)
        # the layer's own cast is over: the adapters get theirs (W, b as that cast hands them, on
        # the compute device), one at a time, never nested inside another
        with _cast(self.module, x) as (weight, bias):
            return run(y, x, inputs, weight, bias)

    @staticmethod
    def _number(staged, chunk, slot) -> float:
        """A strength as a number; with a table per batch chunk and no chunk given, the chunks agree
        on it here (else the call runs chunk by chunk)."""
        host = staged.host if staged.table.dim() == 1 else staged.host[0 if chunk is None else chunk]
        return host[slot]

    def _factored_on_cast(self, x, steps, run):
        """Factored form on a layer whose forward is "cast W and b, then the op": one cast serves the
        layer's op and the adapters, held until they are done."""
        token = run.token
        with _cast(self.module, x) as (weight, bias):
            if weight is None:  # no float weight to be had: the layer's forward, adapters without W
                inputs = chain_inputs(x, steps, None, self.geometry, token)
                return run(self._base(inputs[0]), x, inputs, None, None)
            if run_every_op is not None:
                run_every_op()  # what the layer's own forward does first (honours interrupts)
            inputs = chain_inputs(x, steps, weight, self.geometry, token)
            return run(self._op(inputs[0], weight, bias), x, inputs, weight, bias)

    def _base(self, x, *args, **kwargs):
        if self.previous is not None:
            return self.previous(x, *args, **kwargs)
        return type(self.module).forward(self.module, x, *args, **kwargs)

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
        parts = [(adapter, shape if offset is None else _rows(shape, offset)) for adapter, _, offset, _ in entries]
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
            for adapter, strength, offset, _ in entries:
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


class _Outputs:
    """Each adapter's output side on the base output, in order: the summed-rank group and every
    strength-linear adapter as y + m*h(x) with m read from the table; the others with their number."""

    def __init__(self, forward, entries, steps, token, table, group):
        self.forward, self.entries, self.steps, self.token = forward, entries, steps, token
        self.table, self.group = table, group

    def strength(self, slot):
        return self.table[slot] if self.table.dim() == 1 else self.table[:, slot]

    def __call__(self, y, x, inputs, weight, bias):
        geometry, token = self.forward.geometry, self.token
        if self.group is not None:
            y = y.add_(self.group(x, self.table))
        for (adapter, _, offset, slot), (_, strength, side), x_k in zip(self.entries, self.steps, inputs[1:]):
            w = weight if offset is None or weight is None else weight.narrow(offset[0], offset[1], offset[2])
            b = bias if offset is None or bias is None else bias.narrow(0, offset[1], offset[2])
            if adapter.strength_linear:
                h = scaled(adapter.bypass_term(x_k, w, b, geometry, token=token), self.strength(slot))
                if offset is None:
                    y = y.add_(h)
                else:  # a slice of a fused layer (Flux qkv / linear1): its rows of the output
                    y.narrow(-1, offset[1], offset[2]).add_(h)
                continue
            if offset is None:
                y = adapter.bypass(x_k, y, w, b, geometry, strength, token=token, input_applied=side)
                continue
            part = y.narrow(-1, offset[1], offset[2])
            part.copy_(adapter.bypass(x_k, part.clone(), w, b, geometry, strength, token=token))
        return y


def _capturing(x) -> bool:
    """Whether a CUDA graph is being captured (its replays would freeze any host value read now)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


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
    """Layer path -> adapter entries; applied to whichever model the patcher holds. Each entry has a
    slot in the plan's strength table; its state per device (`Staged`) is built on first use."""

    def __init__(self, layers: dict):
        self.layers = layers  # path -> ((adapter, strength, offset), ...); strength a number or ScheduledStrength
        self.slots, self.values = {}, []
        for path, entries in layers.items():
            self.slots[path] = tuple(range(len(self.values), len(self.values) + len(entries)))
            self.values += [strength for _, strength, _ in entries]
        self.scheduled = any(isinstance(v, ScheduledStrength) for v in self.values)
        self.rows_vary = any(isinstance(v, ScheduledStrength) and v.rows_vary for v in self.values)
        self.uses_timestep = any(a.algo == "tlora" for entries in layers.values() for a, _, _ in entries)
        self.geometries: dict = {}  # path -> LayerGeometry, recorded by the forwards
        self.ran = None  # layers whose forward ran, while the first model calls are checked
        self.probe_calls_left = PROBE_CALLS
        self._staged: dict = {}  # device -> Staged
        self.not_run: list = []  # layers found not to run their forward (see end_probe_call)
        self._installed: dict = {}  # id(module) -> the BypassForward injected there

    def extended(self, additions) -> "BypassPlan":
        layers = dict(self.layers)
        for path, adapter, strength, offset in additions:
            layers[path] = layers.get(path, ()) + ((adapter, strength, offset),)
        return BypassPlan(layers)

    def staged(self, device) -> Staged:
        state = self._staged.get(device)
        if state is None:
            state = self._staged[device] = Staged(self, device)
        return state

    def values_at(self, step, steps, chunks):
        """Every slot's strength for a call: a tuple, or one per batch chunk where the negative pass
        may differ. Outside a sampler (no step): the schedule's start, positive."""
        if not self.scheduled:
            return tuple(float(v) for v in self.values)
        step, steps = (0, 1) if step is None else (step, steps)
        value = (lambda v, negative: v.at(step, steps, negative) if isinstance(v, ScheduledStrength) else float(v))
        if self.rows_vary and chunks:
            return tuple(tuple(value(v, c == NEGATIVE) for v in self.values) for c in chunks)
        return tuple(value(v, False) for v in self.values)

    def begin_call(self, device, step, steps, chunks, timestep) -> None:
        """Before a model call (outside any compiled region): its strengths and timestep, in place."""
        state = self.staged(device)
        if self.scheduled:
            state.write(self.values_at(step, steps, chunks))
        if timestep is not None and self.uses_timestep:
            state.timestep.copy_(timestep)

    def end_probe_call(self) -> None:
        """After a checked model call: once the checked calls are done, say loudly which layers never
        ran their adapters (a runtime that computes them without calling the layer's forward, such
        as ComfyUI >= 0.37's fused int8 path, or a model branch these inputs do not take)."""
        self.probe_calls_left -= 1
        if self.probe_calls_left > 0 or self.ran is None:
            return
        missing = sorted(set(self.layers) - self.ran)
        self.ran = None
        if missing:
            self.not_run = missing
            logging.warning("LyCORIS bypass: %d of %d layers with adapters did not run their forward in the first "
                            "%d model calls, so their adapters had no effect there (a ComfyUI that computes them "
                            "with a fused kernel, or a branch of the model these inputs skip); use mode merge for "
                            "them: %s", len(missing), len(self.layers), PROBE_CALLS, layer_list(missing))

    def inject(self, patcher) -> None:
        for path in self.layers:
            module = comfy.utils.get_attr(patcher.model, path)
            previous = module.__dict__.get("forward")
            if isinstance(previous, BypassForward):  # another plan still on a shared model: replace it, never stack
                previous = previous.previous
            module.forward = BypassForward.on(module, previous).bind(path, self)
            self._installed[id(module)] = module.forward

    def eject(self, patcher) -> None:
        self._staged.clear()  # the adapters' device copies and caches go with the model
        for path in self.layers:
            module = comfy.utils.get_attr(patcher.model, path)
            ours = self._installed.pop(id(module), None)
            if ours is None or ours.plan is not self:  # never ours, or since bound to another plan
                continue
            ours.unbind()
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


def add_bypass(patcher, additions) -> list:
    """Run `additions` ((path, adapter, strength, offset), ...) beside their layers on `patcher`
    (a clone), after whatever bypass it already has; returns the plans now on it (for
    `publish_calls`)."""
    if additions and not extend_injected_plan(patcher, INJECTION_KEY, BypassPlan({}), additions):
        for path, adapter, strength, offset in additions:  # older runtimes: one object patch per layer
            name = f"{path}.forward"
            existing = patcher.object_patches.get(name)
            plan = (existing.plan if isinstance(existing, BypassForward) else BypassPlan({})).extended(
                [(path, adapter, strength, offset)])
            module = comfy.utils.get_attr(patcher.model, path)
            patcher.add_object_patch(name, BypassForward(module).bind(path, plan))
    return bypass_plans(patcher)


def bypass_plans(patcher) -> list:
    """The bypass plans on `patcher`: its injected one, or one per object-patched layer (older runtimes)."""
    getter = getattr(patcher, "get_injections", None)
    injections = (getter(INJECTION_KEY) or []) if getter is not None else []
    plans = [injection.plan for injection in injections if getattr(injection, "plan", None) is not None]
    return plans or [value.plan for value in patcher.object_patches.values() if isinstance(value, BypassForward)]


def bypassed_layers(patcher) -> dict:
    """Layer path -> adapter entries that `patcher` runs in bypass mode."""
    layers = {}
    for plan in bypass_plans(patcher):
        layers.update(plan.layers)
    return layers
