"""Orthogonal fine-tuning with block-diagonal rotations: LyCORIS Diag-OFT (and kohya OFT, same
math), LyCORIS 2.0 `oft_diag`, PEFT OFT v2 (`oft_R.weight`).

LyCORIS rotates the output side: per block Q = B - B^T, scaled down to the constraint
c = alpha * O (Frobenius norm over all blocks) when it exceeds it, R = (I + Q)(I - Q)^-1, and
W'_k = R_m^T W_k with R_m = I + m (R - I); `rescale` multiplies the rows afterwards, in full
whatever m is. PEFT rotates the input side: W' = W_flat R^T with R = blockdiag of Cayley
rotations (its Neumann series or the exact solve, as the file's config says; `coft` files are
projected as PEFT's merge projects them). PEFT has no strength; like sd-scripts' oft_v2 we
interpolate the result, W + m (W' - W) (for a Linear: the same interpolation of the rotated input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import COMPUTE_DTYPE, PASS_COST, Adapter, channel_view, flat


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """LyCORIS R = (I + Q)(I - Q)^-1 of Q = B - B^T, with its norm constraint (0 = none)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def interpolate(rotation: torch.Tensor, strength: float) -> torch.Tensor:
    """R_m = I + m (R - I), the trainers' multiplier on a rotation (not a geodesic)."""
    if strength == 1:
        return rotation
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    return eye + strength * (rotation - eye)


