"""A bypass plan's state on one compute device: the adapters moved there once, and what each model
call changes (strengths, T-LoRA's timestep) held in fixed tensors written in place before the call.

A strength or schedule change is then new data, never new code: a compiled graph reads the same
tensors (no guard on a Python number, no recompile) and a captured CUDA graph replays with the new
values. The host keeps the numbers too, for what only eager code may branch on (skipping an
adapter at strength 0, the patched-weight form).
"""

from __future__ import annotations

import math

import torch

from ..lycoris_core.algos.base import COMPUTE_DTYPE, flat

_PLAIN_LORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha", "scalar"}


def _plain_lora(adapter, geometry) -> bool:
    """A LoRA/LoCon whose bypass is up(down(x)) and nothing else (no Tucker mid, bias, DoRA or sparse
    residual), on a layer without groups: it can join the summed-rank product."""
    return adapter.algo == "lora" and set(adapter.tensors) <= _PLAIN_LORA_KEYS and geometry.groups == 1


class LowRankGroup:
    """The plain LoRA entries of one layer as one product of their summed rank:
    y += U (v . D x), D the stacked downs, U the concatenated ups, v each rank's strength (from the
    plan's table, per call) times its file's scale. One pair of small matmuls (or convs) for any
    number of stacked LoRAs."""

    def __init__(self, members, geometry, device):
        shape = tuple(geometry.weight_shape)
        downs, ups, slots, scales = [], [], [], []
        for adapter, slot in members:
            down, up = adapter.t("lora_down.weight"), flat(adapter.t("lora_up.weight"))
            downs.append(flat(down) if geometry.linear else down.reshape((down.shape[0],) + shape[1:]))
            ups.append(up)
            slots += [slot] * down.shape[0]
            scales += [adapter.scale] * down.shape[0]
        # one member: its own tensors (views, no copy); several: one concatenated copy
        down = downs[0] if len(downs) == 1 else torch.cat(downs)
        up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
        if not geometry.linear:
            up = up.reshape(up.shape + (1,) * geometry.conv_dims)
        self.geometry = geometry
        self.down, self.up = down.to(device), up.to(device)
        self.rank_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.rank_scales = torch.tensor(scales, dtype=COMPUTE_DTYPE, device=device)  # each file's alpha / rank
        self.slots = frozenset(slot for _, slot in members)

    def __call__(self, x, table):
        """U (v . D x) in x's dtype; `table` is (slots,) or (chunks, slots): per batch chunk."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        v = (table.index_select(-1, self.rank_slots) * self.rank_scales).to(x.dtype)
        z = self.geometry.apply(x, down)
        if self.geometry.linear:  # ranks on the last dim
            z = z * v if v.dim() == 1 else (z.reshape(v.shape[0], -1, v.shape[1]) * v[:, None]).reshape(z.shape)
        elif v.dim() == 1:  # ranks on dim 1
            z = z * v.reshape((1, -1) + (1,) * (z.dim() - 2))
        else:
            per_chunk = z.reshape((v.shape[0], -1) + tuple(z.shape[1:]))
            z = (per_chunk * v.reshape((v.shape[0], 1, -1) + (1,) * (z.dim() - 2))).reshape(z.shape)
        return self.geometry.apply(z, up, plain=True)


def scaled(h, strength):
    """h times a data strength: a 0-d tensor, or one value per batch chunk (rows chunk-major)."""
    strength = strength.to(h.dtype)
    if strength.dim() == 0:
        return h * strength
    n = strength.shape[0]
    return (h.reshape(n, -1) * strength[:, None]).reshape(h.shape)


class Staged:
    """A plan on one device: its adapters moved there (per layer: ((adapter, strength, offset,
    slot), ...)), the summed-rank groups, the strength table and the timestep."""

    def __init__(self, plan, device):
        self.device = device
        self.layers, self.groups = {}, {}
        self.timestep = torch.full((), math.nan, dtype=torch.float64, device=device)
        for path, entries in plan.layers.items():
            slots = plan.slots[path]
            moved = tuple((adapter.moved(device), strength, offset, slot)
                          for (adapter, strength, offset), slot in zip(entries, slots))
            for adapter, _, _, _ in moved:
                if adapter.algo == "tlora":
                    adapter.clock = self.timestep
            self.layers[path] = moved
            geometry = plan.geometries.get(path)
            if geometry is None:
                continue
            if all(a.strength_linear and offset is None for a, _, offset, _ in moved):
                members = [(a, slot) for a, _, _, slot in moved if _plain_lora(a, geometry)]
                if members:
                    self.groups[path] = LowRankGroup(members, geometry, device)
        self.host = None  # the table's values as numbers: (slots,) or ((slots,) per chunk)
        self.table = None
        self.write(plan.values_at(None, None, None))

    def write(self, values) -> None:
        """Put this call's strengths in the table, in place (a new tensor only when its shape changes)."""
        if values == self.host:
            return
        tensor = torch.tensor(values, dtype=COMPUTE_DTYPE)
        if self.table is None or self.table.shape != tensor.shape:
            self.table = tensor.to(self.device)
        elif self.table.device.type == "cuda":  # from pinned memory, queued on the stream: no host wait
            self.table.copy_(tensor.pin_memory(), non_blocking=True)
        else:
            self.table.copy_(tensor)
        self.host = values
