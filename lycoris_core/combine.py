"""Combine several adapters, each with a weight, into one file.

Why it is done this way (reference/utilities.md 3):
- exact mode (no target rank): LoRA-family modules are concatenated along the rank axis after
  folding each input's weight * alpha / rank into its up factor, alpha = total rank, so the sum is
  exact for any mix of ranks and alphas (sd-scripts' summed or `--concat` merges are not). Tucker
  inputs keep a block-diagonal `lora_mid` when all inputs of a layer are Tucker, otherwise their
  `lora_mid` is folded into the down factor (exact). Layers that cannot be concatenated (LoHa,
  LoKr, ... met by another input) are materialised into an exact full `diff`.
- SVD mode (target rank or rule): LoRA and (non-Tucker) LoHa layers go through the QR-core SVD of
  the concatenated factors (a LoHa is exactly a rank-r1*r2 product of row-wise Khatri-Rao factors),
  the exact top-k of the sum without forming out x in; a LoKr alone on its layer through the SVDs
  of w1 and w2 (the singular values of a Kronecker product are the products of the factors'); the
  rest is materialised from each algorithm's own delta and re-factorised by a dense SVD.
Deltas of DoRA / GLoRA / OFT / BOFT / IA3 / T-LoRA depend on the base weight: they need `base`
(a state dict or safetensors path), otherwise the module is refused by name.

Plain-LoRA output (`plain=True`, for runtimes that take only `lora_up/lora_down/alpha`, e.g.
Nunchaku's SVDQuant layers): every layer becomes a LoRA/LoCon pair whatever its algorithm, at a
fixed rank or a kept-energy share (default: energy 1.0, i.e. lossless up to the numerical rank).
The SVD runs in fp64 where it is cheap (QR cores, layers up to 2**20 entries), the factors are
balanced (up = U sqrt(S), down = sqrt(S) Vh, alpha = rank, so no loader rescales and neither factor
underflows or overflows in fp16), conv deltas keep their (out, in, kh, kw) unfolding, and every
layer's relative error is measured on the factors as written (after rounding to the output dtype).
What a LoRA pair cannot hold is refused by name unless `drop_unrepresentable`: 1-D changes (Norm,
`diff` of a norm weight), bias changes, parameter deltas (`diff_m`), and weight-dependent
algorithms when no base is given.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch

from .algos.base import flat
from .extract import TensorSource, UtilityResult, _measure, _split
from .keys import join_key
from .matching import match_generic
from .reader import AdapterFile, load_adapter_file
from .svd import (
    LayerReport, RankRule, choose_rank, error_summary, parse_dtype, product_error, qr_core_svd, rank_summary,
    svd_full, truncate,
)

TOOL = "lycoris_core.combine"
UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def _plain_lora(adapter) -> bool:
    """A LoRA/LoCon whose delta is exactly gamma * up (x mid) x down (nothing else attached)."""
    return adapter.algo == "lora" and not adapter.has_dora and not any(
        k in adapter.tensors for k in ("bias_indices", "lora_up.bias", "diff_b"))


def _base_free(adapter) -> bool:
    """Additive, and the delta does not read the base weight."""
    return adapter.additive and not adapter.delta_uses_weight and not adapter.has_dora


def _product_loha(adapter) -> bool:
    """A LoHa whose delta is exactly the rank-r1*r2 product `LoHa.product_factors` (not Tucker)."""
    return (adapter.algo == "loha" and not adapter.tucker and not adapter.has_dora
            and not adapter.changes_bias() and "bias_indices" not in adapter.tensors)


def _factors(adapter, weight: float):
    """(up (O, r) with weight * gamma folded in, down (r, I*k...) flat, kernel) of a plain LoRA;
    a Tucker `lora_mid` is folded into down: down'[a, i, ...] = sum_b mid[a, b, ...] down[b, i].
    A non-Tucker LoHa gives its exact rank-r1*r2 factors (row-wise Khatri-Rao products); its
    flat factors do not say a conv's kernel size (kernel ())."""
    if adapter.algo == "loha":
        up, down = adapter.product_factors(torch.float32)
        return up * weight, down, ()
    up = flat(adapter.t(UP)) * (weight * adapter.scale)
    down = adapter.t(DOWN)
    mid = adapter.t(MID)
    if mid is not None:
        kernel = tuple(mid.shape[2:])
        down = torch.einsum("ab...,bi->ai...", mid, flat(down))
    else:
        kernel = tuple(down.shape[2:])
    return up, flat(down), kernel


