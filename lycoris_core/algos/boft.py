"""Butterfly OFT: LyCORIS BOFT (4-D `oft_blocks`) and PEFT BOFT (`boft_R`, `boft_s`).

LyCORIS (>= 3.2.0.post2) applies M = log2(n) + 1 stages to the rows of W; stage i pairs rows
k = 2^i * bs/2 apart (view rows as (O/2k, 2, k), swap the last two axes), multiplies each group of
bs rows by R_m = I + m (R - I) (R itself, not R^T), and undoes the permutation; `rescale`
multiplies the rows at the end, in full. The constraint is Diag-OFT's, over all stages jointly.
PEFT builds M = prod_i P_i blockdiag(R_i) P_i^T on the input side (Cayley with S = (B - B^T)/2,
R = (I - S)(I + S)^-1) and W' = (W_flat M^T) * s; it has no strength, so the result is
interpolated, W + m (W' - W), as sd-scripts' boft does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import COMPUTE_DTYPE, PASS_COST, Adapter, flat, tracks_grad
from .oft import DiagOFT


COMPOSED_BLOCK = 128  # consecutive butterfly stages are multiplied out into dense blocks up to this size


def _butterfly_last(y: torch.Tensor, rotations: torch.Tensor, first_stage: int) -> torch.Tensor:
    """`_butterfly`'s stages `first_stage`, ... on the last dim of `y` (channels last)."""
    stages, groups, size, _ = rotations.shape
    half, lead, channels = size // 2, y.shape[:-1], y.shape[-1]
    for i in range(stages):
        k = 2 ** (first_stage + i) * half
        y = y.reshape(*lead, channels // (2 * k), 2, k).transpose(-1, -2).reshape(*lead, groups, size)
        y = torch.einsum("gij,...gj->...gi", rotations[i], y)
        y = y.reshape(*lead, channels // (2 * k), k, 2).transpose(-1, -2).reshape(*lead, channels)
    return y


def _butterfly(rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """LyCORIS's stage sequence on dim 0 of `rows` (O, ...)."""
    stages, groups, size, _ = rotations.shape
    half = size // 2
    out = rows
    for i in range(stages):
        k = 2 ** i * half
        tail = out.shape[1:]
        out = out.reshape(-1, 2, k, *tail).transpose(1, 2).reshape(groups, size, *tail)
        out = torch.einsum("gij,gj...->gi...", rotations[i], out)
        out = out.reshape(-1, k, 2, *tail).transpose(1, 2).reshape(-1, *tail)
    return out


class BOFT(DiagOFT):
    """LyCORIS BOFT: Diag-OFT's rotation, constraint, rescale and bypass with butterfly stages."""

    algo = "boft"

    @classmethod
    def detect(cls, tensors):
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4

    def validate(self):
        blocks = self.require("oft_blocks", (4,))
        stages, groups, size, size2 = blocks.shape
        power_of_two = groups >= 1 and not groups & (groups - 1)
        if size != size2 or size % 2 or stages < 1 or not power_of_two or 2 ** (stages - 1) > groups:
            raise self.error(f"expected (stages, n, bs, bs) butterfly blocks with even bs and n a power of two, "
                             f"found {list(blocks.shape)}", "oft_blocks")
        self._validate_rescale()

    def rotate_rows(self, rows, rotation):
        return _butterfly(rows, rotation)

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        """The rows of W rotated by the composed stages (see `rotate_channels_last`), each group
        one batched matmul on whole rows: the rows of a block are gathered by one row copy
        (none for the first group), and the copy between two groups goes straight from one
        group's order to the next. No transposes of W."""
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        rows = flat(w)  # (O, I*k)
        groups = self._groups(None, strength, rows)
        bounds, half = tuple((p, q) for p, q, _ in groups), self.tensors["oft_blocks"].shape[-1] // 2
        orders = self.cached("row_orders", (rows.device, bounds),
                             lambda: _row_orders(rows.shape[0], bounds, half, rows.device))
        # two work buffers, used in turn (fresh large allocations cost a page fault per page on a
        # CPU); the weight's rows serve as one when they are a copy of our own, else only read.
        # None (fresh outputs) where autograd records: out= ops cannot be part of a graph.
        if tracks_grad(rows, *(blocks for _, _, blocks in groups)):
            other = lambda t: None  # noqa: E731
        else:
            own = inplace or w.data_ptr() != weight.data_ptr()
            buffers = (rows if own else torch.empty_like(rows), torch.empty_like(rows))
            other = lambda t: buffers[1] if t is buffers[0] else buffers[0]  # noqa: E731
        out = rows
        for (_, _, blocks), gather in zip(groups, orders):
            if gather is not None:
                out = torch.index_select(out.reshape(rows.shape), 0, gather, out=other(out))
            n, size, _ = blocks.shape
            target = other(out)
            product = torch.bmm(blocks.transpose(1, 2), out.reshape(n, size, -1),
                                out=None if target is None else target.reshape(n, size, -1))
            out = product if target is None else target
        if orders[-1] is not None:
            out = torch.index_select(out.reshape(rows.shape), 0, orders[-1], out=other(out))
        return out.reshape(w.shape), None if bias is None else bias.to(COMPUTE_DTYPE)

    def _groups(self, rotation, strength, like):
        """The composed stage groups in `like`'s dtype and device, built once per copy and strength."""
        def build():
            r = (rotation if rotation is not None else self.rotation(strength)).to(COMPUTE_DTYPE)
            return [(p, q, blocks.to(like.dtype)) for p, q, blocks in self._composed_groups(r)]

        return self.cached("composed", (strength, like.dtype, like.device), build)

    def rotate_channels_last(self, y, rotation, strength):
        """`rotate_rows` then rescale on the last dim of `y`, with the stages multiplied out in
        groups: stages p..q-1 mix a channel's lowest bs/2 digit and its bits p..q-1 above it, so
        together they are one block-diagonal product over 2^(q-p) * bs/2 channels (up to
        COMPOSED_BLOCK), applied after a reshape that gathers each block (none for the first
        group). One pass per group instead of three per stage; the rescale is folded into the
        last group. Built once per copy and strength (`rotation`: R_m, computed when None)."""
        out, half = y, self.tensors["oft_blocks"].shape[-1] // 2
        for p, q, blocks in self._groups(rotation, strength, y):
            grouped = _group_channels(out, p, q, half)
            grouped = torch.einsum("...bj,bji->...bi", grouped, blocks)
            out = _ungroup_channels(grouped, p, q, half)
        return out

    def factored_costs(self, out, inp):
        """Per stage group: its block size in multiply-adds per element, plus its memory passes
        (gather, einsum, ungather on activations; on the weight a row gather and the product
        into a reused buffer, measured cheaper than one pass each)."""
        stages, _, size, _ = self.tensors["oft_blocks"].shape
        blocks = [size // 2 * 2 ** (q - p) for p, q in _group_bounds(stages, size // 2)]
        return ((sum(blocks) + PASS_COST * 3 * len(blocks)) * out,
                (sum(blocks) + PASS_COST * len(blocks)) * out * inp)

    def _composed_groups(self, rotation):
        """[(p, q, blocks (n, C, C) transposed for `...bj,bji`)]: consecutive stages grouped while
        a block stays within COMPOSED_BLOCK channels; each group's blocks read off by running its
        stages on one basis vector per block position (blocks never interact within a group)."""
        stages, _, size, _ = rotation.shape
        half, channels = size // 2, rotation.shape[1] * size
        bounds = _group_bounds(stages, half)
        rescale = self.t("rescale")
        groups = []
        for p, q in bounds:
            chunk = half * 2 ** (q - p)
            c = torch.arange(channels, device=rotation.device)
            position = c % half + half * ((c // half >> p) % 2 ** (q - p))  # j of each channel in its block
            basis = (position[None, :] == torch.arange(chunk, device=rotation.device)[:, None]).to(rotation.dtype)
            out = _butterfly_last(basis, rotation[p:q], p)  # (j, channel): column j of every block
            if q == stages and rescale is not None:
                out = out * rescale.to(out.dtype).reshape(1, -1)
            blocks = _group_channels(out, p, q, half)  # (j, n, i)
            groups.append((p, q, blocks.permute(1, 0, 2).contiguous()))  # (n, j, i)
        return groups


def _group_bounds(stages, half):
    """[(p, q), ...]: consecutive stages p..q-1 grouped while a block stays within COMPOSED_BLOCK
    channels (half * 2^(q - p))."""
    bounds, p = [], 0
    while p < stages:
        q = p + 1
        while q < stages and half * 2 ** (q + 1 - p) <= COMPOSED_BLOCK:
            q += 1
        bounds.append((p, q))
        p = q
    return bounds


def _group_channels(y, p, q, half):
    """The last dim of `y` as (blocks, channels in block) for butterfly stages p..q-1: a channel
    c = u + half * (bits), u < half, belongs to the block of its bits outside p..q-1, at position
    u + half * (its bits p..q-1)."""
    channels = y.shape[-1]
    inner, outer = 2 ** (q - p), channels // (half * 2 ** q)
    view = y.reshape(*y.shape[:-1], outer, inner, 2 ** p, half).transpose(-3, -2)
    return view.reshape(*y.shape[:-1], outer * 2 ** p, inner * half)


def _ungroup_channels(grouped, p, q, half):
    """The inverse of `_group_channels`."""
    lead = grouped.shape[:-2]
    channels = grouped.shape[-1] * grouped.shape[-2]
    inner, outer = 2 ** (q - p), channels // (half * 2 ** q)
    view = grouped.reshape(*lead, outer, 2 ** p, inner, half).transpose(-3, -2)
    return view.reshape(*lead, channels)


def _row_orders(channels, bounds, half, device):
    """For `patch`: the row gathers [before group 0, ..., before the last group, after it]
    (None where the order does not change). Group k's order lists, per position, the natural
    channel `_group_channels` puts there; the gather into it reads each channel where the
    previous order left it. Worked out on the CPU (index arithmetic, compared on the host) and
    moved to `device` once."""
    natural = torch.arange(channels)
    orders = [_group_channels(natural, p, q, half).reshape(-1) for p, q in bounds] + [natural]
    gathers, where = [], natural  # where[c]: the row holding channel c now
    for order in orders:
        gather = where[order]
        gathers.append(None if torch.equal(gather, natural) else gather.to(device))
        where = torch.argsort(order)
    return gathers


def _butterfly_permutation(n: int, blocks: int, half: int) -> torch.Tensor:
    """PEFT's block butterfly permutation (index form) of n features."""
    indices = torch.arange(n)
    block = n // blocks
    step = block // half
    order = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    sorted_order = torch.cat([torch.arange(int(p) * half, int(p) * half + half) for p in order])
    for start in range(0, n, block):
        indices[start:start + block] = indices[start:start + block][sorted_order]
    return indices


class PeftBOFT(Adapter):
    """PEFT BOFT: `boft_R` (N, n, bs, bs) raw blocks, `boft_s` the output scale ((O, 1) Linear,
    (1, O) conv). N is read from the tensor: PEFT without its CUDA extension trains N = 1 whatever
    the config says."""

    algo = "boft"
    suffixes = ("boft_R", "boft_s")
    additive = False

    @classmethod
    def detect(cls, tensors):
        return "boft_R" in tensors

    def validate(self):
        blocks = self.require("boft_R", (4,))
        factors, groups, size, size2 = blocks.shape
        if size != size2 or factors == 0 or groups == 0:
            raise self.error(f"expected (N, n, bs, bs) blocks, found {list(blocks.shape)}", "boft_R")
        if factors > 1 and (size % 2 or groups % 2 ** (factors - 1)):
            raise self.error(f"{factors} butterfly factors need an even block size and a block count divisible by "
                             f"{2 ** (factors - 1)}, found {list(blocks.shape)}", "boft_R")
        self.require("boft_s")

    @property
    def rank(self):
        """The block size (PEFT's `boft_block_size`)."""
        return int(self.tensors["boft_R"].shape[-1])

    def file_scale(self):
        return 1.0

    def check_weight(self, weight_shape):
        _, groups, size, _ = self.tensors["boft_R"].shape
        columns = math.prod(weight_shape[1:])
        if groups * size != columns:
            raise self.error(f"{groups} blocks of size {size} do not tile the {columns} input features of the "
                             f"model's weight {list(weight_shape)}", "boft_R")
        if self.tensors["boft_s"].numel() != weight_shape[0]:
            raise self.error(f"boft_s has {self.tensors['boft_s'].numel()} entries, the model's weight "
                             f"{list(weight_shape)} has {weight_shape[0]} output channels", "boft_s")

    def factor_rotations(self) -> list:
        """[(block rotations (n, bs, bs), butterfly permutation or None), ...] for i = 0..N-1."""
        blocks = self.t("boft_R")
        factors, groups, size, _ = blocks.shape
        skew = 0.5 * (blocks - blocks.transpose(-1, -2))
        eye = torch.eye(size, dtype=skew.dtype, device=skew.device).expand_as(skew)
        rotations = torch.linalg.solve(eye + skew, eye - skew, left=False)  # (I - S)(I + S)^-1
        out = []
        for i in range(factors):
            perm = None
            if factors > 1:  # PEFT's permutations are the identity with a single factor
                perm = _butterfly_permutation(groups * size, groups // 2 ** i, size // 2).to(blocks.device)
            out.append((rotations[i], perm))
        return out

    def rotate_input(self, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """x M (or x M^T), M = prod_i P_i blockdiag(R_i) P_i^T with later factors on the left,
        one butterfly factor at a time, never the dense I x I matrix:
        x P D P^T gathers x by the inverse permutation, multiplies block-wise, gathers by P.
        The factors' rotations are built once per copy."""
        def build():
            return [(r.to(x.dtype), None if p is None else (torch.argsort(p), p)) for r, p in self.factor_rotations()]

        factors = self.cached("rotation", (x.dtype, x.device), build)
        lead = x.shape[:-1]
        for rotations, perms in (factors if transposed else reversed(factors)):
            if transposed:  # M^T = F_0^T ... F_(N-1)^T, F^T = P D^T P^T
                rotations = rotations.transpose(-1, -2)
            u = x if perms is None else x[..., perms[0]]
            u = torch.einsum("...gi,gij->...gj", u.reshape(*lead, *rotations.shape[:2]), rotations)
            u = u.reshape(*lead, -1)
            x = u if perms is None else u[..., perms[1]]
        return x

    def patch(self, weight, strength=1.0, bias=None, inplace=False):
        self.check_weight(weight.shape)
        w = weight.to(COMPUTE_DTYPE)
        rotated = self.rotate_input(flat(w), transposed=True) * self.t("boft_s").reshape(-1, 1)  # W M^T, s
        rotated = rotated.reshape(w.shape)
        out = rotated if strength == 1 else w + strength * (rotated - w)
        return out, None if bias is None else bias.to(COMPUTE_DTYPE)

    def bypass_is_dense(self, geometry=None):
        return geometry is None or not geometry.linear

    def factored_costs(self, out, inp):
        factors, _, bs, _ = self.tensors["boft_R"].shape
        per_token = factors * (bs + PASS_COST * 5) * inp + PASS_COST * 3 * out  # gathers, blocks; the scale
        return per_token, factors * (bs + PASS_COST * 5) * out * inp

    def bypass_input_side(self, geometry, strength=1.0):
        return geometry.linear and strength == 1

    def bypass_needs_weight(self, geometry=None, *, token=None, input_applied=False, strength=1.0):
        return not (input_applied and geometry is not None and geometry.linear)

    def bypass_input(self, x, weight, geometry, strength=1.0, *, token=None):
        self.check_weight((self.tensors["boft_s"].numel(), x.shape[-1]))
        return self.rotate_input(x)

    def bypass(self, x, y, weight, bias, geometry, strength=1.0, *, token=None, input_applied=False):
        """Linear: PEFT's forward, s * f(x M) (bias outside the scale); at m = 1 with `input_applied`
        only the output scale is left, otherwise the layer is re-run on the rotated input and the
        result interpolated with y as the merge is (two base forwards). Convs: the patched weight."""
        if not geometry.linear:
            return super().bypass(x, y, weight, bias, geometry, strength)
        s = self.t("boft_s").reshape(-1).to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        if input_applied:
            out = y if b is None else y.sub_(b)
            out = out.mul_(s)
            return out if b is None else out.add_(b)
        if weight is None:
            raise self.error("boft in bypass mode needs the layer's weight (it rotates the input)")
        self.check_weight(weight.shape)
        rotated = F.linear(self.rotate_input(x), weight.to(x.dtype)) * s
        if b is not None:
            rotated = rotated + b
        return rotated if strength == 1 else y + strength * (rotated - y)
