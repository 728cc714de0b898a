"""(IA)^3: a learned per-channel scale.

LyCORIS (`weight` + `on_input`): W'[o] = W[o] * (1 + m*w[o]) (output mode) or
W'[:, i] = W[:, i] * (1 + m*w[i]) (input mode); the bias is untouched (its rebuild forward).
PEFT (`ia3_l`, a full multiplicative vector initialised to ones): W' = W * (1 + m*(l - 1)) and,
for layers that are not feed-forward, the same on the bias, as PEFT's merge does. Which side a
layer scales is in the tensors for Linear layers ((1, in) vs (out, 1)) and for convs with
in != out channels; only a square conv needs `feedforward_modules` from adapter_config.json.
"""

from __future__ import annotations

import functools
import re

import torch

from .base import PASS_COST, Adapter, COMPUTE_DTYPE, channel_view


def _axis_view(vector, weight, on_input):
    if on_input:
        return vector.reshape([1, -1] + [1] * (weight.dim() - 2))
    return vector.reshape([-1] + [1] * (weight.dim() - 1))


class IA3(Adapter):
    algo = "ia3"
    suffixes = ("weight", "on_input")
    additive = False

    @classmethod
    def detect(cls, tensors):
        return "on_input" in tensors and "weight" in tensors

    host_values = ("on_input",)

    @functools.cached_property
    def on_input(self) -> bool:
        flag = self.host("on_input")
        return bool(flag.reshape(-1)[0].item()) if flag.numel() else False

    def validate(self):
        self.require("weight")

    def check_weight(self, weight_shape):
        channels = weight_shape[1] if self.on_input else weight_shape[0]
        if self.tensors["weight"].numel() != channels:
            axis = "input" if self.on_input else "output"
            raise self.error(
                f"ia3 weight has {self.tensors['weight'].numel()} entries, the layer has {channels} {axis} channels "
                f"(weight {list(weight_shape)})",
                "weight",
            )

    def factor(self, strength):
        return 1 + strength * self.t("weight").reshape(-1)

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        w_new = w * _axis_view(self.factor(strength), w, self.on_input)
        return w_new, None if bias is None else bias.to(COMPUTE_DTYPE)

    def factored_costs(self, out, inp):
        return PASS_COST * 2 * (inp if self.on_input else out), (1 + PASS_COST * 2) * out * inp

    def bypass_input_side(self, geometry, strength=1.0):
        return self.on_input

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return self.on_input and not input_applied

    def bypass_input(self, x, weight, geometry, strength=1.0, *, token=None):
        if not self.on_input:
            return x
        return x * channel_view(self.factor(strength).to(x.dtype), x, geometry.linear)

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        if self.on_input:
            if input_applied:  # y = f(x * g) already
                return y
            # y' = f(x * g): run the layer again on the scaled input
            if weight is None:
                raise self.error("ia3 on_input in bypass mode needs the layer's weight")
            return geometry.apply(self.bypass_input(x, weight, geometry, strength), weight.to(x.dtype),
                                  None if bias is None else bias.to(x.dtype))
        factor = self.factor(strength).to(y.dtype)
        view = channel_view(factor, y, geometry.linear)
        if bias is None:
            return y.mul_(view)
        # (y - b) * g + b in one pass: y * g + b * (1 - g)
        return torch.addcmul(channel_view(bias.to(y.dtype) * (1 - factor), y, geometry.linear), y, view, out=y)


class PeftIA3(Adapter):
    algo = "ia3"
    suffixes = ("ia3_l",)
    additive = False

    @classmethod
    def detect(cls, tensors):
        return "ia3_l" in tensors

    def validate(self):
        self.require("ia3_l")

    def feedforward(self, weight_shape) -> bool:
        """Input-side scale? What the tensors tell first (PEFT stores Linear vectors as (1, in) or
        (out, 1); a vector whose length fits only one side of the weight), else the config's
        `feedforward_modules` (needed only for a conv with as many inputs as outputs)."""
        told = self.orientation_in_tensors(weight_shape[0] if weight_shape else None,
                                           weight_shape[1] if len(weight_shape) > 1 else None)
        return self.feedforward_in_config() if told is None else told

    def orientation_in_tensors(self, out_channels=None, in_channels=None) -> bool | None:
        """True (input side) / False (output side) where the stored vector alone decides, else None."""
        vector = self.tensors["ia3_l"]
        if vector.dim() == 2 and vector.numel() > 1:  # Linear: (1, in) feed-forward, (out, 1) otherwise
            return vector.shape[0] == 1
        n = vector.numel()
        if out_channels is not None and in_channels is not None and out_channels != in_channels:
            if n in (out_channels, in_channels):
                return n == in_channels
        elif out_channels is not None and in_channels is None and n != out_channels:
            return True  # only the bias is known: a vector that does not fit its outputs is input-side
        return None

    def feedforward_in_config(self) -> bool:
        config = self.context.peft_config or {}
        modules = config.get("feedforward_modules") or []
        path = self.name.split("base_model.model.", 1)[-1]
        if isinstance(modules, str):
            return re.fullmatch(modules, path) is not None
        return any(path == m or path.endswith("." + m) for m in modules)

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        w = weight.to(COMPUTE_DTYPE)
        ff = self.feedforward(weight.shape)
        channels = weight.shape[1] if ff else weight.shape[0]
        if self.tensors["ia3_l"].numel() != channels:
            raise self.error(f"ia3_l has {self.tensors['ia3_l'].numel()} entries, the layer has {channels} "
                             f"{'input' if ff else 'output'} channels (weight {list(weight.shape)})", "ia3_l")
        w_new = w * _axis_view(self.factor(strength), w, ff)
        return w_new, self.patch_bias(bias, strength, ff)

    def factor(self, strength):
        return 1 + strength * (self.t("ia3_l").reshape(-1) - 1)

    def changes_bias(self):
        return True

    def patch_bias(self, bias, strength=1.0, feedforward=None):
        if bias is None:
            return None
        if feedforward is None:
            told = self.orientation_in_tensors(bias.numel())
            feedforward = self.feedforward_in_config() if told is None else told
        b = bias.to(COMPUTE_DTYPE)
        return b if feedforward else b * self.factor(strength)