def combine(
    inputs,
    out_path=None,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    mode: str = "fixed",
    value: float | None = None,
    base=None,
    dtype=None,
    plain: bool = False,
    drop_unrepresentable: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> UtilityResult:
    """Combine `inputs` [(path or AdapterFile, weight), ...] into one adapter.

    - `rank` None and `mode` "fixed": exact combination (see module docstring).
    - `rank` given (fixed mode) or `mode` threshold / ratio / quantile / energy with `value`:
      every layer re-factorised to a LoRA/LoCon by SVD (`rank`/`conv_rank` cap dynamic modes).
    - `base`: state dict or .safetensors path; needed for weight-dependent algorithms, and used
      (when given) to group modules of different files that name the same layer differently.
    - `dtype`: output dtype (default: the first input's factor dtype).
    - `plain`: write only `lora_up/lora_down/alpha` (see module docstring); with no `rank` and
      mode "fixed" the rule is energy 1.0 (lossless). `drop_unrepresentable` leaves out (and
      reports) what a LoRA pair cannot hold instead of refusing the whole job.
    """
    files = [(f if isinstance(f, AdapterFile) else load_adapter_file(f), float(w)) for f, w in inputs]
    if not files:
        raise ValueError("combine needs at least one input")
    if plain and rank is None and mode == "fixed":
        mode, value = "energy", 1.0
    svd_mode = plain or rank is not None or mode != "fixed"
    rules = None
    if svd_mode:
        if mode == "fixed":
            rules = (RankRule("fixed", rank), RankRule("fixed", rank if conv_rank is None else conv_rank))
        else:
            if value is None:
                raise ValueError(f"mode '{mode}' needs a value")
            rules = (RankRule(mode, value, rank), RankRule(mode, value, conv_rank if conv_rank is not None else rank))
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        # the first input's factor dtype: its largest floating tensor (alpha is often fp32 beside fp16 factors)
        first = next(iter(files[0][0].adapters.values()))
        floats = [t for t in first.tensors.values() if t.is_floating_point()]
        out_dtype = max(floats, key=lambda t: t.numel()).dtype if floats else torch.float32

    base_src = TensorSource(base, "base") if base is not None else None
    try:
        groups: dict[str, list] = {}
        skipped: list[tuple[str, str]] = []
        for adapter_file, weight in files:
            targets = match_generic(adapter_file, base_src.keys()).matched if base_src is not None else {}
            for name, adapter in adapter_file.adapters.items():
                key = targets.get(name, name)
                groups.setdefault(key, []).append((adapter, weight, adapter_file.name, name in targets))
            for key in adapter_file.unknown_keys:
                skipped.append((f"{adapter_file.name}: {key}", "key not understood: left out"))
            for problem in adapter_file.problems:
                skipped.append((adapter_file.name, problem))

        if plain:
            groups = _plain_representable(groups, drop_unrepresentable, skipped, base_src is not None)

        tensors: dict[str, torch.Tensor] = {}
        layers: list[LayerReport] = []
        items = list(groups.items())
        for index, (key, members) in enumerate(items):
            if progress is not None:
                progress(index, len(items))
            name = members[0][0].name
            weight_tensor = bias_tensor = None
            if base_src is not None and members[0][3]:
                weight_tensor = base_src.tensor(key)
                bias_key = key[: -len("weight")] + "bias"
                bias_tensor = base_src.tensor(bias_key) if bias_key in base_src else None
            if all(_plain_lora(a) or (svd_mode and _product_loha(a)) for a, *_ in members):
                # SVD of factors, never of the (out, in) delta: LoRA ranks and LoHa's r1*r2 products
                kernel = tuple(weight_tensor.shape[2:]) if weight_tensor is not None else None
                out, report = _combine_lora(members, rules, out_dtype, plain, kernel)
            elif not svd_mode and len(members) == 1 and _foldable(members[0][0], members[0][1]):
                out, report = _fold_single(members[0][0], members[0][1], out_dtype)
            else:
                d, db = _materialise(members, weight_tensor, bias_tensor)
                if svd_mode and d.dim() >= 2:
                    kron = _kronecker_factors(members, d)
                    out, report = _refactor_dense(d, rules, out_dtype, plain, kron)
                    if db is not None and not plain and float(db.abs().max()) > 0:  # plain: listed already
                        skipped.append((name, "bias change dropped: a LoRA module cannot carry it"))
                else:  # exact mode, or a 1-D change (norm weight) no LoRA pair holds: kept whole, it is small
                    out = {"diff": d.to(out_dtype)}
                    if db is not None:
                        out["diff_b"] = db.to(out_dtype)
                    report = LayerReport("", "", tuple(d.shape), None, _measure(d, out["diff"].float()), None,
                                         float(d.norm()), "materialised full diff" if not svd_mode
                                         else "1-D change kept whole (diff)")
            if out is None:
                skipped.append((name, "rank 0 under the rule: module dropped"))
                continue
            report.name, report.source = name, ", ".join(m[2] for m in members)
            for suffix, tensor in out.items():
                tensors[join_key(name, suffix)] = tensor
            layers.append(report)
        if progress is not None:
            progress(len(items), len(items))
    finally:
        if base_src is not None:
            base_src.close()

    only_lora = all(k.endswith((UP, DOWN, MID, ".alpha")) for k in tensors)
    if plain and not all(k.endswith((UP, DOWN, ".alpha")) for k in tensors):
        raise AssertionError("plain LoRA output holds other keys")  # a bug, never the input's fault
    # kohya's ss_network_dim is the Linear rank (convs in ss_network_args); plain output may cut a
    # layer below it (numerically zero components), then the file says "Dynamic"
    one_rank = svd_mode and mode == "fixed" and (
        not plain or {l.rank for l in layers} <= {rank, rank if conv_rank is None else conv_rank})
    meta = {
        "ss_network_module": "networks.lora" if only_lora else "lycoris.kohya",
        "ss_network_dim": str(rank) if one_rank else "Dynamic",
        "ss_network_alpha": str(rank) if one_rank else "Dynamic",
        "lycoris_pack.tool": TOOL,
        "lycoris_pack.inputs": json.dumps([[os.path.basename(f.path), w] for f, w in files]),
        "lycoris_pack.method": "svd" if svd_mode else "exact concatenation",
        "lycoris_pack.output": "plain lora" if plain else "lycoris",
        "lycoris_pack.dtype": str(out_dtype).replace("torch.", ""),
        "lycoris_pack.mode": mode,
        "lycoris_pack.value": "" if value is None else f"{value:g}",
        "lycoris_pack.rank": "" if rank is None else str(rank),
        "lycoris_pack.ranks": json.dumps(rank_summary(layers)),
        "lycoris_pack.errors": json.dumps(error_summary(layers)),
    }
    if svd_mode and mode == "fixed" and conv_rank is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    result = UtilityResult(tensors, meta, layers, skipped)
    if out_path is not None:
        result.save(out_path)
    return result


def _plain_obstacle(adapter, matched: bool, have_base: bool) -> tuple[str, bool] | None:
    """Why a LoRA pair cannot hold this module's change: (reason, whether the weight part can still
    be converted with the rest dropped); None when it can hold all of it."""
    if "diff_m" in adapter.tensors:
        return "a parameter delta (diff_m) on a parameter that is no layer's weight", False
    shape = adapter.expected_shape()
    if adapter.algo == "norm" or (shape is not None and len(shape) < 2) or (
            adapter.algo == "full" and "diff" not in adapter.tensors):
        return f"{adapter.algo}: a 1-D change (norm weight or bias) is not a matrix a LoRA pair can factor", False
    if not _base_free(adapter) and not matched:
        what = f"{adapter.algo}{' with DoRA' if adapter.has_dora else ''}: its change depends on the base weight; "
        return what + ("no layer of the base model matches this module" if have_base
                       else "pass the base model to convert it for that base"), False
    if "bias_indices" in adapter.tensors:
        return f"{adapter.algo}: its sparse residual (bias_indices) is no low-rank pair", True
    if adapter.changes_bias():
        return f"{adapter.algo}: it also changes the layer's bias, which a LoRA pair cannot carry", True
    return None


def _plain_representable(groups: dict, drop: bool, skipped: list, have_base: bool) -> dict:
    """The groups a plain LoRA file can hold; what it cannot is refused by name (one error listing
    every module) or, with `drop`, left out and listed in `skipped`."""
    kept, problems = {}, []
    for key, members in groups.items():
        keep = []
        for member in members:
            adapter, _, source, matched = member
            obstacle = _plain_obstacle(adapter, matched, have_base)
            if obstacle is None:
                keep.append(member)
                continue
            reason, partial = obstacle
            problems.append(f"{source}: {adapter.name} ({reason})")
            if drop:
                skipped.append((f"{source}: {adapter.name}", ("weight change converted, the rest dropped: "
                                                             if partial else "left out: ") + reason))
                if partial:
                    keep.append(member)
        if keep:
            kept[key] = keep
    if problems and not drop:
        shown = "; ".join(problems[:8]) + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"plain LoRA output cannot hold {len(problems)} module(s): {shown}. Leave them out with "
                         "drop_unrepresentable (--drop-unrepresentable), or keep the LyCORIS output")
    return kept


