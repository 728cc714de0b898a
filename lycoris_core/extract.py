"""Extract a LoRA / LoCon (or LoKr) from a (base, fine-tuned) pair of state dicts.

Why it is done this way (reference/utilities.md 1, 7):
- inputs are read one layer at a time (safetensors paths go through `SafetensorsReader`), both
  tensors are cast to fp32 *before* subtracting, and the factors are cast once at the end;
- fixed ranks use a randomized SVD (exact projection, q = 2r oversampling), rank rules that read
  the spectrum use the full reduced SVD (`svd.RankRule` documents every rule, no silent +1);
- k x k convs use the LoCon reshape by default; `tucker=True` writes a `lora_mid` computed by a
  proper HOSVD of the full delta, not LyCORIS's lossy second SVD of the down factor;
- no factor clamping; every layer's relative error is measured on the tensors as written;
- unchanged layers are skipped and every skipped tensor is listed with its reason.

Output uses the kohya dialect (`lora_unet_…`, `lora_te1_…`) whenever the key layout allows, so
ComfyUI, sd-webui, kohya and this pack load it; `alpha = rank` (scale 1).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .svd import (
    LayerReport, RankRule, error_summary, parse_dtype, pattern_lookup,
    rank_summary, svd_topk, truncate, tucker_for_rule,
)

TOOL = "lycoris_core.extract"

# (state-dict prefix, kohya module prefix), first match wins
KOHYA_PREFIXES = (
    ("model.diffusion_model.", "lora_unet_"),
    ("diffusion_model.", "lora_unet_"),
    ("conditioner.embedders.0.transformer.", "lora_te1_"),
    ("conditioner.embedders.1.model.", "lora_te2_"),
    ("conditioner.embedders.1.transformer.", "lora_te2_"),
    ("cond_stage_model.transformer.", "lora_te_"),
    ("cond_stage_model.model.", "lora_te_"),
    ("clip_l.transformer.", "lora_te1_"),
    ("clip_g.transformer.", "lora_te2_"),
    ("text_encoders.clip_l.transformer.", "lora_te1_"),
    ("text_encoders.clip_g.transformer.", "lora_te2_"),
)


# open_clip text encoders inside checkpoints (SD2's, SDXL's second) -> the HF layout kohya names use
OPEN_CLIP_PREFIXES = ("conditioner.embedders.1.model.", "cond_stage_model.model.")
_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.out_proj|attn\.in_proj|mlp\.c_fc|mlp\.c_proj)$")
_HF_NAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def layer_parts(key: str, shape) -> list[tuple[str, slice | None]]:
    """The layers one weight key holds, as (module path, row slice): open_clip's fused
    `attn.in_proj_weight` is three (q, k, v), and open_clip paths are renamed to the HF
    `text_model.encoder.layers.N...` layout, because that is what loaders map for these
    encoders. Every other key is one layer, its path being the key without `.weight`."""
    for prefix in OPEN_CLIP_PREFIXES:
        if key.startswith(prefix):
            path = key[len(prefix):]
            path = path[: -len("_weight")] if path.endswith("in_proj_weight") else path[: -len(".weight")]
            m = _OPEN_CLIP_LAYER.match(path)
            if m is None:
                break  # embeddings, norms, text_projection: their own names
            layer = f"{prefix}text_model.encoder.layers.{m.group(1)}."
            if m.group(2) == "attn.in_proj":
                d = shape[0] // 3
                return [(layer + f"self_attn.{p}_proj", slice(i * d, (i + 1) * d)) for i, p in enumerate("qkv")]
            return [(layer + _HF_NAMES[m.group(2)], None)]
    return [(key[: -len(".weight")] if key.endswith(".weight") else key, None)]


def kohya_module_name(weight_key: str) -> str:
    """Kohya module name for a state-dict weight key: known prefix replaced by `lora_unet_` /
    `lora_te1_` / `lora_te2_` / `lora_te_`, any other path gets `lora_unet_`; dots become '_'."""
    path = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
    for prefix, kohya in KOHYA_PREFIXES:
        if path.startswith(prefix):
            return kohya + path[len(prefix):].replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


class TensorSource:
    """A state dict given as a dict of tensors or a safetensors path (read lazily, one tensor
    at a time)."""

    def __init__(self, source, label: str):
        self.label = label
        self._reader = None
        if isinstance(source, (str, os.PathLike)):
            from .safe_io import SafetensorsReader

            self._reader = SafetensorsReader(source)
            self.path = str(source)
            self._keys = self._reader.keys()
            self.metadata = dict(self._reader.metadata)
        elif isinstance(source, dict):
            self.path = f"<{label}>"
            self._dict = source
            self._keys = list(source.keys())
            self.metadata = {}
        else:
            raise ValueError(f"{label}: expected a dict of tensors or a .safetensors path, got {type(source).__name__}")
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key) -> bool:
        return key in self._key_set

    def shape(self, key) -> tuple:
        return tuple(self._reader.shape(key)) if self._reader else tuple(self._dict[key].shape)

    def dtype(self, key) -> torch.dtype:
        return self._reader.dtype(key) if self._reader else self._dict[key].dtype

    def tensor(self, key) -> torch.Tensor:
        return self._reader.tensor(key) if self._reader else self._dict[key]

    def close(self):
        if self._reader is not None:
            self._reader.close()


@dataclass
class UtilityResult:
    """What extract / resize / combine / slice produced: the tensors and metadata to write, one
    report per written module and one (key, reason) per input left out."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: str | None = None

    def save(self, path) -> None:
        from .safe_io import save_tensors_atomic

        if not self.tensors:
            raise ValueError("nothing to write: no layer produced a module")
        save_tensors_atomic(path, self.tensors, self.metadata)
        self.path = str(path)

    def summary(self) -> dict:
        return error_summary(self.layers)

    def report_lines(self, limit: int = 10) -> list[str]:
        s = self.summary()
        lines = [f"{len(self.layers)} modules written, {len(self.skipped)} inputs skipped"]
        if self.layers:
            ranks = rank_summary(self.layers)
            if ranks:
                lines.append(f"rank min {ranks['min']} / mean {ranks['mean']} / max {ranks['max']}")
            lines.append(
                f"relative error: mean {s['mean_rel_error']:.3e}, max {s['max_rel_error']:.3e}, "
                f"norm-weighted {s['weighted_rel_error']:.3e}")
            for layer in sorted(self.layers, key=lambda l: -l.rel_error)[:limit]:
                lines.append("  " + layer.line())
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {count}: {reason}")
        return lines


