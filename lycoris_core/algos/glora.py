"""GLoRA (LyCORIS `algo=glora`): dW = W x_in A + B, with A = a1 @ a2 (I x I) and B = b1 @ b2.

LyCORIS >= 3.0 stores a2 (r, I) and a1 (I, r) for A, b2 (r, I[, k]) and b1 (O, r) for B; older
files swap the roles (a1/b1 down, a2/b2 up). The orientation is read from the shapes.
gamma = alpha / r, or alpha / sqrt(r) when the file was trained with rs_lora (GLoRA stores the
raw alpha, so only the metadata tells). Strength is linear; dW depends on W.
"""

from __future__ import annotations

import math

import torch

from .base import Adapter, flat

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

    @property
    def scale(self):
        if self.scale_override is None and self.context.bool_arg("rs_lora") and self.alpha is not None:
            return self.alpha / math.sqrt(self.rank)
        return super().scale

    def expected_shape(self):
        a_down, _, b_down, b_up = (self.tensors[k] for k in (("a2.weight", "a1.weight", "b2.weight", "b1.weight")
                                                           if self.new_layout else KEYS))
        if b_down.dim() > 2:
            return (b_up.shape[0],) + tuple(b_down.shape[1:])
        return (b_up.shape[0], flat(b_down).shape[1])

    def delta(self, weight):
        a_down, a_up, b_down, b_up = self.factors()
        a = flat(a_up) @ flat(a_down)  # (I, I)
        w_a = torch.einsum("oi...,ij->oj...", weight, a)
        b = (flat(b_up) @ flat(b_down)).reshape(weight.shape)
        return (w_a + b) * self.scale