def _effective_rank(s: torch.Tensor, k: int, rows: int, cols: int) -> int:
    """`k` without the numerically zero singular values: below sigma_1 * max(rows, cols) * fp32 eps
    (numpy's matrix_rank rule at the precision the deltas are formed in), so a lossless rule does
    not keep fp32 rounding noise as extra rank."""
    if k == 0 or s.numel() == 0:
        return k
    tolerance = float(s[0]) * max(rows, cols) * torch.finfo(torch.float32).eps
    return min(k, int((s > tolerance).sum()))


def _combine_lora(members, rules, dtype, plain=False, kernel=None):
    """`kernel`: the layer's kernel size where the base model tells it (else read from the factors)."""
    parts = [_factors(a, w) for a, w, *_ in members]
    rows = {p[0].shape[0] for p in parts}
    cols = {p[1].shape[1] for p in parts}
    if len(rows) > 1 or len(cols) > 1:
        shapes = ", ".join(f"{m[2]}: {list(m[0].expected_shape() or ())}" for m in members)
        raise members[0][0].error(f"the inputs disagree on this layer's shape ({shapes}); cannot combine")
    if kernel is None:
        kernel = next((p[2] for p in parts if p[2]), ())
    conv_dims = len(kernel)
    ones = (1,) * conv_dims
    out_ch = parts[0][0].shape[0]
    all_tucker = all(MID in a.tensors for a, *_ in members) and conv_dims > 0
    if rules is None and all_tucker:
        # block-diagonal lora_mid: Tucker structure (and size) kept
        ups, downs, mids = [], [], []
        for adapter, weight, *_ in members:
            ups.append(flat(adapter.t(UP)) * (weight * adapter.scale))
            downs.append(flat(adapter.t(DOWN)))
            mids.append(adapter.t(MID))
        total = sum(u.shape[1] for u in ups)
        mid = torch.zeros((total, total) + kernel)
        offset = 0
        for m in mids:
            r = m.shape[0]
            mid[offset:offset + r, offset:offset + r] = m
            offset += r
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        out = {UP: up.to(dtype).reshape(out_ch, total, *ones).contiguous(), MID: mid.to(dtype),
               DOWN: down.to(dtype).reshape(total, -1, *ones).contiguous(),
               "alpha": torch.tensor(float(total))}
        target = torch.einsum("ab...,oa,bi->oi...", mid, up, down)
        approx = torch.einsum("ab...,oa,bi->oi...", out[MID].float(), flat(out[UP].float()), flat(out[DOWN].float()))
        return out, LayerReport("", "", tuple(target.shape), total, _measure(target, approx), None,
                                float(target.norm()), "exact concatenation (block-diagonal lora_mid)")
    up = torch.cat([p[0] for p in parts], 1)
    down = torch.cat([p[1] for p in parts], 0)
    in_shape = (-1,) + kernel if conv_dims else (-1,)
    if rules is None:
        total = up.shape[1]
        up_c, down_c = up.to(dtype), down.to(dtype)
        err, norm = product_error(up, down, up_c.float(), down_c.float())
        out = {UP: up_c.reshape(out_ch, total, *ones).contiguous(),
               DOWN: down_c.reshape(total, *in_shape).contiguous(), "alpha": torch.tensor(float(total))}
        return out, LayerReport("", "", (out_ch, down.shape[1]), total, err / norm if norm > 0 else 0.0, None, norm,
                                "exact concatenation")
    rule = rules[1] if kernel and math.prod(kernel) > 1 else rules[0]
    if plain:  # fp64 QR cores cost O((m + n) R^2): exact rank and spectrum for the lossless rule
        u, s, vh = qr_core_svd(up.double(), down.double())
    else:
        u, s, vh = qr_core_svd(up, down)
    k = choose_rank(s, rule, up.shape[0], down.shape[1])
    if plain:
        k = _effective_rank(s, k, up.shape[0], down.shape[1])
    if k == 0:
        return None, None
    total2 = float(s.double().pow(2).sum())
    kept = float(s[:k].double().pow(2).sum()) / total2 if total2 > 0 else 1.0
    new_up, new_down = (t.float() for t in _split(u[:, :k], s[:k], vh[:k]))
    up_c, down_c = new_up.to(dtype), new_down.to(dtype)
    err, norm = product_error(up, down, up_c.float(), down_c.float())
    out = {UP: up_c.reshape(out_ch, k, *ones).contiguous(), DOWN: down_c.reshape(k, *in_shape).contiguous(),
           "alpha": torch.tensor(float(k))}
    return out, LayerReport("", "", (out_ch, down.shape[1]), k, err / norm if norm > 0 else 0.0, min(kept, 1.0),
                            norm, "qr-core svd of the concatenated factors")


