"""LoRA / LoCon (kohya, LyCORIS, PEFT, diffusers), incl. Tucker `lora_mid`, DyLoRA and
extraction files with a sparse weight residual (`bias_indices`/`bias_values`/`bias_size`).

dW = up @ down (flattened), Tucker: up x1 mid x2 down; gamma = alpha / rank.
Strength is linear: W' = W + m * gamma * dW (DoRA: see base.weight_decompose).
A `diff_b` beside the factors (lightx2v/Wan distillation files) is a plain bias delta: b' = b + m * diff_b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PASS_COST, Adapter, channel_view, flat

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


class LoRA(Adapter):
    algo = "lora"
    suffixes = (UP, DOWN, MID, "lora_up.bias", "lora_magnitude_vector", "bias_indices", "bias_values", "bias_size",
                "diff_b")

    @classmethod
    def detect(cls, tensors):
        return UP in tensors and DOWN in tensors

    def validate(self):
        up = self.require(UP, (2, 3, 4, 5))
        down = self.require(DOWN, (2, 3, 4, 5))
        mid = self.tensors.get(MID)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise self.error(f"lora_up has rank {up.shape[1]} but lora_down has rank {rank}", UP)
        if mid is not None and (mid.dim() < 3 or mid.shape[0] != rank or mid.shape[1] != rank):
            raise self.error(f"expected lora_mid of shape [{rank}, {rank}, kh, kw], found {list(mid.shape)}", MID)

    @property
    def rank(self):
        return int(self.tensors[DOWN].shape[0])

    def expected_shape(self):
        up, down, mid = self.tensors[UP], self.tensors[DOWN], self.tensors.get(MID)
        if mid is not None:
            return (up.shape[0], down.shape[1]) + tuple(mid.shape[2:])
        if down.dim() == 2 and up.dim() <= 2:
            return (up.shape[0], down.shape[1])
        if down.dim() > 2:
            return (up.shape[0],) + tuple(down.shape[1:])
        return None

    def delta(self, weight):
        up, down, mid = flat(self.t(UP)) * self.scale, flat(self.t(DOWN)), self.t(MID)
        if mid is None:
            d = (up @ down).reshape(weight.shape)
        else:
            d = torch.einsum("ij...,oi,jk->ok...", mid, up, down).reshape(weight.shape)
        residual = self.sparse_residual(weight.shape)
        if residual is not None:
            d.add_(residual, alpha=self.scale)
        return d

    def add_delta(self, w, factor, inplace=False):
        alpha = factor * self.scale
        if MID in self.tensors or "bias_indices" in self.tensors or not math.isfinite(alpha):
            # (BLAS may skip the product for a NaN alpha: the generic path keeps it visible)
            return super().add_delta(w, factor, inplace)
        # one fused pass over the weight: W + factor*gamma * up @ down
        up, down = flat(self.t(UP)), flat(self.t(DOWN))
        if inplace and w.is_contiguous():
            flat(w).addmm_(up, down, alpha=alpha)
            return w
        return torch.addmm(flat(w), up, down, alpha=alpha).reshape(w.shape)

    def factored_costs(self, out, inp):
        r = self.rank
        return r * (inp + out) + PASS_COST * (inp + 2 * out), (r + PASS_COST * 2) * out * inp

    def sparse_residual(self, shape):
        """Extraction tools' `bias_*` keys: a sparse residual of the weight delta, not a layer bias."""
        indices = self.tensors.get("bias_indices")
        if indices is None:
            return None
        values = self.t("bias_values")
        size = [int(s) for s in self.host("bias_size").reshape(-1).tolist()]
        dense = torch.sparse_coo_tensor(indices.long(), values, size).to_dense()
        return dense.reshape(shape)

    def changes_bias(self):
        return "lora_up.bias" in self.tensors or "diff_b" in self.tensors

    def bias_delta(self, bias):
        # PEFT lora_bias=True: b' = b + s * lora_B.bias; lightx2v/Wan files add a plain `diff_b`
        # beside lora_up/lora_down (a full bias delta, not scaled by alpha)
        extra, diff = self.t("lora_up.bias"), self.t("diff_b")
        delta = None if extra is None else extra * self.scale
        if diff is not None:
            if bias is not None and diff.numel() != bias.numel():
                raise self.error(f"expected {bias.numel()} values (the layer's bias), found {diff.numel()}", "diff_b")
            diff = diff.reshape(-1) if bias is None else diff.reshape(bias.shape)
            delta = diff if delta is None else delta + diff
        return delta

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        plain = not any(k in self.tensors for k in ("dora_scale", "lora_magnitude_vector", "lora_up.bias", "diff_b"))
        if geometry.linear and plain and "bias_indices" not in self.tensors:
            # y + m*gamma * up(down(x)) in one fused pass, into y's own storage when it is contiguous
            down, up = flat(self.t(DOWN)).to(x.dtype), flat(self.t(UP)).to(x.dtype)
            h = F.linear(x, down).reshape(-1, down.shape[0])
            factor = strength * self.scale
            if y.is_contiguous():
                y.view(-1, y.shape[-1]).addmm_(h, up.T, alpha=factor)
                return y
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, up.T, alpha=factor).reshape(y.shape)
        return super().bypass(x, y, weight, bias, geometry, strength, token=token, input_applied=input_applied)

    def delta_forward(self, x, geometry, shape):
        """gamma * up(mid(down(x))): down carries the kernel (or mid does, Tucker); up is 1x1."""
        if "bias_indices" in self.tensors or geometry.groups != 1:
            return super().delta_forward(x, geometry, shape)
        up, down, mid = (None if t is None else t.to(x.dtype) for t in (self.t(UP), self.t(DOWN), self.t(MID)))
        up = flat(up) * self.scale
        if geometry.linear:
            return F.linear(F.linear(x, flat(down)), up)
        kernel_dims = (1,) * geometry.conv_dims
        up = up.reshape(up.shape + kernel_dims)
        if mid is None:
            down = down if down.dim() > 2 else down.reshape(down.shape[:1] + tuple(shape[1:]))
            h = geometry.apply(x, down)
        else:
            h = geometry.apply(x, down.reshape(down.shape[:2] + kernel_dims), plain=True)
            h = geometry.apply(h, mid)
        return geometry.apply(h, up, plain=True)
