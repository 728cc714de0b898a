"""The one interface every algorithm family implements, and the helpers they share.

An `Adapter` holds the tensors of one adapted layer exactly as stored (any dtype) and computes,
in fp32, either the patched weight (merge) or the adapted layer output (bypass). Families only
say how to build their delta; strength, DoRA and dtype handling live here once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AdapterFormatError

COMPUTE_DTYPE = torch.float32

# Bypass picks its form per call from a cost model in multiply-adds, where one read or write of
# an element counts as PASS_COST of them: rank-16 adapter work is bound by memory traffic on
# CPUs and GPUs alike (measured on this project's 2-core CPU: ~40; an H200 in bf16: ~200).
PASS_COST = 48


@dataclass
class DecodeContext:
    """What a decoder may need beyond a module's own tensors.

    `convention` is "peft" for files whose scale lives in a PEFT config rather than in alpha
    tensors (PEFT `save_pretrained`, diffusers exports); everything else is "lycoris" (LyCORIS,
    kohya, SimpleTuner). `peft_config` is the adapter_config.json (or the component config of a
    diffusers `lora_adapter_metadata`) when there is one.
    """

    path: str = "<memory>"
    metadata: dict = field(default_factory=dict)
    convention: str = "lycoris"
    peft_config: dict | None = None
    network_args: dict = field(default_factory=dict)

    def int_arg(self, *names: str) -> int | None:
        for name in names:
            value = self.network_args.get(name, self.metadata.get(name))
            try:
                return int(float(value))
            except (TypeError, ValueError):
                continue
        return None

    def bool_arg(self, name: str) -> bool:
        value = self.network_args.get(name)
        return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class LayerGeometry:
    """How the adapted layer applies its weight (bypass needs it for convs).

    `conv_dims` is 0 for Linear layers, 1/2/3 for Conv1d/2d/3d.
    """

    conv_dims: int = 0
    kernel_size: tuple = ()
    stride: tuple = (1, 1)
    padding: tuple | str = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    weight_shape: tuple = ()  # the weight's logical shape where known (quantized storage may be packed)

    @property
    def linear(self) -> bool:
        return self.conv_dims == 0

    @classmethod
    def of(cls, module, weight_shape=None) -> "LayerGeometry":
        """Duck-typed on torch's conv attributes, so any op class that keeps them (ComfyUI's
        manual-cast and GGUF layers) is read the same; anything else is a Linear. The caller
        may pass the weight's logical shape when the stored one is packed."""
        if weight_shape is None:
            weight = getattr(module, "weight", None)
            weight_shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        kernel = getattr(module, "kernel_size", None)
        if kernel is not None:
            kernel = tuple(kernel)
            return cls(len(kernel), kernel, tuple(module.stride), module.padding, tuple(module.dilation),
                       module.groups, tuple(weight_shape))
        return cls(weight_shape=tuple(weight_shape))

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias=None, *, plain: bool = False):
        """`op(x, weight)` for a Linear (2-D weight) or a Conv of any rank.

        `plain=True` runs a conv with no stride/padding/dilation (1x1 factors).
        """
        if weight.dim() == 2:
            return F.linear(x, weight, bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        if plain:
            return conv(x, weight, bias)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def flat(t: torch.Tensor) -> torch.Tensor:
    """2-D view keeping dim 0, as the trainers matmul factors."""
    return t.reshape(t.shape[0], -1)


def channel_view(vector: torch.Tensor, activation: torch.Tensor, linear: bool) -> torch.Tensor:
    """Shape a per-channel vector to broadcast over a layer's input or output.

    Linear activations carry channels last, conv activations on dim 1.
    """
    vector = vector.reshape(-1)
    if linear:
        return vector
    return vector.reshape((1, -1) + (1,) * (activation.dim() - 2))


class Adapter:
    """One adapted layer.

    Subclasses set `algo` and `markers` (the suffixes that identify the family) and implement
    `delta` (additive families) or `patch` (multiplicative ones). Tensors stay in their stored
    dtype; every computation runs in fp32 via `t()`.
    """

    algo: ClassVar[str] = ""
    host_values: ClassVar[tuple[str, ...]] = ()  # cached properties read from host tensors (see `moved`)
    suffixes: ClassVar[tuple[str, ...]] = ()
    additive: ClassVar[bool] = True
    delta_uses_weight: ClassVar[bool] = False  # GLoRA, T-LoRA: the delta is a function of W
    patch_is_forward: ClassVar[bool] = True  # False where the forward is not the merge (T-LoRA's per-step mask)

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], context: DecodeContext):
        self.name = name
        self.tensors = tensors
        self.context = context
        self.scale_override: float | None = None
        self.validate()

    # -- recognition ------------------------------------------------------------------------
    @classmethod
    def detect(cls, tensors: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    @classmethod
    def owned(cls) -> tuple[str, ...]:
        return cls.suffixes + ("alpha", "dora_scale", "scalar")

    # -- tensors ----------------------------------------------------------------------------
    def t(self, suffix: str) -> torch.Tensor | None:
        tensor = self.tensors.get(suffix)
        return None if tensor is None else tensor.to(COMPUTE_DTYPE)

    def host(self, suffix: str) -> torch.Tensor | None:
        """The tensor as read from the file (on the CPU), for values read as Python numbers (alpha,
        flags, sizes): a copy staged on a GPU reads them here, so a bypassed forward never waits for
        a device-to-host copy (nor breaks a compiled graph on one)."""
        return self.__dict__.get("_host_tensors", self.tensors).get(suffix)

    def require(self, suffix: str, ndim: tuple[int, ...] | None = None) -> torch.Tensor:
        tensor = self.tensors.get(suffix)
        if tensor is None:
            raise self.error(f"{self.algo} needs the key '{suffix}', which the file lacks", suffix)
        if ndim is not None and tensor.dim() not in ndim:
            raise self.error(
                f"expected a {'- or '.join(map(str, ndim))}-D tensor, found shape {list(tensor.shape)}",
                suffix,
            )
        return tensor

    def error(self, message: str, suffix: str | None = None) -> AdapterFormatError:
        key = self.name if suffix is None else f"{self.name}.{suffix}"
        return AdapterFormatError(message, path=self.context.path, key=key)

    def validate(self) -> None:
        """Check the factor shapes agree with each other (raise `AdapterFormatError`)."""

    # -- description ------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        alpha = self.host("alpha")
        if alpha is None or alpha.numel() != 1:
            return None
        return float(alpha.float().reshape(-1)[0])

    @property
    def scale(self) -> float:
        """gamma: `scale_override` where one is set (PEFT's config, a copy's frozen value), else the
        file's own (`file_scale`). Families change `file_scale`, never this property, so every copy
        reads its frozen number the same way (torch.compile cannot trace `super().scale`)."""
        if self.scale_override is not None:
            return self.scale_override
        return self.file_scale()

    def file_scale(self) -> float:
        """gamma from the file: alpha / rank, 1 without alpha (LyCORIS never stores alpha 0)."""
        rank, alpha = self.rank, self.alpha
        base = 1.0 if alpha is None or not rank else alpha / rank
        scalar = self.host("scalar")
        if scalar is not None and scalar.numel() == 1:
            base *= float(scalar.float().reshape(-1)[0])
        return base

    def expected_shape(self) -> tuple | None:
        """The weight shape the factors imply, as far as they tell (None: unknown)."""
        return None

    def check_weight(self, weight_shape) -> None:
        expected = self.expected_shape()
        if expected is None:
            return
        # Conv factors may be stored flattened ((O, I*kh*kw)) or 2-D ups: compare rows and row size.
        same_rows = expected[0] == weight_shape[0]
        if not (same_rows and math.prod(expected[1:]) == math.prod(weight_shape[1:])):
            raise self.error(
                f"adapter expects a weight of shape {list(expected)}, "
                f"the model's weight is {list(weight_shape)}"
            )

    def describe(self) -> dict:
        info = {"algo": self.algo, "rank": self.rank, "alpha": self.alpha}
        if "dora_scale" in self.tensors or "lora_magnitude_vector" in self.tensors:
            info["dora"] = True
        return info

    # -- merge ------------------------------------------------------------------------------
    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """gamma * dW in fp32, shaped like `weight` (additive families).

        Read-only for callers: a family may return a stored tensor itself (Full's `diff`)."""
        raise NotImplementedError

    def bias_delta(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def patch(self, weight: torch.Tensor, strength: float = 1.0, bias: torch.Tensor | None = None,
              inplace: bool = False):
        """(patched weight, patched bias) in fp32 for the base `weight` and `strength`.

        Additive families: W' = W + m * gamma * dW. With DoRA the magnitude correction follows
        the trainer's multiplier rule (see `weight_decompose`). `inplace=True` lets an fp32
        `weight` be overwritten (callers that own a copy save a full-size allocation).
        """
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        if not self.has_dora:
            own = inplace or w.data_ptr() != weight.data_ptr()  # a converted copy is ours anyway
            return self.add_delta(w, strength, own), self.patch_bias(bias, strength)
        d = self.delta(w)
        magnitude = self.tensors.get("dora_scale")
        if magnitude is not None:
            w_new = weight_decompose(w, d, magnitude.to(COMPUTE_DTYPE), strength, self)
        else:
            w_new = peft_dora(w, d, self.t("lora_magnitude_vector"), strength)
        return w_new, self.patch_bias(bias, strength)

    def add_delta(self, w: torch.Tensor, factor: float, inplace: bool = False) -> torch.Tensor:
        """w + factor * gamma * dW in fp32, into `w` itself when `inplace`."""
        d = self.delta(w)
        return w.add_(d, alpha=factor) if inplace else torch.add(w, d, alpha=factor)

    def patch_bias(self, bias: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor | None:
        """The layer's bias after patching, in fp32 (None when the layer has none)."""
        if bias is None:
            return None
        b = bias.to(COMPUTE_DTYPE)
        db = self.bias_delta(bias)
        return b if db is None else b + strength * db

    def changes_bias(self) -> bool:
        """Whether `patch_bias` can differ from the input (ComfyUI needs a patch on the bias key)."""
        return False

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "Adapter":
        """A copy computing from `tensors` (same keys and shapes as its own, e.g. copies a memory
        manager staged on another device). Not validated again: the shapes were checked when the
        file was read, and the values may not be written yet when the copy is made."""
        clone = copy.copy(self)
        clone._host_tensors = self.__dict__.get("_host_tensors", self.tensors)
        clone.tensors = tensors
        clone._bypass_cache = {}  # built from the old tensors
        return clone

    # -- bypass -----------------------------------------------------------------------------
    # A layer runs its adapters as y' = g(f(T(x)) + h(x)): T an input-side transform the caller
    # applies before the base forward f (rotations, scales, GLoRA's x + a(x)), h an additive
    # factored term, g an output-side map (rotations, DoRA's per-channel scale). Whatever depends
    # only on W (DoRA's norms) or only on the factors (rotations, dense fallbacks) is computed once
    # per adapter copy (bypass keeps one copy per device) and reused while the weight's token holds.

    def moved(self, device) -> "Adapter":
        """A copy whose tensors live on `device` in fp32 (bypass moves them once per device). Its
        scale is frozen as a number here, and its other host reads go to the file's tensors
        (`host`): nothing in its forward reads a device tensor back."""
        scale = self.scale
        clone = self.with_tensors({k: v.to(device=device, dtype=COMPUTE_DTYPE) if v.is_floating_point()
                                   else v.to(device) for k, v in self.tensors.items()})
        clone.scale_override = scale
        for name in self.host_values:  # read now from the file's tensors, kept as numbers
            getattr(clone, name)
        return clone

    def cached(self, slot: str, key, build):
        """`build()` computed once per `key` and kept in one `slot` of this copy (a new key replaces it).
        Traced by torch.compile it is computed in the graph instead: a cache filled by a traced call
        would be a Python side effect that the next call's guards see as a change."""
        if torch.compiler.is_compiling():
            return build()
        store = self.__dict__.setdefault("_bypass_cache", {})
        hit = store.get(slot)
        if hit is None or hit[0] != key:
            hit = store[slot] = (key, build())
        return hit[1]

    def is_cached(self, slot: str, key) -> bool:
        hit = self.__dict__.get("_bypass_cache", {}).get(slot)
        return hit is not None and hit[0] == key

    def bypass_costs(self, shape: tuple) -> tuple[float, float]:
        """(factored bypass cost per output position, patched-weight cost per call) for a layer
        weight of `shape`, in multiply-adds (see PASS_COST); `patching_cheaper` compares them."""
        out, inp = shape[0], math.prod(shape[1:])
        per_token, per_call = self.factored_costs(out, inp)
        if self.has_dora:  # a pass for the scale; the patch also takes the norms and scales W
            per_token += PASS_COST * 2 * out
            per_call += (1 + PASS_COST * 3) * out * inp
        return per_token, per_call

    def factored_costs(self, out: int, inp: int) -> tuple[float, float]:
        """`bypass_costs` without DoRA. Default: the cached dense delta, an additive patch."""
        return out * inp + PASS_COST * 2 * out, PASS_COST * 2 * out * inp

    def bypass_input_side(self, geometry: LayerGeometry, strength: float = 1.0) -> bool:
        """Whether the factored bypass transforms the layer's input (`bypass_input`) before the base
        forward. Callers that cannot re-run the base forward on it call `bypass` alone."""
        return self.dora_on_input and not self.delta_uses_weight

    def bypass_input(self, x, weight, geometry: LayerGeometry, strength: float = 1.0, *, token=None):
        """T(x) for the base forward (identity unless `bypass_input_side`)."""
        if self.bypass_input_side(geometry, strength):
            scale = self.dora_scale(weight, geometry, strength, token)
            return x * channel_view(scale.to(x.dtype), x, geometry.linear)
        return x

    def bypass_needs_weight(self, geometry: LayerGeometry | None = None, *, token=None,
                            input_applied: bool = False, strength: float = 1.0) -> bool:
        """Whether this call must be given the layer's (dequantised) weight: deltas built from W,
        DoRA norms not yet cached for `token` and `strength`, families that re-run the layer
        without `input_applied`, multiplicative families without their own output-side form."""
        if self.delta_uses_weight or not self.additive:
            return True
        if self.has_dora:
            if self.dora_on_input and not input_applied:
                return True
            return token is None or not self.is_cached("dora", token) or strength not in self.cached("dora", token, dict)
        return False

    @property
    def caches_on_weight(self) -> bool:
        """Whether the bypass keeps something computed from the layer's weight (DoRA's norms), so
        the caller must hand it the weight's token; other families never read it."""
        return self.has_dora

    @property
    def bypass_reads_bias(self) -> bool:
        """Whether the factored bypass needs the layer's bias values (output-side maps and DoRA
        undo and redo it; bias deltas follow its shape): the caller then casts it with the weight."""
        return self.has_dora or not self.additive or self.changes_bias()

    @property
    def strength_linear(self) -> bool:
        """Whether the bypass is y + m*h(x) for every strength m, so the caller may keep m as data (a
        tensor filled per model call) rather than code; False where m enters otherwise (DoRA's norm,
        rotations, scales, GLoRA's re-run of the layer)."""
        return self.additive and not self.has_dora and not self.delta_uses_weight

    def bypass_term(self, x, weight, bias, geometry: LayerGeometry, *, token=None) -> torch.Tensor:
        """h(x) of a `strength_linear` family, bias delta included: its output at strength 1 minus
        the layer's own."""
        out = self.delta_forward(x, geometry, self.layer_shape(weight, geometry))
        return self.add_bias_delta(out, bias, 1.0, geometry)

    def bypass_is_dense(self, geometry: LayerGeometry | None = None) -> bool:
        """Whether bypass builds a full-size weight or delta (no factored form)."""
        return type(self).bypass is Adapter.bypass and not self.additive

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors or "lora_magnitude_vector" in self.tensors

    @property
    def has_peft_dora(self) -> bool:
        return "lora_magnitude_vector" in self.tensors

    @property
    def dora_on_input(self) -> bool:
        """LyCORIS `dora_scale` of shape (1, I, ...): the norm and scale run over input columns."""
        magnitude = self.tensors.get("dora_scale")
        return magnitude is not None and magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() > 1

    def layer_shape(self, weight, geometry: LayerGeometry) -> tuple:
        """The layer's weight shape, from `weight` or else from the factors and the layer's kernel."""
        shape = tuple(weight.shape) if weight is not None else self.expected_shape()
        if shape is None:
            raise self.error(f"{self.algo} in bypass mode needs the layer's weight shape")
        if len(shape) == 2 and not geometry.linear:  # factors stored flat: the layer knows its kernel
            shape = (shape[0], shape[1] // math.prod(geometry.kernel_size)) + tuple(geometry.kernel_size)
        return shape

    def delta_forward(self, x, geometry: LayerGeometry, shape: tuple) -> torch.Tensor:
        """op(x, gamma*dW) without bias or strength. Default: the dense delta, built once per
        copy and kept (memory: one weight-sized tensor in x's dtype); families with a factored
        form override this."""
        key = (shape, x.dtype, x.device)
        d = self.cached("delta", key, lambda: self.delta(torch.empty(shape, device=x.device)).to(x.dtype))
        return geometry.apply(x, d)

    def dora_scale(self, weight, geometry: LayerGeometry, strength: float, token=None) -> torch.Tensor:
        """DoRA's per-channel scale (output rows, or input columns for `dora_on_input`) with the
        strength rule applied; a function of W and the adapter only, so computed once per `token`
        (default: the weight tensor's own identity and version) and strength."""
        if torch.compiler.is_compiling():  # a traced graph keys nothing on addresses: computed in the graph
            return self._dora_scale_now(weight, strength)
        if token is None and weight is None:
            raise self.error(f"{self.algo} with DoRA in bypass mode needs the layer's weight once")
        scales = self.cached("dora", token if token is not None else weight_token(weight), dict)  # per strength
        if strength in scales:
            return scales[strength]
        if weight is None:
            raise self.error(f"{self.algo} with DoRA in bypass mode needs the layer's weight once")
        scales[strength] = self._dora_scale_now(weight, strength)
        return scales[strength]

    def _dora_scale_now(self, weight, strength: float) -> torch.Tensor:
        w = weight.to(device=self.device_of(weight), dtype=COMPUTE_DTYPE)
        magnitude = self.tensors.get("dora_scale")
        if magnitude is not None:
            scale = dora_channel_scale(self.add_delta(w, 1.0), magnitude.to(COMPUTE_DTYPE), strength, self)
        else:
            scale = peft_dora_scale(self.add_delta(w, strength), self.t("lora_magnitude_vector"))
        return scale.reshape(-1)

    def device_of(self, weight):
        first = next(iter(self.tensors.values()), None)
        return weight.device if first is None else first.device

    def bypass(self, x, y, weight, bias, geometry, strength: float = 1.0, *, token=None,
               input_applied: bool = False):
        """Adapted layer output from input `x` and base output `y` (bias included).

        `y` is consumed: families may write the result into its storage (callers pass the base
        output they just computed). With `input_applied`, `x` is already `bypass_input(x)` and `y`
        the base forward of it; otherwise families with an input side re-run the layer on it
        (needing `weight`).

        Additive families: y' = y + m*h(x) (+ bias delta), h the factored or cached-dense
        `delta_forward`. DoRA: y' = s * (y - b + h'(x)) + b' with s cached per weight (output
        rows), or the same with x scaled per input column (input columns). Multiplicative
        families without their own form: the patched weight rebuilt from `weight` (dense).
        """
        if self.has_dora and not self.delta_uses_weight:
            return self.dora_bypass(x, y, weight, bias, geometry, strength, token, input_applied)
        if self.additive and not self.delta_uses_weight:
            out = y.add_(self.delta_forward(x, geometry, self.layer_shape(weight, geometry)), alpha=strength)
            return self.add_bias_delta(out, bias, strength, geometry)
        if weight is None:
            raise self.error(f"{self.algo} in bypass mode needs the layer's weight")
        w_new, b_new = self.patch(weight, strength, bias)
        return geometry.apply(x, w_new.to(x.dtype), None if b_new is None else b_new.to(x.dtype))

    def add_bias_delta(self, out, bias, strength, geometry):
        db = self.bias_delta(bias)
        return out if db is None else out + strength * channel_view(db.to(out.dtype), out, geometry.linear)

    def dora_bypass(self, x, y, weight, bias, geometry, strength, token, input_applied):
        shape = self.layer_shape(weight, geometry)
        if self.dora_on_input:
            # W' = (W + gamma*dW) diag(s_m): both terms see the column-scaled input
            if not input_applied and weight is None:
                raise self.error(f"{self.algo} with input-side DoRA needs the layer's weight to re-run it")
            x = self.bypass_input(x, weight, geometry, strength, token=token)
            if not input_applied:
                y = geometry.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
            out = y.add_(self.delta_forward(x, geometry, shape))
            return self.add_bias_delta(out, bias, strength, geometry)
        scale = self.dora_scale(weight, geometry, strength, token).to(y.dtype)
        h = self.delta_forward(x, geometry, shape)
        # LyCORIS normalises W + gamma*dW whatever m; PEFT scales its delta by m
        out = y.add_(h, alpha=strength if self.has_peft_dora else 1.0)
        # (y + h - b) * s + b' in one pass: (y + h) * s + (b' - b * s)
        b_new = self.patch_bias(bias, strength)
        if b_new is None:
            return out.mul_(channel_view(scale, out, geometry.linear))
        shift = b_new.to(y.dtype) - bias.to(y.dtype) * scale
        view = (lambda v: channel_view(v, out, geometry.linear))
        return torch.addcmul(view(shift), out, view(scale), out=out)


def weight_token(weight: torch.Tensor):
    """Identity and version of a weight tensor: equal tokens mean unchanged values (for a tensor
    made in inference mode, which keeps no version, while nobody writes into it)."""
    return (str(weight.device), weight.data_ptr(), tensor_version(weight), tuple(weight.shape), weight.dtype)


def tensor_version(tensor: torch.Tensor):
    """The tensor's in-place write counter, or None for an inference tensor (ComfyUI's executor
    loads and runs models under `torch.inference_mode()`; such tensors keep no counter)."""
    if tensor.is_inference():
        return None
    try:
        return tensor._version
    except RuntimeError:  # a subclass that keeps none
        return None


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records ops on these tensors now (then `out=` buffers cannot be used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def patching_cheaper(entries, tokens: int, layer_shape: tuple | None = None) -> bool:
    """Whether patching a transient copy of the layer's (dequantised) weight, W' = merge(W), and
    running the layer's op on it costs less this call than running the adapters factored beside
    it for `tokens` output positions. `entries` is ((adapter, weight shape it patches), ...);
    `layer_shape` the whole weight the working copy holds (default: the first entry's shape;
    a fused layer's adapters patch slices of it).

    The patched form costs O(weight) per call whatever the tokens, the factored form O(tokens):
    a 1024-px image step (thousands of tokens) patches, a 77-token text context does not."""
    if not all(adapter.patch_is_forward for adapter, _ in entries):
        return False
    factored = patched = 0.0
    for adapter, shape in entries:
        per_token, per_call = adapter.bypass_costs(shape)
        factored += tokens * per_token
        patched += per_call
    shape = layer_shape or entries[0][1]
    patched += PASS_COST * 2 * math.prod(shape)  # the fp32 working copy and the cast back
    return patched < factored


def plan_bypass(entries, geometry: LayerGeometry, token=None):
    """(steps, needs_weight) for one call of a bypassed layer. `entries` is ((adapter, strength,
    whole_layer), ...); an adapter on a slice of a fused layer cannot transform the shared input
    and re-runs its rows instead. steps = ((adapter, strength, input_side), ...) for
    `chain_inputs`; needs_weight: whether any adapter must read the layer's weight this call."""
    steps = [(adapter, strength, whole and adapter.bypass_input_side(geometry, strength))
             for adapter, strength, whole in entries]
    needs = any(adapter.bypass_needs_weight(geometry, token=token, input_applied=side, strength=strength)
                for adapter, strength, side in steps)
    return steps, needs


def chain_inputs(x, steps, weight, geometry: LayerGeometry, token=None) -> list:
    """Inputs for a stack of bypassed adapters on one layer, as the sequentially merged weight
    W_n = T_n(...T_1(W)) sees them: y(W_k, x) = y(W_{k-1}, T_k(x)) + (adapter k's own terms of x)
    for an input-side adapter, so adapter k sees x_k = T_{k+1}(x_{k+1}) (x_n = x) and the base
    forward sees T_1(x_1).

    `steps` is ((adapter, strength, input_side), ...); returns [base input, x_1, ..., x_n].
    """
    inputs = [x]
    for adapter, strength, input_side in reversed(steps):
        if input_side:
            x = adapter.bypass_input(x, weight, geometry, strength, token=token)
        inputs.append(x)
    inputs.reverse()  # [T_1(x_1), x_1, ..., x_n]
    return inputs


def weight_decompose(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float, adapter=None):
    """LyCORIS DoRA (`dora_scale`), as its trainer computes it: (W + gamma*dW) * s_m, see
    `dora_channel_scale`. At m = 0 the result is W + gamma*dW, not W (LyCORIS
    `apply_weight_decompose`)."""
    w1 = w + delta
    return w1.mul_(dora_channel_scale(w1, magnitude, strength, adapter))


def dora_channel_scale(w1: torch.Tensor, magnitude: torch.Tensor, strength: float, adapter=None) -> torch.Tensor:
    """LyCORIS DoRA's scale for W1 = W + gamma*dW (strength not applied), shaped to broadcast
    over it: n = ||W1|| along the axis the `dora_scale` shape names (output rows for (O,1,...),
    input columns for (1,I,...)) plus fp32 eps, s = dora_scale / n, and the strength
    interpolates it: s_m = m*(s-1)+1."""
    w = w1
    out_channels, in_channels = w.shape[0], w.shape[1]
    if magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() == in_channels:
        # (1, I, 1, ...): norm of each input column over outputs and kernel
        norm = w1.transpose(0, 1).reshape(in_channels, -1).norm(dim=1)
        norm = norm.reshape([1, in_channels] + [1] * (w.dim() - 2))
    elif magnitude.numel() == out_channels:
        norm = flat(w1).norm(dim=1).reshape([out_channels] + [1] * (w.dim() - 1))
    else:
        message = (
            f"dora_scale of shape {list(magnitude.shape)} fits neither the {out_channels} output rows "
            f"nor the {in_channels} input columns of the weight {list(w.shape)}"
        )
        raise adapter.error(message, "dora_scale") if adapter is not None else AdapterFormatError(message)
    norm = norm + torch.finfo(COMPUTE_DTYPE).eps
    scale = magnitude.reshape(norm.shape) / norm
    if strength != 1:
        scale = strength * (scale - 1) + 1
    return scale


def peft_dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float):
    """PEFT DoRA (`lora_magnitude_vector`): mag * (W + m*s*BA) / ||W + m*s*BA||_row, no eps.

    PEFT scales a layer by scaling `scaling`, which enters both the delta and the norm.
    """
    w1 = torch.add(w, delta, alpha=strength)
    return w1.mul_(peft_dora_scale(w1, magnitude))


def peft_dora_scale(w1: torch.Tensor, magnitude: torch.Tensor):
    """PEFT DoRA's per-row scale mag / ||W1|| for W1 = W + m*s*BA, shaped to broadcast over it."""
    norm = flat(w1).norm(dim=1).reshape([w1.shape[0]] + [1] * (w1.dim() - 1))
    return magnitude.reshape(norm.shape) / norm
