"""LoKr (LyCORIS `algo=lokr`, PEFT LoKr): Kronecker product dW = w1 (x) W2.

w1 is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`; W2 is `lokr_w2`, `lokr_w2_a @ lokr_w2_b`, or Tucker
`lokr_t2 x1 lokr_w2_a x2 lokr_w2_b`. The rank is read from a `_b` factor (not `w2_a`, which is
(r, b) in the Tucker layout).

Scale, as the trainer computed it:
- something decomposed: gamma = alpha / rank;
- both factors full: LyCORIS trains with gamma = alpha_file / lora_dim, where it stores
  alpha = lora_dim, so gamma = 1 unless metadata (`ss_network_dim`, `conv_dim`) says
  otherwise (rs-LoRA full-matrix files); PEFT trains with alpha / r from its config.
Strength is linear.

Layout on conv weights: LyCORIS gives w1 a singleton kernel axis for every conv (w1[i, j] scales the
whole kernel of W2); PEFT does so only when w2 is 4-D, so a full 3-D `lokr_w2` (Conv1d) meets a 2-D
w1 and `torch.kron` lays the product out as (b, a*d, c*k) before PEFT reshapes it to the weight's
shape. Files with the PEFT convention are decoded that way (`peft_flat_kron`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PASS_COST, Adapter, flat


class LoKr(Adapter):
    algo = "lokr"
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")

    @classmethod
    def detect(cls, tensors):
        return "lokr_w1" in tensors or "lokr_w1_a" in tensors

    def validate(self):
        if "lokr_w1" not in self.tensors:
            a, b = self.require("lokr_w1_a", (2,)), self.require("lokr_w1_b", (2,))
            if a.shape[1] != b.shape[0]:
                raise self.error(f"lokr_w1_a {list(a.shape)} and lokr_w1_b {list(b.shape)} disagree on the rank", "lokr_w1_a")
        if "lokr_w2" not in self.tensors:
            a, b = self.require("lokr_w2_a"), self.require("lokr_w2_b")
            t2 = self.tensors.get("lokr_t2")
            if t2 is not None:
                if t2.shape[0] != a.shape[0] or t2.shape[1] != b.shape[0]:
                    raise self.error(
                        f"lokr_t2 {list(t2.shape)} does not fit lokr_w2_a {list(a.shape)} and lokr_w2_b {list(b.shape)}",
                        "lokr_t2",
                    )
            elif a.shape[1] != b.shape[0]:
                raise self.error(f"lokr_w2_a {list(a.shape)} and lokr_w2_b {list(b.shape)} disagree on the rank", "lokr_w2_a")

    @property
    def decomposed(self) -> bool:
        return "lokr_w1" not in self.tensors or "lokr_w2" not in self.tensors

    @property
    def rank(self):
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in self.tensors:
                return int(self.tensors[key].shape[0])
        return None

    def file_scale(self):
        if self.decomposed:
            return super().file_scale()
        # Both factors full: LyCORIS forced alpha = lora_dim while training.
        alpha = self.alpha
        dim = None
        if self.context.convention == "lycoris" and alpha is not None:
            conv = self.tensors["lokr_w2"].dim() > 2 and any(s > 1 for s in self.tensors["lokr_w2"].shape[2:])
            dim = self.context.int_arg("conv_dim") if conv else None
            dim = dim or self.context.int_arg("ss_network_dim")
        base = alpha / dim if dim else 1.0
        scalar = self.host("scalar")
        if scalar is not None and scalar.numel() == 1:
            base *= float(scalar.float().reshape(-1)[0])
        return base

    def w1(self):
        w1 = self.t("lokr_w1")
        return w1 if w1 is not None else self.t("lokr_w1_a") @ self.t("lokr_w1_b")

    def w2(self, kernel=()):
        """The large factor (b, d, *kernel); `kernel` comes from the weight when w2 is flattened."""
        w2 = self.t("lokr_w2")
        if w2 is not None:
            return w2
        a, b, t2 = self.t("lokr_w2_a"), self.t("lokr_w2_b"), self.t("lokr_t2")
        if t2 is not None:
            return torch.einsum("ij...,ip,jr->pr...", t2, a, flat(b))
        w2 = a @ flat(b)
        if kernel:
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
        return w2

    def expected_shape(self):
        w1 = self.tensors.get("lokr_w1")
        a = w1.shape if w1 is not None else (self.tensors["lokr_w1_a"].shape[0], self.tensors["lokr_w1_b"].shape[1])
        if "lokr_w2" in self.tensors:
            b = self.tensors["lokr_w2"].shape
            return (a[0] * b[0], a[1] * b[1]) + tuple(b[2:])
        if "lokr_t2" in self.tensors:
            t2 = self.tensors["lokr_t2"]
            rows, cols = self.tensors["lokr_w2_a"].shape[1], self.tensors["lokr_w2_b"].shape[1]
            return (a[0] * rows, a[1] * cols) + tuple(t2.shape[2:])
        rows, cols = self.tensors["lokr_w2_a"].shape[0], self.tensors["lokr_w2_b"].shape[1]
        return (a[0] * rows, a[1] * cols)

    def peft_flat_kron(self) -> bool:
        """PEFT's Conv1d product with a full w2: w1 gets no kernel axis (module docstring)."""
        w2 = self.tensors.get("lokr_w2")
        return self.context.convention == "peft" and w2 is not None and w2.dim() == 3

    def delta(self, weight):
        w1 = self.w1()
        w2 = self.w2(tuple(weight.shape[2:]))
        if self.peft_flat_kron():
            return torch.kron((w1 * self.scale).contiguous(), w2.contiguous()).reshape(weight.shape)
        if w2.dim() > 2 or weight.dim() > 2:
            w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:]) if w2.dim() == 2 else w2
            w1 = w1.reshape(w1.shape + (1,) * (w2.dim() - 2))
        d = torch.kron((w1 * self.scale).contiguous(), w2.contiguous())  # gamma on the small factor
        return d.reshape(weight.shape)

    def add_delta(self, w, factor, inplace=False):
        if w.dim() != 2 or not (inplace and w.is_contiguous()):
            return super().add_delta(w, factor, inplace)
        # Linear, in place: W viewed as (a, b, c, d) takes w1[i, j] * W2[k, l] at [i, k, j, l],
        # one broadcast pass over the weight instead of a full-size Kronecker product
        w1, w2 = self.w1() * self.scale, self.w2()
        if w2.dim() != 2 or w1.shape[0] * w2.shape[0] != w.shape[0] or w1.shape[1] * w2.shape[1] != w.shape[1]:
            return super().add_delta(w, factor, inplace)
        (a, c), (b, d) = w1.shape, w2.shape
        w.view(a, b, c, d).addcmul_(w1.view(a, 1, c, 1), w2.view(1, b, 1, d), value=factor)
        return w

    def factored_costs(self, out, inp):
        w1 = self.tensors.get("lokr_w1")
        a, c = w1.shape if w1 is not None else (self.tensors["lokr_w1_a"].shape[0], self.tensors["lokr_w1_b"].shape[1])
        per_token = inp * (out // a) + out * c + PASS_COST * (inp + 3 * out)  # W2 on x's rows, then w1
        return per_token, (1 + PASS_COST * 2) * out * inp  # one broadcast addcmul

    def delta_forward(self, x, geometry, shape):
        """Linear: the Kronecker identity; convs: the dense delta, built once (see Adapter)."""
        if not geometry.linear:
            return super().delta_forward(x, geometry, shape)
        return self.kron_forward(x, self.scale)

    def kron_forward(self, x, factor):
        """factor * (w1 (x) W2) x  ==  vec(w1 . X . W2^T) with x viewed as (c, d); a low-rank W2
        (w2_a @ w2_b, no Tucker) is applied as its two factors when that has fewer multiply-adds."""
        w1, w2_parts = self.cached("factors", (x.dtype, x.device), lambda: self.kron_factors(x.dtype))
        w1 = w1 * factor  # the factor on the small matrix
        c = w1.shape[1]
        z = x.reshape(*x.shape[:-1], c, -1)
        for part in w2_parts:
            z = F.linear(z, part)  # (..., c, b) in the end
        return torch.matmul(w1, z).reshape(*x.shape[:-1], -1)  # (..., a, b) -> (..., a*b)

    def kron_factors(self, dtype):
        """(w1, [W2] or [w2_b, w2_a]) for `kron_forward`, in `dtype`."""
        a, b = self.tensors.get("lokr_w2_a"), self.tensors.get("lokr_w2_b")
        if a is not None and b is not None and b.dim() == 2 and "lokr_t2" not in self.tensors:
            rows, rank, cols = a.shape[0], a.shape[1], b.shape[1]
            if rank * (rows + cols) < rows * cols:
                return self.w1().to(dtype), [self.t("lokr_w2_b").to(dtype), self.t("lokr_w2_a").to(dtype)]
        return self.w1().to(dtype), [flat(self.w2()).to(dtype)]