class DiagOFT(Adapter):
    algo = "diag-oft"
    suffixes = ("oft_blocks", "rescale")
    additive = False
    blocks_key = "oft_blocks"

    @classmethod
    def detect(cls, tensors):
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 3

    def validate(self):
        blocks = self.require(self.blocks_key, (3,))
        if blocks.shape[1] != blocks.shape[2]:
            raise self.error(f"expected square blocks (n, bs, bs), found {list(blocks.shape)}", self.blocks_key)
        self._validate_rescale()

    def _validate_rescale(self):
        rescale = self.tensors.get("rescale")
        if rescale is not None and rescale.numel() != self.out_channels:
            raise self.error(f"rescale has {rescale.numel()} entries, the blocks cover "
                             f"{self.out_channels} output channels", "rescale")

    @property
    def rank(self):
        """The block size (last dim of the blocks). LyCORIS's lora_dim became the block size, or
        the block count for layers with fewer than lora_dim^2 outputs."""
        return int(self.tensors[self.blocks_key].shape[-1])

    def file_scale(self):
        return 1.0

    @property
    def out_channels(self) -> int:
        blocks = self.tensors[self.blocks_key]
        return int(blocks.shape[-3] * blocks.shape[-1])

    def check_weight(self, weight_shape):
        if weight_shape[0] != self.out_channels:
            raise self.error(f"the rotation blocks cover {self.out_channels} output channels, "
                             f"the model's weight is {list(weight_shape)}", self.blocks_key)

    def rotation(self, strength: float) -> torch.Tensor:
        """R_m per block with the constraint alpha * O over all blocks (alpha 0 or absent: none)."""
        alpha = self.alpha or 0.0
        return interpolate(cayley(self.t(self.blocks_key), alpha * self.out_channels), strength)

    def rotate_rows(self, rows: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Diag-OFT on dim 0 of `rows` (O, ...): block k becomes R_k^T times it."""
        n, bs, _ = rotation.shape
        out = torch.einsum("kij,kin->kjn", rotation, rows.reshape(n, bs, -1))
        return out.reshape(rows.shape)

    def _rescaled(self, rows: torch.Tensor) -> torch.Tensor:
        rescale = self.t("rescale")
        if rescale is None:
            return rows
        return rows * rescale.to(rows.dtype).reshape([-1] + [1] * (rows.dim() - 1))

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        out = self._rescaled(self.rotate_rows(w, self.rotation(strength)))
        return out, None if bias is None else bias.to(COMPUTE_DTYPE)

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return False

    def factored_costs(self, out, inp):
        bs = self.tensors[self.blocks_key].shape[-1]
        return (bs + PASS_COST * 4) * out, (bs + PASS_COST * 3) * out * inp

    def bypass_is_dense(self, geometry=None):
        return False

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        """The same rotation on the channels of y - b, then rescale, then b back (output side:
        never the rotated weight), as rotate(y) + (b - rotate(b)). The rotation depends on the
        blocks only: built once per copy (Diag-OFT on a Linear with the rescale folded in)."""
        rotation = self.cached("rotation", (strength, y.dtype, y.device),
                               lambda: self.rotation(strength).to(y.dtype))
        shift = None
        if bias is not None:
            b = bias.to(y.dtype)
            shift = b - self._rescaled(self.rotate_rows(b.reshape(-1, 1), rotation)).reshape(-1)
        if geometry.linear:
            out = self.rotate_channels_last(y, rotation, strength)
        else:  # convs: channels on dim 1
            out = self._rescaled(self.rotate_rows(y.movedim(1, 0), rotation)).movedim(0, 1)
        return out if shift is None else out.add_(channel_view(shift, out, geometry.linear))

    def rotate_channels_last(self, y, rotation, strength):
        """`rotate_rows` then rescale on the last dim of a Linear's output, the rescale folded
        into the blocks (kept per copy)."""
        folded = self.cached("rotation_rescaled", (strength, y.dtype, y.device),
                             lambda: self._folded_rescale(rotation))
        n, bs, _ = folded.shape
        return torch.einsum("...ni,nij->...nj", y.reshape(*y.shape[:-1], n, bs), folded).reshape(y.shape)

    def _folded_rescale(self, rotation):
        """R_k with column j scaled by rescale[k*bs + j]: rescale after R^T in one matrix."""
        rescale = self.t("rescale")
        if rescale is None:
            return rotation
        n, bs, _ = rotation.shape
        return rotation * rescale.to(rotation.dtype).reshape(n, 1, bs)


class LegacyOFT(DiagOFT):
    """LyCORIS 2.0 `oft_diag`: the finished rotation R per block (constraint and any rescale
    already folded in); strength interpolates it, W'_k = (m R_k + (1 - m) I)^T W_k."""

    suffixes = ("oft_diag",)
    blocks_key = "oft_diag"

    @classmethod
    def detect(cls, tensors):
        return "oft_diag" in tensors

    def rotation(self, strength):
        return interpolate(self.t("oft_diag"), strength)


class PeftOFT(Adapter):
    """PEFT OFT v2: `oft_R.weight` (n_blocks, bs(bs-1)/2) holds the strict upper triangle of each
    skew block; blocks tile the input features (Linear I, conv I*kh*kw); `block_share` stores one
    block used for all of them. Files written before PEFT 0.18 with `use_cayley_neumann` used an
    older series (PEFT itself only warns): decoded with the current one. OneTrainer's OFT_2 writes
    the same key; with its "scaled OFT" it trains `oft_R / (2 sqrt(bs - 1))` and marks the module
    with a boolean `oft_R.scaled_oft` (its OFTRotationModule.forward)."""

    algo = "oft"
    suffixes = ("oft_R.weight", "oft_R.scaled_oft")
    additive = False

    @classmethod
    def detect(cls, tensors):
        return "oft_R.weight" in tensors

    @property
    def config(self) -> dict:
        return self.context.peft_config or {}

    def validate(self):
        vectors = self.require("oft_R.weight", (2,))
        size = self.block_size
        if vectors.shape[1] == 0 or size * (size - 1) // 2 != vectors.shape[1]:
            raise self.error(f"{vectors.shape[1]} entries per block is no upper triangle bs(bs-1)/2", "oft_R.weight")

    @property
    def block_size(self) -> int:
        return (1 + math.isqrt(1 + 8 * self.tensors["oft_R.weight"].shape[1])) // 2

    @property
    def rank(self):
        """The block size (PEFT's `oft_block_size`; its `r` is the block count)."""
        return self.block_size

    def file_scale(self):
        return 1.0

    def shared(self, columns: int) -> bool:
        """One stored block repeated over all input features (`block_share`)."""
        blocks = self.tensors["oft_R.weight"].shape[0]
        return blocks == 1 and columns != self.block_size and self.config.get("block_share", True)

    def check_weight(self, weight_shape):
        blocks = self.tensors["oft_R.weight"].shape[0]
        columns = math.prod(weight_shape[1:])
        if columns % self.block_size or (not self.shared(columns) and blocks * self.block_size != columns):
            raise self.error(f"{blocks} rotation blocks of size {self.block_size} do not tile the {columns} input "
                             f"features of the model's weight {list(weight_shape)}", "oft_R.weight")

    def rotations(self, columns: int) -> torch.Tensor:
        """(columns / bs, bs, bs) Cayley rotations as PEFT computes them for this file's config."""
        config, bs = self.config, self.block_size
        vectors = self.t("oft_R.weight")
        scaled = self.host("oft_R.scaled_oft")
        if scaled is not None and bool(scaled.reshape(-1)[0]) and bs > 1:
            vectors = vectors / (2 * math.sqrt(bs - 1))
        rows, cols = torch.triu_indices(bs, bs, 1)
        q = torch.zeros(vectors.shape[0], bs, bs, dtype=vectors.dtype, device=vectors.device)
        q[:, rows, cols] = vectors
        q = q - q.transpose(-1, -2)
        if config.get("coft", False):  # PEFT projects each block to norm <= eps / sqrt(n) before use
            eps = float(config.get("eps", 6e-5)) / math.sqrt(q.shape[0])
            norm = torch.linalg.matrix_norm(q, keepdim=True)
            q = torch.where(norm <= eps, q, q * (eps / norm))
        eye = torch.eye(bs, dtype=q.dtype, device=q.device).expand_as(q)
        if not config.get("use_cayley_neumann", True):
            r = torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^-1
        else:
            r = self._neumann(q, eye, int(config.get("num_cayley_neumann_terms", 5)))
        return r.expand(columns // bs, -1, -1) if self.shared(columns) else r

    @staticmethod
    def _neumann(q, eye, terms):
        """PEFT's truncated series of (I + Q)(I - Q)^-1: I + 2Q + 2Q^2 + ... + 2Q^(T-2) + Q^(T-1)
        (its loop makes T = 3 the same as T = 4)."""
        r = eye.clone()
        if terms > 1:
            r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
        return r

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        r = self.rotations(flat(w).shape[1])
        blocks = flat(w).reshape(w.shape[0], r.shape[0], self.block_size)
        rotated = torch.einsum("onj,nij->oni", blocks, r).reshape(w.shape)  # W_flat blockdiag(R)^T
        out = rotated if strength == 1 else w + strength * (rotated - w)
        return out, None if bias is None else bias.to(COMPUTE_DTYPE)

    def bypass_is_dense(self, geometry=None):
        return geometry is None or not geometry.linear

    def factored_costs(self, out, inp):
        bs = self.block_size
        return bs * inp + PASS_COST * 3 * inp, (bs + PASS_COST * 3) * out * inp

    def bypass_input_side(self, geometry, strength=1.0):
        return geometry.linear

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return not (input_applied and geometry is not None and geometry.linear)

    def bypass_input(self, x, weight, geometry, strength=1.0, *, token=None):
        """x blockdiag(R_m), R_m = I + m (R - I): the rotations are built once per copy."""
        self.check_weight((1, x.shape[-1]))
        r = self.cached("rotation", (strength, x.dtype, x.device, x.shape[-1]),
                        lambda: interpolate(self.rotations(x.shape[-1]), strength).to(x.dtype))
        xr = torch.einsum("...nj,nji->...ni", x.reshape(*x.shape[:-1], r.shape[0], self.block_size), r)
        return xr.reshape(x.shape)

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        """Linear: PEFT's own forward, f(x blockdiag(R_m)) with R_m = I + m (R - I), which equals
        x W_m^T + b for W_m = W + m (W' - W): with `input_applied` that is `y` itself, otherwise
        the layer is re-run on the rotated input. Convs: the patched weight (PEFT's unfold
        forward is not its merge)."""
        if not geometry.linear:
            return super().bypass(x, y, weight, bias, geometry, strength)
        if input_applied:
            return y
        if weight is None:
            raise self.error("oft in bypass mode needs the layer's weight (it rotates the input)")
        self.check_weight(weight.shape)
        xr = self.bypass_input(x, weight, geometry, strength)
        return F.linear(xr, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