def _measure(target: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(target.norm())
    return float((target - approx).norm()) / norm if norm > 0 else 0.0


def _split(u, s, vh):
    """Balanced factors: up = U sqrt(S), down = sqrt(S) Vh (keeps both in a half-precision range)."""
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's LoKr split of `dimension` into (p, q), p <= q, p * q = dimension: `factor` itself
    when it divides, else the divisor pair nearest the square root with p <= factor
    (factor -1: unlimited)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor <= 0 else factor
    best = 1
    for p in range(1, math.isqrt(dimension) + 1):
        if dimension % p == 0 and p <= limit:
            best = p
    return best, dimension // best


def nearest_kronecker(delta: torch.Tensor, factor: int = -1):
    """Nearest Kronecker product w1 (x) W2 to `delta` (Van Loan-Pitsianis): rearrange so that each
    row holds one (a, c) block position and each column one entry of the (b, d, *k) block, take
    the top singular pair. Returns (w1 (a, c), W2 (b, d, *k))."""
    out_ch, in_ch = delta.shape[:2]
    kernel = tuple(delta.shape[2:])
    a, b = factorization(out_ch, factor)
    c, d = factorization(in_ch, factor)
    # delta[i1*b + i2, j1*d + j2, ...] -> R[(i1, j1), (i2, j2, ...)]
    r = delta.reshape(a, b, c, d, *kernel).transpose(1, 2).reshape(a * c, -1)
    u, s, vh = svd_topk(r, 1)
    root = float(s[0].sqrt()) if s.numel() else 0.0
    w1 = (u[:, 0] * root).reshape(a, c)
    w2 = (vh[0] * root).reshape(b, d, *kernel)
    return w1, w2


def _lokr_layer(delta, rank, factor, dtype, alpha_override):
    w1, w2 = nearest_kronecker(delta, factor)
    b, d = w2.shape[:2]
    kernel = tuple(w2.shape[2:])
    flat_w2 = w2.reshape(b, -1)
    tensors = {"lokr_w1": w1}
    if rank is not None and rank < max(b, d) / 2:
        u, s, vh = svd_topk(flat_w2, rank)
        k = s.numel()
        up, down = _split(u, s, vh)
        alpha = float(alpha_override) if alpha_override is not None else float(k)
        tensors.update({"lokr_w2_a": up * (k / alpha), "lokr_w2_b": down})
        stored_rank = k
    else:
        alpha = float(alpha_override) if alpha_override is not None else None
        tensors["lokr_w2"] = w2
        stored_rank = None
    tensors = {k_: v.to(dtype).contiguous() for k_, v in tensors.items()}
    # rebuild from the stored tensors
    sw1 = tensors["lokr_w1"].float()
    if "lokr_w2" in tensors:
        sw2 = tensors["lokr_w2"].float()
    else:
        scale = alpha / stored_rank
        sw2 = (tensors["lokr_w2_a"].float() @ tensors["lokr_w2_b"].float() * scale).reshape(b, d, *kernel)
    approx = torch.kron(sw1.reshape(sw1.shape + (1,) * len(kernel)).contiguous(), sw2.contiguous())
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors, stored_rank, approx.reshape(delta.shape)


def extract(
    base,
    tuned,
    out_path=None,
    *,
    mode: str = "fixed",
    value: float | None = None,
    rank: int | None = 32,
    conv_rank: int | None = None,
    tucker: bool = False,
    algo: str = "lora",
    factor: int = -1,
    dtype="fp16",
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    min_change: float = 0.0,
    device=None,
    metadata: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> UtilityResult:
    """Extract tuned - base into a LoRA/LoCon (or LoKr) state dict; write it to `out_path` if given.

    - `base`, `tuned`: dicts of tensors or .safetensors paths (read one layer at a time).
    - `mode`/`value`: rank rule (`svd.RankRule`). Fixed mode: `rank` for Linear and 1x1 conv
      layers, `conv_rank` (default `rank`; 0 = skip) for k x k convs. Other modes: `value` is the
      threshold / ratio / quantile / energy and `rank`/`conv_rank` are per-layer caps (None: none).
    - `rank_pattern` {regex: rank} (PEFT semantics, matched on the dotted module path of the base
      key) overrides the rule with a fixed rank for matching layers (0 = skip them);
      `alpha_pattern` {regex: alpha} stores that alpha instead of alpha = rank, with the up
      factor rescaled so the delta is unchanged.
    - `tucker`: k x k convs as Tucker-2 (`lora_mid`) by HOSVD. `algo="lokr"`: nearest Kronecker
      product with LyCORIS's `factorization(dim, factor)`; `rank` then bounds w2's rank (w2 is
      full when rank >= max(b, d)/2, as LyCORIS does).
    - `dtype`: output dtype ("fp16" default, "bf16", "fp32"); all computation is fp32.
    - `min_change`: skip layers with ||tuned - base|| <= min_change * ||base|| (0: only identical).
    - `progress(done, total)` is called once per tuned tensor.
    """
    if algo not in ("lora", "lokr"):
        raise ValueError(f"unknown extraction algorithm '{algo}' (lora or lokr)")
    out_dtype = parse_dtype(dtype) or torch.float16
    if mode == "fixed":
        if rank is None:
            raise ValueError("fixed mode needs a rank")
        linear_rule = RankRule("fixed", rank) if rank > 0 else None
        conv_value = rank if conv_rank is None else conv_rank
        conv_rule = RankRule("fixed", conv_value) if conv_value > 0 else None
    else:
        if value is None:
            raise ValueError(f"mode '{mode}' needs a value (--value)")
        linear_rule = RankRule(mode, value, rank)
        conv_rule = None if conv_rank == 0 else RankRule(mode, value, conv_rank if conv_rank is not None else rank)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    base_src = TensorSource(base, "base")
    tuned_src = TensorSource(tuned, "tuned")
    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerReport] = []
    skipped: list[tuple[str, str]] = []
    used_names: dict[str, str] = {}
    try:
        keys = tuned_src.keys()
        for index, key in enumerate(keys):
            if progress is not None:
                progress(index, len(keys))
            reason = _why_skip(key, base_src, tuned_src)
            if reason:
                skipped.append((key, reason))
                continue
            full_shape = tuned_src.shape(key)
            is_conv = len(full_shape) > 2 and math.prod(full_shape[2:]) > 1
            w_base = full_delta = None
            for module_path, rows in layer_parts(key, full_shape):
                label = key if rows is None else f"{key} ({module_path.rsplit('.', 1)[-1]})"
                rule = conv_rule if is_conv else linear_rule
                forced = pattern_lookup(rank_pattern, module_path)
                if forced is not None:
                    rule = RankRule("fixed", int(forced)) if int(forced) > 0 else None
                if rule is None:
                    skipped.append((label, "rank 0 for this layer type / pattern"))
                    continue
                if full_delta is None:
                    w_base = base_src.tensor(key).to(dev, torch.float32)
                    full_delta = tuned_src.tensor(key).to(dev, torch.float32) - w_base
                delta = full_delta if rows is None else full_delta[rows]
                norm = float(delta.norm())
                if not math.isfinite(norm):
                    raise ValueError(f"{key}: the difference has NaN/Inf values")
                base_norm = float((w_base if rows is None else w_base[rows]).norm())
                if norm == 0.0 or norm <= min_change * base_norm:
                    skipped.append((label, "unchanged" if norm == 0.0 else f"change below {min_change:g} of the weight"))
                    continue
                name = kohya_module_name(module_path + ".weight")
                if name in used_names:  # two keys collapse to one underscored name: keep the dotted one
                    name = module_path
                used_names[name] = key
                alpha_override = pattern_lookup(alpha_pattern, module_path)
                if algo == "lokr":
                    cap = None if rule.mode != "fixed" else int(rule.value)
                    out, stored_rank, approx = _lokr_layer(delta, cap, factor, out_dtype, alpha_override)
                    method = "lokr (nearest Kronecker)"
                    kept = None
                elif is_conv and tucker:
                    out, stored_rank, approx, kept = _tucker_layer(delta, rule, out_dtype, alpha_override)
                    method = "tucker (HOSVD)"
                else:
                    out, stored_rank, approx, kept = _lora_layer(delta, rule, out_dtype, alpha_override)
                    method = "locon" if is_conv else "lora"
                if out is None:
                    skipped.append((label, f"rank 0 under {rule.describe()}"))
                    continue
                err = _measure(delta, approx)
                del approx
                for suffix, tensor in out.items():
                    tensors[f"{name}.{suffix}"] = tensor.cpu()
                alpha = float(out["alpha"]) if "alpha" in out else None
                layers.append(LayerReport(name, label, tuple(delta.shape), stored_rank, err, kept, norm, method, alpha))
            del w_base, full_delta
        if progress is not None:
            progress(len(keys), len(keys))
    finally:
        base_src.close()
        tuned_src.close()

    meta = _metadata(layers, skipped, mode, value, rank, conv_rank, tucker, algo, factor, out_dtype,
                     base_src.path, tuned_src.path, rank_pattern)
    meta.update(metadata or {})
    result = UtilityResult(tensors, meta, layers, skipped)
    if out_path is not None:
        if not tensors:
            raise ValueError("no layer differs between base and tuned (or every layer was skipped); nothing was written")
        result.save(out_path)
    return result


def _why_skip(key, base_src, tuned_src) -> str | None:
    fused_qkv = key.endswith(".attn.in_proj_weight") and key.startswith(OPEN_CLIP_PREFIXES)
    if not key.endswith(".weight") and not fused_qkv:
        return "not a .weight tensor"
    if key not in base_src:
        return "not in base"
    shape = tuned_src.shape(key)
    if tuple(base_src.shape(key)) != tuple(shape):
        return f"shape differs from base ({list(base_src.shape(key))} vs {list(shape)})"
    if not (tuned_src.dtype(key).is_floating_point and base_src.dtype(key).is_floating_point):
        return "not floating point"
    if len(shape) < 2:
        return "1-D tensor (bias / norm), not extracted"
    if min(shape) == 0:
        return "empty tensor"
    return None


def _with_alpha(up, rank, alpha_override, dtype):
    alpha = float(alpha_override) if alpha_override is not None else float(rank)
    return up * (rank / alpha), torch.tensor(alpha, dtype=torch.float32)


def _lora_layer(delta, rule, dtype, alpha_override):
    out_ch = delta.shape[0]
    mat = delta.reshape(out_ch, -1)
    u, s, vh, kept = truncate(mat, rule)
    k = s.numel()
    if k == 0:
        return None, 0, None, None
    up, down = _split(u, s, vh)
    up, alpha = _with_alpha(up, k, alpha_override, dtype)
    up_c, down_c = up.to(dtype), down.to(dtype)
    approx = (up_c.float() @ down_c.float()) * (float(alpha) / k)
    if delta.dim() > 2:
        ones = (1,) * (delta.dim() - 2)
        up_c = up_c.reshape(out_ch, k, *ones)
        down_c = down_c.reshape(k, *delta.shape[1:])
    out = {"lora_up.weight": up_c.contiguous(), "lora_down.weight": down_c.contiguous(), "alpha": alpha}
    return out, k, approx.reshape(delta.shape), kept


def _tucker_layer(delta, rule, dtype, alpha_override):
    out_ch, in_ch = delta.shape[:2]
    found = tucker_for_rule(delta, rule)
    if found is None:
        return None, 0, None, None
    up, mid, down, kept = found
    k = mid.shape[0]
    up, alpha = _with_alpha(up, k, alpha_override, dtype)
    ones = (1,) * (delta.dim() - 2)
    up_c, mid_c, down_c = up.to(dtype), mid.to(dtype), down.to(dtype)
    approx = torch.einsum("ab...,oa,bi->oi...", mid_c.float(), up_c.float(), down_c.float()) * (float(alpha) / k)
    out = {
        "lora_up.weight": up_c.reshape(out_ch, k, *ones).contiguous(),
        "lora_mid.weight": mid_c.contiguous(),
        "lora_down.weight": down_c.reshape(k, in_ch, *ones).contiguous(),
        "alpha": alpha,
    }
    return out, k, approx, min(kept, 1.0)


def _metadata(layers, skipped, mode, value, rank, conv_rank, tucker, algo, factor, dtype, base, tuned,
              rank_pattern) -> dict[str, str]:
    ranks = rank_summary(layers)
    if algo == "lokr":
        module = "lycoris.kohya"
        args = {"algo": "lokr", "factor": str(factor)}
    else:
        module = "networks.lora"
        args = {}
        if conv_rank is not None or mode == "fixed":
            conv = rank if conv_rank is None else conv_rank
            if conv:
                args.update({"conv_dim": str(conv), "conv_alpha": str(conv)})
        if tucker:
            args["use_tucker"] = "True"
    dim = str(rank) if (mode == "fixed" and rank) else "Dynamic"
    meta = {
        "ss_network_module": module,
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_network_args": json.dumps(args),
        "lycoris_pack.tool": TOOL,
        "lycoris_pack.mode": mode,
        "lycoris_pack.value": "" if value is None else f"{value:g}",
        "lycoris_pack.rank": "" if rank is None else str(rank),
        "lycoris_pack.conv_rank": "" if conv_rank is None else str(conv_rank),
        "lycoris_pack.algo": algo + ("+tucker" if tucker and algo == "lora" else ""),
        "lycoris_pack.dtype": str(dtype).replace("torch.", ""),
        "lycoris_pack.base": os.path.basename(str(base)),
        "lycoris_pack.tuned": os.path.basename(str(tuned)),
        "lycoris_pack.ranks": json.dumps(ranks),
        "lycoris_pack.errors": json.dumps(error_summary(layers)),
        "lycoris_pack.skipped": str(len(skipped)),
        "lycoris_pack.alpha": "alpha = rank (scale 1) unless alpha_pattern",
    }
    if rank_pattern:
        meta["lycoris_pack.rank_pattern"] = json.dumps(rank_pattern)
    return meta
