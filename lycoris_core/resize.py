"""Resize a LoRA / LoCon file to a lower rank (fixed, kept energy, or any `svd.RankRule`).

Why it is done this way (reference/utilities.md 4): plain LoRA layers are re-factored by QR of
the two factors and an SVD of the small r x r core, which is the exact SVD of up @ down without
ever forming the (out, in) matrix; Tucker (`lora_mid`) layers are materialised (their delta is
small: one conv kernel) and re-decomposed by HOSVD, so `lora_mid` is never left at the old rank
next to new factors. The new alpha keeps the layer's scale: alpha' = (alpha / r) * r'. Each
layer reports both the retained Frobenius share and the relative error of the stored result.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch

from .algos.base import flat
from .extract import UtilityResult, _measure, _split
from .keys import join_key
from .reader import AdapterFile, load_adapter_file
from .svd import (
    LayerReport, RankRule, choose_rank, error_summary, parse_dtype, pattern_lookup,
    product_error, qr_core_svd, rank_summary, tucker_for_rule,
)

TOOL = "lycoris_core.resize"
UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def _as_file(adapter_file) -> AdapterFile:
    return adapter_file if isinstance(adapter_file, AdapterFile) else load_adapter_file(adapter_file)


def _kernel_of(adapter) -> tuple:
    down, mid = adapter.tensors[DOWN], adapter.tensors.get(MID)
    if mid is not None:
        return tuple(mid.shape[2:])
    return tuple(down.shape[2:])


def resize(
    adapter_file,
    out_path=None,
    *,
    mode: str = "fixed",
    value: float | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    rank_pattern: dict | None = None,
    dtype=None,
    progress: Callable[[int, int], None] | None = None,
) -> UtilityResult:
    """Lower the rank of every LoRA/LoCon module of `adapter_file` (path or `AdapterFile`).

    - fixed mode: `rank` for Linear / 1x1 modules, `conv_rank` (default `rank`) for k x k convs;
      a module whose rank is already <= the target is copied unchanged.
    - other modes (`value` = threshold / ratio / quantile / energy share, see `svd.RankRule`):
      `rank`/`conv_rank` are caps. The spectrum is that of the module's scaled delta.
    - `rank_pattern` {regex: rank} overrides per module (matched on the module name, where
      "." and "_" both count as boundaries: "to_k" matches "lora_unet_..._attn2_to_k").
    - `dtype`: output dtype (default: the module's stored dtype).
    Modules of other algorithms, and DoRA magnitudes, are copied unchanged and listed in
    `skipped`. Writes `out_path` atomically when given.
    """
    source = _as_file(adapter_file)
    out_dtype = parse_dtype(dtype)
    if mode == "fixed":
        if rank is None:
            raise ValueError("fixed mode needs a rank (--rank)")
        rules = (RankRule("fixed", rank), RankRule("fixed", rank if conv_rank is None else conv_rank))
    else:
        if value is None:
            raise ValueError(f"mode '{mode}' needs a value")
        rules = (RankRule(mode, value, rank), RankRule(mode, value, conv_rank if conv_rank is not None else rank))

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerReport] = []
    skipped: list[tuple[str, str]] = []
    names = list(source.adapters)
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names))
        adapter = source.adapters[name]
        extra = {k: v for k, v in adapter.tensors.items() if k not in (UP, DOWN, MID, "alpha", "scalar")}
        if adapter.algo != "lora" or "bias_indices" in adapter.tensors:
            _copy(tensors, name, adapter.tensors)
            skipped.append((name, f"{adapter.algo}{' with sparse residual' if 'bias_indices' in adapter.tensors else ''}"
                                  " module copied unchanged"))
            continue
        kernel = _kernel_of(adapter)
        is_conv = math.prod(kernel) > 1 if kernel else False
        rule = rules[1] if is_conv else rules[0]
        forced = pattern_lookup(rank_pattern, name, boundary=r"[._]")  # kohya names: "_" separates too
        if forced is not None and int(forced) == 0:
            skipped.append((name, "rank 0 by rank_pattern: module dropped"))
            continue
        if forced is not None:
            rule = RankRule("fixed", int(forced))
        stored = adapter.tensors[DOWN].dtype
        target_dtype = out_dtype or stored
        r = adapter.rank
        if rule.mode == "fixed" and rule.fixed_rank(r, r) >= r and out_dtype in (None, stored):
            _copy(tensors, name, adapter.tensors)
            layers.append(LayerReport(name, name, tuple(adapter.expected_shape() or ()), r, 0.0, 1.0,
                                      _norm(adapter), "unchanged (rank already <= target)", adapter.alpha))
            continue
        if MID in adapter.tensors:
            out, report = _resize_tucker(adapter, rule, target_dtype)
        else:
            out, report = _resize_lora(adapter, rule, target_dtype)
        if out is None:
            skipped.append((name, f"rank 0 under {rule.describe()}: module dropped"))
            continue
        report.name = report.source = name
        for suffix, tensor in out.items():
            tensors[join_key(name, suffix)] = tensor
        for suffix, tensor in extra.items():
            if suffix in ("dora_scale", "lora_magnitude_vector"):
                skipped.append((name, "DoRA magnitude kept as is (the output renormalises the resized delta)"))
            tensors[join_key(name, suffix)] = tensor
        layers.append(report)
    if progress is not None:
        progress(len(names), len(names))
    for key in source.unknown_keys:
        skipped.append((key, "key not understood: left out"))

    meta = dict(source.metadata)
    ranks = rank_summary(layers)
    meta.update({
        "ss_network_dim": str(rank) if mode == "fixed" and rank else "Dynamic",
        "ss_network_alpha": "Dynamic",
        "lycoris_pack.tool": TOOL,
        "lycoris_pack.source": source.name,
        "lycoris_pack.mode": mode,
        "lycoris_pack.value": "" if value is None else f"{value:g}",
        "lycoris_pack.rank": "" if rank is None else str(rank),
        "lycoris_pack.conv_rank": "" if conv_rank is None else str(conv_rank),
        "lycoris_pack.ranks": json.dumps(ranks),
        "lycoris_pack.errors": json.dumps(error_summary(layers)),
        "lycoris_pack.alpha": "alpha' = (alpha / r) * r' (scale kept)",
    })
    meta.pop("sshs_model_hash", None)
    meta.pop("sshs_legacy_hash", None)
    result = UtilityResult(tensors, meta, layers, skipped)
    if out_path is not None:
        result.save(out_path)
    return result


def _copy(tensors, name, parts):
    for suffix, tensor in parts.items():
        tensors[join_key(name, suffix)] = tensor


def _norm(adapter) -> float:
    from .svd import frobenius_of_product

    if MID in adapter.tensors:
        return float(adapter.delta(torch.zeros(adapter.expected_shape())).norm())
    return adapter.scale * frobenius_of_product(flat(adapter.t(UP)), flat(adapter.t(DOWN)))


def _resize_lora(adapter, rule, dtype):
    """QR-core SVD of gamma * up @ down; new up = U sqrt(S) / gamma', down = sqrt(S) Vh."""
    up_t, down_t = adapter.tensors[UP], adapter.tensors[DOWN]
    gamma = adapter.scale
    up, down = flat(adapter.t(UP)) * gamma, flat(adapter.t(DOWN))
    u, s, vh = qr_core_svd(up, down)
    out_ch, cols = up.shape[0], down.shape[1]
    k = choose_rank(s, rule, out_ch, cols)
    total = float(s.double().pow(2).sum())
    if k == 0:
        return None, None
    kept = float(s[:k].double().pow(2).sum()) / total if total > 0 else 1.0
    new_up, new_down = _split(u[:, :k], s[:k], vh[:k])
    alpha = torch.tensor(gamma * k, dtype=torch.float32)  # alpha' / r' = gamma: the scale is kept
    new_up = (new_up / gamma).to(dtype)
    new_down = new_down.to(dtype)
    err, norm = product_error(up, down, new_up.float() * (float(alpha) / k), new_down.float())
    report = LayerReport("", "", (out_ch, cols), k, err / norm if norm > 0 else 0.0, min(kept, 1.0), norm,
                         "qr-core svd", float(alpha))
    out = {
        UP: new_up.reshape((out_ch, k) + tuple(up_t.shape[2:])).contiguous(),
        DOWN: new_down.reshape((k,) + tuple(down_t.shape[1:])).contiguous(),
        "alpha": alpha,
    }
    return out, report


def _resize_tucker(adapter, rule, dtype):
    """Materialise the Tucker delta (out, in, kh, kw) and re-decompose it by HOSVD at rank k."""
    shape = adapter.expected_shape()
    delta = adapter.delta(torch.zeros(shape))
    gamma = adapter.scale
    out_ch, in_ch = shape[:2]
    found = tucker_for_rule(delta, rule, adapter.rank)
    if found is None:
        return None, None
    up, mid, down, kept = found
    k = mid.shape[0]
    alpha = torch.tensor(gamma * k, dtype=torch.float32)
    ones = (1,) * (len(shape) - 2)
    up_c, mid_c, down_c = (up / gamma).to(dtype), mid.to(dtype), down.to(dtype)
    approx = torch.einsum("ab...,oa,bi->oi...", mid_c.float(), up_c.float() * (float(alpha) / k), down_c.float())
    report = LayerReport("", "", tuple(shape), k, _measure(delta, approx), min(kept, 1.0), float(delta.norm()),
                         "tucker (HOSVD of the materialised delta)", float(alpha))
    out = {
        UP: up_c.reshape(out_ch, k, *ones).contiguous(),
        MID: mid_c.contiguous(),
        DOWN: down_c.reshape(k, in_ch, *ones).contiguous(),
        "alpha": alpha,
    }
    return out, report
