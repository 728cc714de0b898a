"""GLoRA (LyCORIS `algo=glora`): dW = W x_in A + B, with A = a1 @ a2 (I x I) and B = b1 @ b2.

LyCORIS >= 3.0 stores a2 (r, I) and a1 (I, r) for A, b2 (r, I[, k]) and b1 (O, r) for B; older
files swap the roles (a1/b1 down, a2/b2 up). The orientation is read from the shapes.
gamma = alpha / r, or alpha / sqrt(r) when the file was trained with rs_lora (GLoRA stores the
raw alpha, so only the metadata tells). Strength is linear; dW depends on W.

Bypass, factored: W'x = W(x + m*gamma*A x) + m*gamma*B x, so the input-side transform
x + m*gamma*a_up(a_down(x)) goes before the base forward and B runs as a LoRA beside it; neither
needs W. A caller that cannot transform the input gets the layer re-run on it (needs W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PASS_COST, Adapter, flat

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class GLoRA(Adapter):
    delta_uses_weight = True
    algo = "glora"
    suffixes = KEYS + ("bm.weight",)

    @classmethod
    def detect(cls, tensors):
        return "a1.weight" in tensors and "b1.weight" in tensors

    def validate(self):
        for key in KEYS:
            self.require(key)
        if not (self.new_layout or self.old_layout):
            shapes = {k: list(self.tensors[k].shape) for k in KEYS}
            raise self.error(f"GLoRA factor shapes do not fit together: {shapes}")

    @property
    def new_layout(self) -> bool:
        a1, a2, b1, b2 = (self.tensors[k] for k in KEYS)
        r = a2.shape[0]
        return a1.shape[1] == r and b1.shape[1] == r and b2.shape[0] == r and a1.shape[0] == flat(a2).shape[1]

    @property
    def old_layout(self) -> bool:
        a1, a2, b1, b2 = (self.tensors[k] for k in KEYS)
        r = a1.shape[0]
        return a2.shape[1] == r and b1.shape[0] == r and b2.shape[1] == r and a2.shape[0] == flat(a1).shape[1]

    def factors(self):
        """(A_down, A_up, B_down, B_up) in fp32 whatever the file's layout."""
        if self.new_layout:
            return self.t("a2.weight"), self.t("a1.weight"), self.t("b2.weight"), self.t("b1.weight")
        return self.t("a1.weight"), self.t("a2.weight"), self.t("b1.weight"), self.t("b2.weight")

    @property
    def rank(self):
        key = "a2.weight" if self.new_layout else "a1.weight"
        return int(self.tensors[key].shape[0])

    def file_scale(self):
        if self.context.bool_arg("rs_lora") and self.alpha is not None:
            return self.alpha / math.sqrt(self.rank)
        return super().file_scale()

    def expected_shape(self):
        a_down, _, b_down, b_up = (self.tensors[k] for k in (("a2.weight", "a1.weight", "b2.weight", "b1.weight")
                                                           if self.new_layout else KEYS))
        if b_down.dim() > 2:
            return (b_up.shape[0],) + tuple(b_down.shape[1:])
        return (b_up.shape[0], flat(b_down).shape[1])

    def delta(self, weight):
        a_down, a_up, b_down, b_up = self.factors()
        # W A with A = a_up a_down (I x I) taken as its two rank-r factors: O*I*2r multiply-adds
        w_a = ((weight.movedim(1, -1) @ flat(a_up)) @ flat(a_down)).movedim(-1, 1)
        b = (flat(b_up) @ flat(b_down)).reshape(weight.shape)
        return (w_a + b) * self.scale

    def factored_costs(self, out, inp):
        r = self.rank
        return r * (3 * inp + out) + PASS_COST * (3 * inp + 2 * out), (3 * r + PASS_COST * 3) * out * inp

    def bypass_input_side(self, geometry, strength=1.0):
        return not self.has_dora

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return self.has_dora or not input_applied

    def bypass_is_dense(self, geometry=None):
        return self.has_dora

    def bypass_input(self, x, weight, geometry, strength=1.0, *, token=None):
        """x + m*gamma*A x, A = a_up @ a_down mixing input channels (1x1 for convs)."""
        a_down, a_up, _, _ = (t.to(x.dtype) for t in self.factors())
        if geometry.linear:
            h = F.linear(x, flat(a_down)).reshape(-1, a_down.shape[0])
            return torch.addmm(x.reshape(-1, x.shape[-1]), h, flat(a_up).T, alpha=strength * self.scale).reshape(x.shape)
        else:
            ones = (1,) * geometry.conv_dims
            ax = geometry.apply(geometry.apply(x, flat(a_down).reshape(-1, x.shape[1], *ones), plain=True),
                                flat(a_up).reshape(x.shape[1], -1, *ones), plain=True)
        return x + (strength * self.scale) * ax

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        if self.has_dora:
            return super().bypass(x, y, weight, bias, geometry, strength, token=token, input_applied=input_applied)
        if not input_applied:
            if weight is None:
                raise self.error("glora in bypass mode needs the layer's weight (its delta is W A + B)")
            y = geometry.apply(self.bypass_input(x, weight, geometry, strength), weight.to(x.dtype),
                               None if bias is None else bias.to(x.dtype))
        _, _, b_down, b_up = (t.to(x.dtype) for t in self.factors())
        b_up = flat(b_up) * (strength * self.scale)
        if geometry.linear:
            h = F.linear(x, flat(b_down)).reshape(-1, b_down.shape[0])
            if y.is_contiguous():
                y.view(-1, y.shape[-1]).addmm_(h, b_up.T)
                return y
            return y.add_(F.linear(F.linear(x, flat(b_down)), b_up))
        shape = self.layer_shape(weight, geometry)
        h = geometry.apply(x, b_down.reshape(b_down.shape[:1] + tuple(shape[1:])))
        return y.add_(geometry.apply(h, b_up.reshape(b_up.shape + (1,) * geometry.conv_dims), plain=True))
