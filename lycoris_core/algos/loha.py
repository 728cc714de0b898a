"""LoHa (LyCORIS `algo=loha`, PEFT LoHa): Hadamard product of two low-rank products.

dW = (w1_a @ w1_b) * (w2_a @ w2_b); Tucker: T_j = t_j x1 w_j_a x2 w_j_b, dW = T_1 * T_2.
gamma = alpha / rank, applied once (LyCORIS's training forward; its merge_to applies it twice).
Strength is linear.

Bypass: (A1 B1) * (A2 B2) == U D with U[o, pq] = A1[o, p] A2[o, q] and D[pq, i] = B1[p, i] B2[q, i]
(row-wise Khatri-Rao products), an exact rank-r1*r2 LoRA. Per token (pixel) it costs
r1*r2*(I*k + O) multiply-adds against O*I*k for the dense delta run through the layer op, so the
product form is used where it is cheaper and the dense delta (built once per device, O*I*k
values kept in the activation dtype) elsewhere, and for Tucker and grouped convs. The product
factors keep r1*r2*(O + I*k) values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PASS_COST, Adapter, flat, tracks_grad

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
ROW_BLOCK = 2 ** 21  # elements per block of rows in `add_delta` (two reused fp32 buffers of 8 MiB)


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

    def halves(self):
        """The two full-size Hadamard factors, gamma folded into the first (its small factor, so
        no extra pass over a full-size product)."""
        first = {"1": self.scale, "2": 1.0}
        if self.tucker:
            return [
                torch.einsum("ij...,io,jk->ok...", self.t(f"hada_t{j}"), self.t(f"hada_w{j}_a") * first[j],
                             self.t(f"hada_w{j}_b"))
                for j in "12"
            ]
        return [(flat(self.t(f"hada_w{j}_a")) * first[j]) @ flat(self.t(f"hada_w{j}_b")) for j in "12"]

    def delta(self, weight):
        one, two = self.halves()
        return one.mul_(two).reshape(weight.shape)

    def add_delta(self, w, factor, inplace=False):
        """W + m * (T1 * T2) in one pass over the weight. Non-Tucker: on large weights both
        halves are built a block of rows at a time into two reused buffers, so no full-size half
        is allocated (fresh large allocations fault in every page on a CPU): measured 2x faster
        on Flux-sized layers (12288x3072: 163 -> 85 ms), the same on SDXL-sized ones, which
        fit in one block."""
        if self.tucker or tracks_grad(w):  # out= ops cannot record a graph
            one, two = (half.reshape(w.shape) for half in self.halves())
            return w.addcmul_(one, two, value=factor) if inplace else torch.addcmul(w, one, two, value=factor)
        rows_in = flat(w)
        out = rows_in if inplace else torch.empty_like(rows_in)
        a1 = (flat(self.t("hada_w1_a")) * self.scale).to(w.dtype)
        a2, b1, b2 = (flat(self.t(key)).to(w.dtype) for key in ("hada_w2_a", "hada_w1_b", "hada_w2_b"))
        block = max(1, ROW_BLOCK // rows_in.shape[1])
        buffers = [torch.empty(min(block, rows_in.shape[0]), rows_in.shape[1], dtype=w.dtype, device=w.device)
                   for _ in range(2)]
        for start in range(0, rows_in.shape[0], block):
            rows = slice(start, start + block)
            n = min(block, rows_in.shape[0] - start)
            one = torch.mm(a1[rows], b1, out=buffers[0][:n])
            two = torch.mm(a2[rows], b2, out=buffers[1][:n])
            torch.addcmul(rows_in[rows], one, two, value=factor, out=out[rows])
        return out.reshape(w.shape)

    def factored_costs(self, out, inp):
        r1, r2 = self.tensors["hada_w1_b"].shape[0], self.tensors["hada_w2_b"].shape[0]
        product = r1 * r2 * (inp + out) + PASS_COST * 2 * r1 * r2
        per_token = min(product, out * inp) + PASS_COST * (inp + 2 * out)
        return per_token, (r1 + r2 + 1 + PASS_COST * 5) * out * inp  # two halves, one addcmul

    def product_factors_cheaper(self, geometry, shape) -> bool:
        """Whether the rank-r1*r2 product form costs fewer multiply-adds per output position than
        the dense delta (never for Tucker or grouped convs, which keep the dense delta)."""
        if self.tucker or geometry.groups != 1:
            return False
        out_channels, columns = shape[0], math.prod(shape[1:])
        r2 = self.tensors["hada_w1_b"].shape[0] * self.tensors["hada_w2_b"].shape[0]
        return r2 * (columns + out_channels) < out_channels * columns

    def product_factors(self, dtype):
        """(gamma * U (O, r1*r2), D (r1*r2, I*k)) with dW = U @ D."""
        a1, a2 = self.t("hada_w1_a") * self.scale, self.t("hada_w2_a")
        b1, b2 = self.t("hada_w1_b"), self.t("hada_w2_b")
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up.to(dtype), down.to(dtype)

    def delta_forward(self, x, geometry, shape):
        if not self.product_factors_cheaper(geometry, shape):
            return super().delta_forward(x, geometry, shape)
        up, down = self.cached("product", (x.dtype, x.device), lambda: self.product_factors(x.dtype))
        if geometry.linear:
            return F.linear(F.linear(x, down), up)
        h = geometry.apply(x, down.reshape(down.shape[:1] + tuple(shape[1:])))
        return geometry.apply(h, up.reshape(up.shape + (1,) * geometry.conv_dims), plain=True)
