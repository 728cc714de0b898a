"""T-LoRA (lycoris-lora 4.x `algo=tlora`): a LoRA whose active ranks depend on the timestep.

dW = P diag(lambda) Q - P0 diag(lambda0) Q0, where (P0, lambda0, Q0) is the module's initial
state: the top-r SVD triplets of the base weight (`sig_type="principal"`, the default). It is
not saved, so it is rebuilt from the base weight being patched; the product is sign-invariant,
so this is exact when the base weight is the one the adapter was trained on. Files that carry
`base_q`/`base_p`/`base_lambda` use those instead. gamma = alpha / r; strength is linear.

Merging has no timestep, so it uses every rank (the trainer's forward with no mask set). Bypass
applies the trainer's rank mask per sampling step: at timestep t of T = 1000 the first
int(((T - t) / T) ** tlora_alpha * (r - tlora_min_rank)) + tlora_min_rank ranks stay active
(SimpleTuner's `tlora_min_rank`, `tlora_alpha`, from the file's metadata; defaults 1 and 1).
The timestep is data: the node layer hands a moved copy a 0-d tensor (`clock`) that it fills
before every model call (NaN: no mask), so the mask is computed on the device, per model, with
no process-wide state and nothing a compiled graph would freeze.
"""

from __future__ import annotations

import torch

from .base import COMPUTE_DTYPE, Adapter, channel_view, flat


MAX_TIMESTEP = 1000


def rank_mask(timestep, rank: int, min_rank: int = 1, alpha: float = 1.0) -> torch.Tensor:
    """lycoris-lora's `compute_timestep_mask` rule: (rank,) ones for the active ranks, computed from
    a tensor `timestep` (any device; NaN: every rank) without reading it back to the host."""
    t = torch.as_tensor(timestep, dtype=torch.float64)
    active = torch.floor(((MAX_TIMESTEP - t) / MAX_TIMESTEP) ** alpha * (rank - min_rank)) + min_rank
    active = torch.where(torch.isnan(t), torch.full_like(t, rank), active)
    return (torch.arange(rank, device=t.device) < active).to(COMPUTE_DTYPE)