_FOLD_KEYS = {"loha": ("hada_w1_a",), "full": ("diff", "diff_b", "diff_m"), "norm": ("w_norm", "b_norm")}


def _foldable(adapter, weight) -> bool:
    if adapter.has_dora:
        return weight == 1.0 and adapter.context.convention == "lycoris"
    if adapter.algo in ("loha", "lokr", "full", "norm"):
        return True
    # copied as stored: only where nothing outside the module's tensors sets its scale
    return (weight == 1.0 and adapter.context.convention == "lycoris"
            and not (adapter.algo == "glora" and adapter.context.bool_arg("rs_lora")))


def _fold_single(adapter, weight, dtype):
    """One input for this layer: its own tensors, with weight * gamma folded into one factor and
    alpha set so the new file's gamma is 1 (LoHa / LoKr / Full / Norm); other algorithms at
    weight 1 are copied as stored."""
    tensors = dict(adapter.tensors)
    if adapter.algo in ("loha", "lokr"):
        factor = weight * adapter.scale
        key = "hada_w1_a" if adapter.algo == "loha" else ("lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a")
        tensors[key] = (adapter.t(key) * factor).to(dtype)
        if adapter.rank:
            tensors["alpha"] = torch.tensor(float(adapter.rank))
        else:
            tensors.pop("alpha", None)
        tensors.pop("scalar", None)
    elif adapter.algo in ("full", "norm"):
        for key in _FOLD_KEYS[adapter.algo]:
            if key in tensors:
                tensors[key] = (adapter.t(key) * weight).to(dtype)
    shape = adapter.expected_shape()
    return tensors, LayerReport("", "", tuple(shape or ()), adapter.rank, 0.0, None, 0.0,
                                f"{adapter.algo} kept (weight folded)" if weight != 1.0 else f"{adapter.algo} copied")


