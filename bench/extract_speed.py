"""Extraction speed and error: lycoris_core.extract vs lycoris-lora's own routine, same run.

Synthetic SDXL-shaped (base, tuned) pair: a handful of real SDXL layer shapes (1280x1280 attention,
10240x1280 GEGLU in, 1280x5120 GEGLU out, 640x640, 1280x1280x3x3 resnet conv); tuned = base + a
delta with a decaying spectrum (sigma_i ~ i^-decay, random singular vectors, scaled to a
fine-tune-like 1e-3 mean |delta|). Both sides extract the same ranks (LoCon reshape for the conv):
  ours:      lycoris_core.extract.extract(base, tuned, rank=R) (fixed mode: randomized SVD,
             q = 2R, 2 power iterations, error measured on the stored factors)
  reference: lycoris.utils.extract_linear / extract_conv on (tuned - base), which is what
             lycoris.utils.extract_diff / tools/extract_locon.py run per layer (torch.linalg.svd
             with full_matrices=True)
and prints per-layer and total times, the ratio, and both relative errors ||D - D_hat|| / ||D||.

    .venv/bin/python bench/extract_speed.py [--rank 32] [--decay 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lycoris_core.extract import extract  # noqa: E402

SHAPES = {
    "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": (640, 640),
    "model.diffusion_model.middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
}


def planted_delta(shape, decay, gen):
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen))[0]
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    d = (u * s) @ v.T
    return (d * (1e-3 / d.abs().mean())).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lycoris.utils import extract_conv, extract_linear

    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for key, shape in SHAPES.items():
        base[key] = torch.randn(shape, generator=gen) * 0.02
        tuned[key] = base[key] + planted_delta(shape, args.decay, gen)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, spectrum i^-{args.decay}")

    times = {}
    t0 = time.perf_counter()
    ours = extract(base, tuned, rank=args.rank, dtype="fp32")
    t_ours = time.perf_counter() - t0
    ours16 = extract(base, tuned, rank=args.rank, dtype="fp16")
    our_err = {layer.source: layer.rel_error for layer in ours.layers}
    our_err16 = {layer.source: layer.rel_error for layer in ours16.layers}
    # per-layer times for ours (one layer per call)
    for key in SHAPES:
        t0 = time.perf_counter()
        extract({key: base[key]}, {key: tuned[key]}, rank=args.rank, dtype="fp32")
        times[key] = [time.perf_counter() - t0]

    their_err, t_theirs = {}, 0.0
    for key, shape in SHAPES.items():
        t0 = time.perf_counter()
        diff = tuned[key].float() - base[key].float()
        if len(shape) == 2:
            (down, up, _), kind = extract_linear(diff, "fixed", args.rank)
        else:
            (down, up, _), kind = extract_conv(diff, "fixed", args.rank)
        elapsed = time.perf_counter() - t0
        t_theirs += elapsed
        times[key].append(elapsed)
        approx = (up.reshape(shape[0], -1) @ down.reshape(args.rank, -1)).reshape(shape)
        their_err[key] = float((diff - approx).norm() / diff.norm())

    print(f"{'layer shape':>22} {'ours s':>8} {'lyco s':>8} {'ratio':>6} {'ours err':>10} {'(fp16)':>10} {'lyco err':>10}")
    for key, shape in SHAPES.items():
        a, b = times[key]
        print(f"{str(list(shape)):>22} {a:8.3f} {b:8.3f} {b / a:6.1f} {our_err[key]:10.6f} {our_err16[key]:10.6f} "
              f"{their_err[key]:10.6f}")
    print(f"total (one extract call over all layers): ours {t_ours:.2f} s, lycoris-lora {t_theirs:.2f} s, "
          f"ratio {t_theirs / t_ours:.1f}x")
    worst = max(our_err[k] - their_err[k] for k in SHAPES)
    print(f"largest error gap ours - lycoris: {worst:+.2e} (relative error, fp32 factors)")
    t0 = time.perf_counter()
    energy = extract(base, tuned, mode="energy", value=0.9, rank=None, dtype="fp16")
    print(f"energy 0.9 mode (full reduced SVD): {time.perf_counter() - t0:.2f} s, ranks "
          f"{[layer.rank for layer in energy.layers]}, errors {[round(layer.rel_error, 4) for layer in energy.layers]}")


if __name__ == "__main__":
    main()
