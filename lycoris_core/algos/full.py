"""Full (`diff`, `diff_b`) and Norm (`w_norm`, `b_norm`): stored dense deltas, no scale.

W' = W + m*diff, b' = b + m*diff_b (ignored if the layer has no bias, as LyCORIS does);
norm layers alike with w_norm / b_norm.
"""

from __future__ import annotations

from .base import Adapter


class Full(Adapter):
    algo = "full"
    suffixes = ("diff", "diff_b")
    weight_key, bias_key = "diff", "diff_b"

    @classmethod
    def detect(cls, tensors):
        return cls.weight_key in tensors

    def validate(self):
        self.require(self.weight_key)

    @property
    def scale(self):
        return 1.0

    def expected_shape(self):
        return tuple(self.tensors[self.weight_key].shape)

    def delta(self, weight):
        return self.t(self.weight_key).reshape(weight.shape)

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