class TLoRA(Adapter):
    delta_uses_weight = True
    patch_is_forward = False  # the merge has no timestep: its rank mask lives in the forward only
    algo = "tlora"
    suffixes = ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q", "base_p", "base_lambda")

    @classmethod
    def detect(cls, tensors):
        return "lambda_layer" in tensors and "q_layer.weight" in tensors and "p_layer.weight" in tensors

    def validate(self):
        q, p, lam = self.require("q_layer.weight"), self.require("p_layer.weight"), self.require("lambda_layer")
        r = q.shape[0]
        if p.shape[1] != r or lam.numel() != r:
            raise self.error(f"q_layer {list(q.shape)}, p_layer {list(p.shape)} and lambda_layer "
                             f"{list(lam.shape)} disagree on the rank", "lambda_layer")

    @property
    def rank(self):
        return int(self.tensors["q_layer.weight"].shape[0])

    def expected_shape(self):
        q, p = self.tensors["q_layer.weight"], self.tensors["p_layer.weight"]
        return (p.shape[0], q.shape[1])

    def check_weight(self, weight_shape):
        expected = self.expected_shape()
        if weight_shape[0] != expected[0] or weight_shape[1] != expected[1]:
            super().check_weight(weight_shape)

    caches_on_weight = True  # the initial state, an SVD of W

    def initial_state(self, weight):
        if "base_q" in self.tensors:
            return flat(self.t("base_p")), self.t("base_lambda").reshape(-1), flat(self.t("base_q"))
        r = self.rank
        sig_type = str(self.context.network_args.get("sig_type", "principal"))
        u, s, vh = torch.linalg.svd(flat(weight.to(COMPUTE_DTYPE)), full_matrices=False)
        if sig_type == "last":
            pick = slice(s.shape[0] - r, s.shape[0])
        elif sig_type == "middle":
            start = (s.shape[0] - r) // 2
            pick = slice(start, start + r)
        else:
            pick = slice(0, r)
        p0, s0, q0 = u[:, pick], s[pick], vh[pick]
        if q0.shape[0] < r:  # rank above the available singular values: zero padding as the trainer does
            pad = r - q0.shape[0]
            q0 = torch.nn.functional.pad(q0, (0, 0, 0, pad))
            p0 = torch.nn.functional.pad(p0, (0, pad))
            s0 = torch.nn.functional.pad(s0, (0, pad), value=1e-6)
        if weight.dim() > 2:  # the trainer keeps only the first in_channels columns for convs
            q0 = q0[:, : weight.shape[1]]
        return p0, s0, q0

    clock = None  # a 0-d timestep tensor the caller fills per model call (see the module docstring)

    @property
    def strength_linear(self):
        return True

    def mask(self, timestep) -> torch.Tensor:
        """The trainer's rank mask at `timestep` (all ones when None)."""
        if timestep is None:
            return torch.ones(self.rank)
        min_rank = self.context.int_arg("tlora_min_rank") or 1
        try:
            alpha = float(self.context.network_args.get("tlora_alpha", self.context.metadata.get("tlora_alpha", 1)))
        except (TypeError, ValueError):
            alpha = 1.0
        return rank_mask(timestep, self.rank, min_rank, alpha)

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        """y + m*gamma*(P(lambda*mu . Qx) - P0(lambda0*mu . Q0x)), mu the mask of the current step."""
        return y + strength * self.bypass_term(x, weight, bias, geometry, token=token)

    def bypass_term(self, x, weight, bias, geometry, *, token=None):
        """gamma*(P(lambda*mu . Qx) - P0(lambda0*mu . Q0x)). The initial state (an SVD of W) is
        computed once per layer weight (under torch.compile: kept from the first call)."""
        if weight is None:
            raise self.error("T-LoRA in bypass mode needs the layer's readable weight (its SVD is the base term)")
        # keyed on the stored weight's token (a cast copy's address rotates with offload buffers)
        cached = getattr(self, "_initial", None)
        if cached is not None and torch.compiler.is_compiling():
            key = cached[0]  # a traced graph cannot read addresses; the plan is staged per model
        else:
            key = token if token is not None else (weight.data_ptr(), tuple(weight.shape))
        if cached is None or cached[0] != key:
            self._initial = cached = (key, self.initial_state(weight))
        p0, lam0, q0 = cached[1]
        mu = self.mask(self.clock).to(x.device)
        p, lam, q = flat(self.t("p_layer.weight")), self.t("lambda_layer").reshape(-1), flat(self.t("q_layer.weight"))
        ones = (1,) * geometry.conv_dims  # convs: 1x1 factors, Q with the layer's geometry as the trainer does

        def branch(up, scale, down):
            down = down.to(x.dtype).reshape(down.shape + ones)
            h = geometry.apply(x, down) * channel_view((scale * mu).to(x.dtype), x, geometry.linear)
            return geometry.apply(h, up.to(x.dtype).reshape(up.shape + ones), plain=True)

        return (branch(p, lam, q) - branch(p0, lam0, q0)) * self.scale

    def delta(self, weight):
        p, lam, q = flat(self.t("p_layer.weight")), self.t("lambda_layer").reshape(-1), flat(self.t("q_layer.weight"))
        p0, lam0, q0 = self.initial_state(weight)
        d = (p * lam) @ q - (p0 * lam0) @ q0
        if weight.dim() > 2:  # 1x1 factors; the trainer pads the delta into the kernel's corner
            full = torch.zeros(weight.shape, dtype=d.dtype)
            full[(slice(None), slice(None)) + (0,) * (weight.dim() - 2)] = d
            return full * self.scale
        return d.reshape(weight.shape) * self.scale
