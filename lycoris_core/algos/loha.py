"""LoHa (LyCORIS `algo=loha`, PEFT LoHa): Hadamard product of two low-rank products.

dW = (w1_a @ w1_b) * (w2_a @ w2_b); Tucker: T_j = t_j x1 w_j_a x2 w_j_b, dW = T_1 * T_2.
gamma = alpha / rank, applied once (LyCORIS's training forward; its merge_to applies it twice).
Strength is linear. Bypass has no factored identity, so it runs the dense delta.
"""

from __future__ import annotations

import torch

from .base import Adapter, flat

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Adapter):
    algo = "loha"
    suffixes = KEYS + ("hada_t1", "hada_t2")

    @classmethod
    def detect(cls, tensors):
        return "hada_w1_a" in tensors

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.tensors

    def validate(self):
        for key in KEYS:
            self.require(key, (2,))
        if self.tucker:
            self.require("hada_t2", (3, 4, 5))
            for j in "12":
                a, b, t = (self.tensors[f"hada_w{j}_a"], self.tensors[f"hada_w{j}_b"], self.tensors[f"hada_t{j}"])
                if t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                    raise self.error(
                        f"hada_t{j} of shape {list(t.shape)} does not fit hada_w{j}_a {list(a.shape)} "
                        f"and hada_w{j}_b {list(b.shape)} (expected [r, r, kh, kw] with (r, out) and (r, in) factors)",
                        f"hada_t{j}",
                    )
        else:
            for j in "12":
                a, b = self.tensors[f"hada_w{j}_a"], self.tensors[f"hada_w{j}_b"]
                if a.dim() != 2 or a.shape[1] != b.shape[0]:
                    raise self.error(
                        f"hada_w{j}_a {list(a.shape)} and hada_w{j}_b {list(b.shape)} disagree on the rank",
                        f"hada_w{j}_a",
                    )
        if self.half_shape("1") != self.half_shape("2"):
            raise self.error(
                f"the two Hadamard factors give different shapes: {list(self.half_shape('1'))} and "
                f"{list(self.half_shape('2'))}", "hada_w2_b")

    def half_shape(self, j: str) -> tuple:
        a, b = self.tensors[f"hada_w{j}_a"], self.tensors[f"hada_w{j}_b"]
        if self.tucker:
            return (a.shape[1], b.shape[1]) + tuple(self.tensors[f"hada_t{j}"].shape[2:])
        return (a.shape[0], b[0].numel())

    @property
    def rank(self):
        return int(self.tensors["hada_w1_b"].shape[0])

    def expected_shape(self):
        if self.tucker:
            a, b, t = self.tensors["hada_w1_a"], self.tensors["hada_w1_b"], self.tensors["hada_t1"]
            return (a.shape[1], b.shape[1]) + tuple(t.shape[2:])
        a, b = self.tensors["hada_w1_a"], self.tensors["hada_w1_b"]
        return (a.shape[0], b.shape[1])

    def delta(self, weight):
        # gamma folded into the first small factor: no extra pass over the full-size product
        first = {"1": self.scale, "2": 1.0}
        if self.tucker:
            parts = [
                torch.einsum("ij...,io,jk->ok...", self.t(f"hada_t{j}"), self.t(f"hada_w{j}_a") * first[j],
                             self.t(f"hada_w{j}_b"))
                for j in "12"
            ]
        else:
            parts = [(flat(self.t(f"hada_w{j}_a")) * first[j]) @ flat(self.t(f"hada_w{j}_b")) for j in "12"]
        return parts[0].mul_(parts[1]).reshape(weight.shape)
