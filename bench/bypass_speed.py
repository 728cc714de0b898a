"""Bypass forward cost: a layer with the adapter in its forward vs the same layer with the
adapter merged into its weight, side by side in one process.

SDXL-shaped Linear layers with the token batches of a 1024x1024 SDXL step with CFG (batch 2):
4096 tokens at 640 channels, 1024 tokens at 1280 channels, and the feed-forward projections.
Adapters: rank-16 LoRA and a LoKr (factor 8, rank 16). Prints median times and the ratio
bypass / merged (target <= 1.10 for LoRA).

    .venv/bin/python bench/bypass_speed.py [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lycoris_core import LayerGeometry, decode_tensors  # noqa: E402

LAYERS = [  # (name, out, in, tokens)
    ("attn 640", 640, 640, 4096),
    ("ff.proj 640", 5120, 640, 4096),
    ("attn 1280", 1280, 1280, 1024),
    ("ff.proj 1280", 10240, 1280, 1024),
    ("ff.out 1280", 1280, 5120, 1024),
]


def adapter(algo: str, out: int, inp: int, generator):
    r = lambda *s: torch.randn(*s, generator=generator) * 0.01  # noqa: E731
    if algo == "lora":
        tensors = {"m.lora_up.weight": r(out, 16), "m.lora_down.weight": r(16, inp), "m.alpha": torch.tensor(8.0)}
    else:
        a, c = 8, 8
        tensors = {"m.lokr_w1": r(a, c), "m.lokr_w2_a": r(out // a, 16), "m.lokr_w2_b": r(16, inp // c),
                   "m.alpha": torch.tensor(8.0)}
    return decode_tensors(tensors).adapters["m"]


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    geometry = LayerGeometry()
    print(f"{'layer':14s} {'algo':5s} {'merged ms':>10s} {'bypass ms':>10s} {'ratio':>7s}")
    totals = {"lora": [0.0, 0.0], "lokr": [0.0, 0.0]}
    for name, out, inp, tokens in LAYERS:
        weight = torch.randn(out, inp, generator=g) * 0.02
        bias = torch.zeros(out)
        x = torch.randn(2, tokens, inp, generator=g)
        for algo in ("lora", "lokr"):
            a = adapter(algo, out, inp, g)
            merged_weight, _ = a.patch(weight, 1.0)
            with torch.no_grad():
                merged = median_time(lambda: F.linear(x, merged_weight, bias), args.repeats)
                bypass = median_time(lambda: a.bypass(x, F.linear(x, weight, bias), None, bias, geometry, 1.0),
                                     args.repeats)
            totals[algo][0] += merged
            totals[algo][1] += bypass
            print(f"{name:14s} {algo:5s} {merged * 1e3:10.2f} {bypass * 1e3:10.2f} {bypass / merged:6.3f}x")
    for algo, (merged, bypass) in totals.items():
        print(f"all layers     {algo:5s} {merged * 1e3:10.2f} {bypass * 1e3:10.2f} {bypass / merged:6.3f}x")


if __name__ == "__main__":
    main()
