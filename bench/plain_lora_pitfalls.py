"""Why a naive "LyCORIS -> plain LoRA by SVD" conversion gives noise or artifacts, measured.

A third-party Nunchaku loader reports that LoKr files converted to standard LoRA "using SVD
approximation" give "noise/artifacts" (reference/demand-2026.md (c)). This script builds LoKr and
LoHa layers of Flux/SDXL shapes, converts them with `combine(plain=True)` and with the usual naive
variants, and prints for each the relative Frobenius error of the delta a LoRA loader then applies,
(alpha / rank) * up @ down, against the adapter's true delta (the pack's own decoder, which the core
tests check against lycoris-lora's forward). An error near or above 1.0 is a change as large as the
adapter's own but uncorrelated with it: that is what shows as noise. Errors below 1.0 from
truncation weaken the adapter instead.

Factors get singular values sigma_i ~ i^-decay (decay 0: flat, like random init; 1: decaying, nearer
trained factors) and are scaled so the delta's mean |entry| is `--scale` (1e-4: the order of a Flux
LoRA delta), which matters for fp16 under- and overflow.

    .venv/bin/python bench/plain_lora_pitfalls.py [--dim 1536] [--factor 16] [--rank 32] [--decay 1]
        [--scale 1e-4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lycoris_core import decode_tensors  # noqa: E402
from lycoris_core.combine import combine  # noqa: E402


def spectral(gen, rows, cols, decay, rank=None):
    """A rows x cols matrix of rank `rank` (default full) with sigma_i = i^-decay."""
    k = min(rows, cols) if rank is None else rank
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen))[0]
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def rel(target, approx):
    return float((approx.float() - target).norm() / target.norm())


def svd_parts(mat, rank):
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def loaded(up, down, alpha, rank):
    """What a LoRA loader applies: (alpha / rank) * up @ down, in fp32."""
    return (alpha / rank) * (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1))


def linear_rows(name, delta, rank, file_alpha, strength):
    """Naive conversions of one Linear delta (already at `strength`) to a rank-`rank` LoRA."""
    rows = []
    u, s, vh = svd_parts(delta, rank)
    root = s.sqrt()
    best = rel(delta, (u * s) @ vh)
    rows.append(("rank-%d truncation itself (fp32, no rounding)" % rank, best))
    rows.append(("SVD of the delta materialised in fp16", rel(delta, _trunc(delta.half().float(), rank))))
    rows.append(("SVD of the delta materialised in bf16", rel(delta, _trunc(delta.bfloat16().float(), rank))))
    up_b, down_b = (u * root).half(), (root[:, None] * vh).half()
    rows.append(("balanced up=U*sqrt(S), down=sqrt(S)*Vh, fp16, alpha=rank", rel(delta, loaded(up_b, down_b, rank, rank))))
    up_u, down_u = (u * s).half(), vh.half()
    rows.append(("unbalanced up=U*S, down=Vh, fp16", rel(delta, loaded(up_u, down_u, rank, rank))))
    rows.append(("unbalanced up=U, down=S*Vh, fp16", rel(delta, loaded(u.half(), (s[:, None] * vh).half(), rank, rank))))
    rows.append((f"alpha copied from the input file ({file_alpha:g}) instead of rank",
                 rel(delta, loaded(up_b, down_b, file_alpha, rank))))
    rows.append(("no alpha key written (loader scale 1): fine", rel(delta, loaded(up_b, down_b, rank, rank))))
    rows.append((f"strength {strength:g} folded in and applied again by the loader",
                 rel(delta, strength * loaded(up_b, down_b, rank, rank))))
    rows.append(("up/down swapped (a square layer loads; applies the delta transposed)",
                 rel(delta, loaded(down_b.T, up_b.T, rank, rank))))
    v_not_vh = torch.linalg.svd(delta, full_matrices=False)[2].T[:rank]  # V's rows where Vh's belong
    rows.append(("torch.svd's V used as Vh (down = rows of V)",
                 rel(delta, loaded((u * root).half(), (root[:, None] * v_not_vh).half(), rank, rank))))
    return [(name, what, err) for what, err in rows]


def _trunc(mat, rank):
    u, s, vh = svd_parts(mat, rank)
    return (u * s) @ vh


def conv_rows(delta, rank):
    """Naive conversions of a 3x3 conv delta (out, in, 3, 3)."""
    out_ch, in_ch = delta.shape[:2]
    mat = delta.reshape(out_ch, -1)
    u, s, vh = svd_parts(mat, rank)
    root = s.sqrt()
    up, down = u * root, root[:, None] * vh
    right = (up @ down).reshape(delta.shape)
    wrong_order = (up @ down).reshape(out_ch, 3, 3, in_ch).permute(0, 3, 1, 2)  # kernel-major unfolding read back in-major
    center = torch.zeros_like(delta)
    center[:, :, 1, 1] = _trunc(delta[:, :, 1, 1], rank)
    return [
        ("conv 3x3", "LoCon unfolding (out, in*kh*kw), rank %d" % rank, rel(delta, right)),
        ("conv 3x3", "unfolding in (out, kh*kw*in) order read back as (out, in, kh, kw)", rel(delta, wrong_order)),
        ("conv 3x3", "truncated as a 1x1 (centre tap only)", rel(delta, center)),
    ]


def ours(tensors, rank, strength, dtype):
    """combine(plain=True) as the node and CLI run it; the error is read back from the written tensors."""
    adapter_file = decode_tensors(tensors, path="input")
    result = combine([(adapter_file, strength)], plain=True, rank=rank, dtype=dtype)
    (layer,) = result.layers
    out = decode_tensors(result.tensors).adapters[layer.name]
    return layer, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1536, help="square Linear size (Flux: 3072; SDXL: 1280)")
    parser.add_argument("--factor", type=int, default=16, help="LoKr factor (w1 is factor x factor)")
    parser.add_argument("--rank", type=int, default=32, help="the LoRA rank a runtime is given")
    parser.add_argument("--decay", type=float, default=1.0, help="sigma_i ~ i^-decay of every factor")
    parser.add_argument("--scale", type=float, default=1e-4, help="mean |delta entry|")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, f = args.dim, args.factor

    # LoKr as ai-toolkit / LyCORIS train it for DiT models: w1 (f x f) full, w2 full (full_matrix)
    w1 = spectral(gen, f, f, args.decay)
    w2 = spectral(gen, n // f, n // f, args.decay)
    raw = torch.kron(w1, w2)
    k = args.scale / float(raw.abs().mean())
    lokr = {"m.lokr_w1": w1 * k, "m.lokr_w2": w2, "m.alpha": torch.tensor(1.0)}
    # LoHa dim 16: (w1a w1b) * (w2a w2b) has rank up to 256
    loha = {"m.hada_w1_a": spectral(gen, n, 16, args.decay), "m.hada_w1_b": spectral(gen, 16, n, args.decay),
            "m.hada_w2_a": spectral(gen, n, 16, args.decay), "m.hada_w2_b": spectral(gen, 16, n, args.decay),
            "m.alpha": torch.tensor(16.0)}
    loha_raw = decode_tensors(loha).adapters["m"].delta(torch.zeros(n, n))
    loha["m.hada_w1_a"] = loha["m.hada_w1_a"] * (args.scale / float(loha_raw.abs().mean()))
    strength = 0.8

    print(f"Linear {n}x{n}, LoRA rank {args.rank}, spectra i^-{args.decay:g}, mean |delta| {args.scale:g}, "
          f"strength {strength:g}")
    print(f"{'layer':<10} {'conversion':<78} rel. error")
    for name, tensors, file_alpha in (("LoKr", lokr, 1.0), ("LoHa", loha, 16.0)):
        truth = decode_tensors(tensors).adapters["m"].delta(torch.zeros(n, n)) * strength
        s = torch.linalg.svdvals(truth.double())
        energy = torch.cumsum(s * s, 0) / float((s * s).sum())
        need = {p: int((energy < p).sum()) + 1 for p in (0.5, 0.9, 0.99)}
        numerical = int((s > s[0] * n * torch.finfo(torch.float32).eps).sum())
        print(f"{name:<10} numerical rank {numerical}; energy kept at rank {args.rank}: "
              f"{100 * float(energy[args.rank - 1]):.1f}%; rank for 50/90/99% energy: "
              f"{need[0.5]}/{need[0.9]}/{need[0.99]}")
        for _, what, err in linear_rows(name, truth, args.rank, file_alpha, strength):
            print(f"{name:<10} {what:<78} {err:.4f}")
        for rank in dict.fromkeys((args.rank, need[0.9], None)):
            for dtype in ("fp16", "bf16"):
                layer, out = ours(tensors, rank, strength, dtype)
                measured = rel(truth, out.delta(torch.zeros(n, n)))
                label = f"combine(plain) rank {layer.rank} ({'lossless' if rank is None else 'asked'}), {dtype}"
                print(f"{name:<10} {label:<78} {measured:.4f} (reported {layer.rel_error:.4f})")
        if name == "LoKr":
            wrong = torch.kron(w2, w1 * k) * strength  # Kronecker factors in the wrong order
            print(f"{name:<10} {'materialised as kron(w2, w1) (factor order swapped)':<78} {rel(truth, wrong):.4f}")
            # both LoKr factors full: LyCORIS trains with gamma = 1 whatever alpha says; a converter
            # applying alpha / dim (alpha 1, linear_dim 10000 in the metadata) shrinks the change
            print(f"{name:<10} {'alpha / dim applied to a full-factor LoKr (alpha 1, dim 10000)':<78} "
                  f"{rel(truth, truth * 1e-4):.4f}")
    # fused q/k/v (Flux's qkv, Nunchaku's qkv_proj): three rank-r LoRAs on the slices of one weight
    r = 16
    ups = [spectral(gen, n // 4, r, args.decay) for _ in range(3)]
    downs = [spectral(gen, r, n // 4, args.decay) for _ in range(3)]
    fused = torch.cat([u @ d for u, d in zip(ups, downs)], 0)
    exact_up = torch.block_diag(*ups)  # (3 out, 3r): each slice's rows see only its own ranks
    exact_down = torch.cat(downs, 0)
    print(f"{'fused qkv':<10} {'slices as block-diagonal up + stacked down, rank %d' % (3 * r):<78} "
          f"{rel(fused, exact_up @ exact_down):.4f}")
    print(f"{'fused qkv':<10} {'SVD of the fused delta cut to one slice rank (%d)' % r:<78} {rel(fused, _trunc(fused, r)):.4f}")
    shared = torch.cat(ups, 0) @ (sum(downs) / 3)
    print(f"{'fused qkv':<10} {'ups stacked over one averaged down':<78} {rel(fused, shared):.4f}")
    conv = spectral(gen, 320, 320 * 9, args.decay).reshape(320, 320, 3, 3) * 1e-3
    for _, what, err in conv_rows(conv, args.rank):
        print(f"{'conv 3x3':<10} {what:<78} {err:.4f}")


if __name__ == "__main__":
    main()