def _materialise(members, weight, bias):
    """sum_i w_i * delta_i (and the bias change) in fp32, each from its algorithm's own rule."""
    d = db = None
    for adapter, w, source, matched in members:
        shape = tuple(weight.shape) if weight is not None else adapter.expected_shape()
        if _base_free(adapter):
            if shape is None:
                raise adapter.error("the layer's shape is unknown from the factors; pass the base model")
            delta = adapter.delta(torch.zeros(shape)) * w
            bias_delta = adapter.bias_delta(torch.zeros(shape[0])) if adapter.changes_bias() else None
            bias_delta = None if bias_delta is None else bias_delta * w
        else:
            if weight is None:
                raise adapter.error(
                    f"{adapter.algo}{' with DoRA' if adapter.has_dora else ''} changes the layer by a rule that "
                    "depends on the base weight: combining it needs the base model (--base)")
            w0 = weight.float()
            b0 = None if bias is None else bias.float()
            w_new, b_new = adapter.patch(w0, w, b0)
            delta = w_new - w0
            bias_delta = None if b0 is None or b_new is None else b_new - b0
        delta = delta.reshape(shape)
        d = delta if d is None else d + delta.reshape(d.shape)
        if bias_delta is not None:
            db = bias_delta if db is None else db + bias_delta
    return d, db


