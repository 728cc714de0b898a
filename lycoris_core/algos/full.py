"""Full (`diff`, `diff_b`) and Norm (`w_norm`, `b_norm`): stored dense deltas, no scale.

W' = W + m*diff, b' = b + m*diff_b (ignored if the layer has no bias, as LyCORIS does);
norm layers alike with w_norm / b_norm. `ParameterDelta`: the same on a bare nn.Parameter
(Wan's per-block `modulation`, `diff_m` in lightx2v files), whose module name is the parameter's.
"""

from __future__ import annotations

import math

import torch

from .base import Adapter


class Full(Adapter):
    algo = "full"
    suffixes = ("diff", "diff_b")
    weight_key, bias_key = "diff", "diff_b"

    @classmethod
    def detect(cls, tensors):
        # a bias delta alone (lightx2v files: `diff_b` on layers without a weight delta) is one too;
        # beside another family's keys it belongs to that family (LoRA reads `diff_b` itself)
        from . import MODIFIERS  # the package's list (this module is imported while it is built)

        bias_only = cls.bias_key in tensors and all(k == cls.bias_key or k in MODIFIERS for k in tensors)
        return cls.weight_key in tensors or bias_only

    def validate(self):
        if self.bias_key not in self.tensors:
            self.require(self.weight_key)

    def file_scale(self):
        return 1.0

    def expected_shape(self):
        diff = self.tensors.get(self.weight_key)
        return None if diff is None else tuple(diff.shape)

    def delta(self, weight):
        diff = self.t(self.weight_key)
        return torch.zeros_like(weight) if diff is None else diff.reshape(weight.shape)

    def add_delta(self, w, factor, inplace=False):
        if self.weight_key not in self.tensors:  # bias only: the weight stays as it is
            return w if inplace else w.clone()
        return super().add_delta(w, factor, inplace)

    def changes_bias(self):
        return self.bias_key in self.tensors

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return False  # the layer's bias comes with the call whether or not the weight does

    def bias_delta(self, bias):
        d = self.t(self.bias_key)
        if d is None or bias is None:
            return None
        if d.numel() != bias.numel():
            raise self.error(f"expected {bias.numel()} values (the layer's bias), found {d.numel()}", self.bias_key)
        return d.reshape(bias.shape)


class Norm(Full):
    algo = "norm"
    suffixes = ("w_norm", "b_norm")
    weight_key, bias_key = "w_norm", "b_norm"


class ParameterDelta(Full):
    """P' = P + m*diff_m on a parameter that is not a layer's weight (lightx2v/Wan `blocks.N.diff_m`
    on `blocks.N.modulation`, shape (1, 6, dim); `head.diff_m` on the head's (1, 2, dim)). The reader
    names the module after the parameter (keys.PARAMETER_DELTAS), so matching finds the parameter
    key itself; it has no bias and no forward of its own, so it is always merged."""

    algo = "full"
    suffixes = ("diff_m",)
    weight_key, bias_key = "diff_m", None

    @classmethod
    def detect(cls, tensors):
        return cls.weight_key in tensors

    def changes_bias(self):
        return False

    def bias_delta(self, bias):
        return None

    def check_weight(self, weight_shape):
        if self.tensors[self.weight_key].numel() != math.prod(weight_shape):
            raise self.error(f"diff_m {list(self.tensors[self.weight_key].shape)} does not fit the model's "
                             f"parameter {list(weight_shape)}", self.weight_key)
