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
    suffixes: ClassVar[tuple[str, ...]] = ()
    additive: ClassVar[bool] = True
    delta_uses_weight: ClassVar[bool] = False  # GLoRA, T-LoRA: the delta is a function of W

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
        alpha = self.tensors.get("alpha")
        if alpha is None or alpha.numel() != 1:
            return None
        return float(alpha.float().reshape(-1)[0])

    @property
    def scale(self) -> float:
        """gamma: alpha / rank, 1 without alpha (LyCORIS never stores alpha 0)."""
        if self.scale_override is not None:
            return self.scale_override
        rank, alpha = self.rank, self.alpha
        base = 1.0 if alpha is None or not rank else alpha / rank
        scalar = self.tensors.get("scalar")
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
        """gamma * dW in fp32, shaped like `weight` (additive families)."""
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

    # -- bypass -----------------------------------------------------------------------------
    def moved(self, device) -> "Adapter":
        """A copy whose tensors live on `device` in fp32 (bypass moves them once per device)."""
        clone = copy.copy(self)
        clone.tensors = {k: v.to(device=device, dtype=COMPUTE_DTYPE) if v.is_floating_point() else v.to(device)
                         for k, v in self.tensors.items()}
        return clone

    def bypass_needs_weight(self) -> bool:
        """Whether `bypass` reads the layer's weight (DoRA norms, deltas built from W,
        multiplicative families without their own output-side form)."""
        return self.delta_uses_weight or not self.additive or self.has_dora

    def bypass_is_dense(self, geometry: LayerGeometry | None = None) -> bool:
        """Whether bypass builds a full-size weight or delta every step (no factored form)."""
        own = type(self).bypass is not Adapter.bypass
        return not own or self.has_dora or (geometry is not None and not geometry.linear and self.algo == "lokr")

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors or "lora_magnitude_vector" in self.tensors

    def bypass(self, x, y, weight, bias, geometry: LayerGeometry, strength: float = 1.0):
        """Adapted layer output from input `x` and base output `y` (bias included).

        `y` is consumed: families may write the result into its storage (callers pass the base
        output they just computed).

        Default: additive families run their dense delta through the layer op,
        y' = y + m * op(x, gamma*dW) (LoHa has no factored identity); the rest compute the
        patched weight once per call from the layer's (dequantised) `weight`. Families with a
        cheaper exact form override this.
        """
        if self.additive and not self.has_dora and not self.delta_uses_weight:
            shape = weight.shape if weight is not None else self.expected_shape()
            if shape is None:
                raise self.error(f"{self.algo} in bypass mode needs the layer's weight shape")
            if len(shape) == 2 and not geometry.linear:  # factors stored flat: the layer knows its kernel
                shape = (shape[0], shape[1] // math.prod(geometry.kernel_size)) + tuple(geometry.kernel_size)
            d = self.delta(torch.empty(shape, device=x.device))
            out = y + strength * geometry.apply(x, d.to(x.dtype))
            db = self.bias_delta(bias)
            return out if db is None else out + strength * channel_view(db.to(x.dtype), out, geometry.linear)
        if weight is None:
            raise self.error(f"{self.algo} in bypass mode needs the layer's weight")
        w_new, b_new = self.patch(weight, strength, bias)
        return geometry.apply(x, w_new.to(x.dtype), None if b_new is None else b_new.to(x.dtype))


def weight_decompose(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float, adapter=None):
    """LyCORIS DoRA (`dora_scale`), as its trainer computes it.

    W1 = W + gamma*dW (strength not applied), n = ||W1|| along the axis the `dora_scale` shape
    names (output rows for (O,1,...), input columns for (1,I,...)) plus fp32 eps,
    s = dora_scale / n, and the strength interpolates the correction: s <- m*(s-1)+1.
    At m = 0 the result is W + gamma*dW, not W (LyCORIS `apply_weight_decompose`).
    """
    w1 = w + delta
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
    return w1 * scale


def peft_dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float):
    """PEFT DoRA (`lora_magnitude_vector`): mag * (W + m*s*BA) / ||W + m*s*BA||_row, no eps.

    PEFT scales a layer by scaling `scaling`, which enters both the delta and the norm.
    """
    w1 = w + strength * delta
    norm = flat(w1).norm(dim=1).reshape([w.shape[0]] + [1] * (w.dim() - 1))
    return w1 * (magnitude.reshape(norm.shape) / norm)