FP64_SVD_LIMIT = 1 << 20  # plain output: layers up to this many entries get their SVD in fp64


def _kronecker_factors(members, d):
    """(w1, w2 unfolded) with weight * gamma folded into w1 when the layer is one LoKr alone, so its
    delta's (out, in*kh*kw) unfolding is exactly kron(w1, w2.reshape(b, -1)); None otherwise. Checked
    against the materialised delta `d`, so a layout this does not know falls back to the dense SVD."""
    if len(members) != 1:
        return None
    adapter, weight = members[0][0], members[0][1]
    if adapter.algo != "lokr" or adapter.has_dora or not _base_free(adapter) or adapter.peft_flat_kron():
        return None
    w1 = adapter.w1() * (adapter.scale * weight)
    w2 = adapter.w2(tuple(d.shape[2:]))
    w2 = w2.reshape(w2.shape[0], -1)
    mat = d.reshape(d.shape[0], -1)
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != tuple(mat.shape):
        return None
    norm = float(mat.norm())
    if norm == 0 or float((torch.kron(w1, w2) - mat).norm()) > 1e-5 * norm:
        return None
    return w1, w2


def _kronecker_truncate(w1, w2, rule, rows, cols):
    """Top singular triplets of kron(w1, w2) from the SVDs of the factors (fp64): the singular values
    are all products sa_i * sb_j, the vectors the Kronecker products of the factors' vectors. Exact,
    and O(a^3 + b^3) instead of an SVD of the whole (out, in) delta: a Flux-size LoKr layer in
    milliseconds at any rank or energy."""
    ua, sa, vha = svd_full(w1.double())
    ub, sb, vhb = svd_full(w2.double())
    products = torch.outer(sa, sb).reshape(-1)
    s, order = torch.sort(products, descending=True)
    k = choose_rank(s, rule, rows, cols)
    total = float(s.pow(2).sum())
    kept = float(s[:k].pow(2).sum()) / total if total > 0 else 1.0
    i, j = order[:k] // sb.numel(), order[:k] % sb.numel()
    u = (ua[:, i][:, None, :] * ub[:, j][None, :, :]).reshape(rows, k)
    vh = (vha[i][:, :, None] * vhb[j][:, None, :]).reshape(k, cols)
    return u, s[:k], vh, min(kept, 1.0)


def _refactor_dense(d, rules, dtype, plain=False, kron=None):
    is_conv = d.dim() > 2 and math.prod(d.shape[2:]) > 1
    rule = rules[1] if is_conv else rules[0]
    out_ch = d.shape[0]
    mat = d.reshape(out_ch, -1)
    work = mat.double() if plain and mat.numel() <= FP64_SVD_LIMIT else mat
    if kron is not None:
        u, s, vh, kept = _kronecker_truncate(*kron, rule, *mat.shape)
        method = "exact svd of the kronecker product"
    else:
        # plain output: 7 power iterations keep a flat spectrum's randomized error within ~0.05 % of
        # the optimum (2 iterations: up to 0.7 %, measured on 768-3072 wide LoHa deltas)
        u, s, vh, kept = truncate(work, rule, niter=7 if plain else 2)
        method = "dense svd of the materialised sum"
    k = _effective_rank(s, s.numel(), *mat.shape) if plain else s.numel()
    if k == 0:
        return None, None
    if k < s.numel():
        kept *= float(s[:k].double().pow(2).sum() / s.double().pow(2).sum())
        u, s, vh = u[:, :k], s[:k], vh[:k]
    up, down = (t.float() for t in _split(u, s, vh))
    up_c, down_c = up.to(dtype), down.to(dtype)
    err = _measure(mat, up_c.float() @ down_c.float())
    ones = (1,) * (d.dim() - 2)
    out = {UP: up_c.reshape(out_ch, k, *ones).contiguous(), DOWN: down_c.reshape(k, *d.shape[1:]).contiguous(),
           "alpha": torch.tensor(float(k))}
    return out, LayerReport("", "", tuple(d.shape), k, err, kept, float(d.norm()), method)
