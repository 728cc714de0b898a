"""Bypass forward cost per algorithm: a layer running its adapter beside it vs the same layer's
plain forward, side by side in one process (target: ratio <= 1.10 at rank 16).

The plain forward is what a quantized layer does: dequantise the stored weight (fp32, or fp8
e4m3 stored) and matmul. The bypassed forward does what nodes/bypass.py does each step, in the
form the core's cost model picks for the call's tokens (or the one `--form` pins):
  factored: read the weight only when an adapter asks for it (DoRA reads it once, then keeps
    its per-channel scale), run input-side transforms, the base forward, then the adapter;
  patched:  merge the adapter into the dequantised copy the layer reads anyway, then matmul.
A cell marked "p" ran patched.

Layers: SDXL-shaped (attention 640/1280, cross-attention k/v from the 2048-wide context,
feed-forward 5120x1280) and Flux-shaped (3072x3072, 12288x3072), with the tokens of one
1024x1024 step: SDXL 4096 / 1024 image tokens and a 77-token context per image, times
`--cfg-batch` (default 2: with CFG, ComfyUI runs cond and uncond as one batch when memory
allows; 1 is a lone image); Flux 4096 (guidance-distilled, no uncond pass). Adapters at rank 16
(LoHa: r1 = r2 = 16, i.e. an effective rank of 256; OFT/BOFT: blocks of ~16).

    .venv/bin/python bench/bypass_speed.py [--repeats 5] [--threads 2] [--tokens-scale 0.25]
        [--algos lora,loha] [--layers sdxl|flux|all] [--device cpu] [--dtypes fp32,fp8]
        [--form cost|factored|patched] [--cfg-batch 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lycoris_core import LayerGeometry  # noqa: E402
from lycoris_core.algos import BOFT, IA3, DecodeContext, DiagOFT, GLoRA, LoHa, LoKr, LoRA, PeftBOFT, PeftOFT  # noqa: E402
from lycoris_core.algos.base import chain_inputs, patching_cheaper, plan_bypass, weight_token  # noqa: E402

RANK = 16
LAYERS = {  # name: (out, in, tokens per image)
    "sdxl": [
        ("attn 640", 640, 640, 4096),
        ("attn 1280", 1280, 1280, 1024),
        ("ctx k/v 2048>1280", 1280, 2048, 77),
        ("ff 5120x1280", 5120, 1280, 1024),
        ("ff.out 1280x5120", 1280, 5120, 1024),
    ],
    "flux": [
        ("flux 3072", 3072, 3072, 4096),
        ("flux 12288x3072", 12288, 3072, 4096),
    ],
}


def _butterfly_block(channels: int) -> int:
    """The smallest even block >= 16 whose block count is a power of two (butterfly stages)."""
    for size in range(16, channels + 1, 2):
        groups = channels // size
        if channels % size == 0 and groups & (groups - 1) == 0:
            return size
    return channels


def make_adapter(algo: str, out: int, inp: int, g: torch.Generator):
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    alpha = {"alpha": torch.tensor(8.0)}
    lycoris = DecodeContext()
    if algo in ("lora", "dora"):
        tensors = {"lora_up.weight": r(out, RANK), "lora_down.weight": r(RANK, inp), **alpha}
        if algo == "dora":
            tensors["dora_scale"] = 1 + r(out, 1)
        return LoRA("m", tensors, lycoris)
    if algo == "lokr":
        return LoKr("m", {"lokr_w1": r(8, 8), "lokr_w2_a": r(out // 8, RANK), "lokr_w2_b": r(RANK, inp // 8),
                          **alpha}, lycoris)
    if algo == "loha":
        return LoHa("m", {"hada_w1_a": r(out, RANK), "hada_w1_b": r(RANK, inp), "hada_w2_a": r(out, RANK),
                          "hada_w2_b": r(RANK, inp), **alpha}, lycoris)
    if algo == "glora":
        return GLoRA("m", {"a2.weight": r(RANK, inp), "a1.weight": r(inp, RANK), "b2.weight": r(RANK, inp),
                           "b1.weight": r(out, RANK), **alpha}, lycoris)
    if algo == "ia3":
        return IA3("m", {"weight": r(out), "on_input": torch.tensor([False])}, lycoris)
    if algo == "oft":
        return DiagOFT("m", {"oft_blocks": r(out // RANK, RANK, RANK)}, lycoris)
    if algo == "boft":
        size = _butterfly_block(out)
        groups = out // size
        return BOFT("m", {"oft_blocks": r(int(math.log2(groups)) + 1, groups, size, size)}, lycoris)
    if algo == "peft-oft":
        return PeftOFT("m", {"oft_R.weight": r(inp // RANK, RANK * (RANK - 1) // 2)},
                       DecodeContext(convention="peft", peft_config={"use_cayley_neumann": True}))
    if algo == "peft-boft":
        size = _butterfly_block(inp)
        # one butterfly factor: what PEFT trains without its CUDA extension (and its default)
        return PeftBOFT("m", {"boft_R": r(1, inp // size, size, size), "boft_s": 1 + r(out, 1)},
                        DecodeContext(convention="peft"))
    raise ValueError(algo)


ALGOS = ("lora", "lokr", "loha", "oft", "boft", "peft-oft", "peft-boft", "dora", "glora", "ia3")


class Layer:
    """A Linear whose weight is stored as `dtype` and dequantised on every forward."""

    def __init__(self, weight, bias, dtype):
        self.stored = weight.to(dtype)
        self.bias = bias

    def dequantised(self, x):
        return self.stored.to(x.dtype)

    def forward(self, x):
        return F.linear(x, self.dequantised(x), self.bias)

    def patches(self, x, adapter, form):
        """Whether BypassForward would run this call patched."""
        if form != "cost":
            return form == "patched"
        return patching_cheaper([(adapter, tuple(self.stored.shape))], x.numel() // x.shape[-1])

    def bypassed(self, x, adapter, strength, geometry, form="cost"):
        """nodes/bypass.py's BypassForward.__call__ for one adapter."""
        if self.patches(x, adapter, form):
            w, b = adapter.patch(self.dequantised(x), strength, self.bias)
            return F.linear(x, w.to(x.dtype), b.to(x.dtype))
        token = weight_token(self.stored)
        steps, needs = plan_bypass([(adapter, strength, True)], geometry, token)
        weight = self.dequantised(x) if needs else None
        inputs = chain_inputs(x, steps, weight, geometry, token)
        y = self.forward(inputs[0])
        side = steps[0][2]
        return adapter.bypass(inputs[1], y, weight, self.bias, geometry, strength, token=token, input_applied=side)


def timed(fns, repeats):
    """Best-of-repeats seconds of each function (the least disturbed run on a shared machine),
    measured interleaved so load drifts hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens-scale", type=float, default=1.0, help="scale every layer's token count")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--layers", default="all", choices=["sdxl", "flux", "all"])
    parser.add_argument("--dtypes", default="fp32,fp8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--form", default="cost", choices=["cost", "factored", "patched"])
    parser.add_argument("--cfg-batch", type=int, default=2, help="images per SDXL call (2: cond + uncond)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    algos = args.algos.split(",")
    layers = LAYERS["sdxl"] + LAYERS["flux"] if args.layers == "all" else LAYERS[args.layers]
    stored = {"fp32": torch.float32, "fp8": torch.float8_e4m3fn}
    geometry = LayerGeometry()
    g = torch.Generator().manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} threads, tokens x{args.tokens_scale}, "
          f"SDXL batch {args.cfg_batch}, rank {RANK}, "
          f"ratio = bypassed forward / plain forward (dequantise + matmul)")
    header = f"{'layer':18s} {'tokens':>6s} {'weight':6s} {'plain ms':>9s} " + " ".join(f"{a:>9s}" for a in algos)
    print(header)
    ratios = {(a, d): [] for a in algos for d in args.dtypes.split(",")}
    totals = {key: [0.0, 0.0] for key in ratios}  # (bypassed, plain) seconds summed over the layers
    for name, out, inp, tokens in layers:
        batch = args.cfg_batch if (name, out, inp, tokens) in LAYERS["sdxl"] else 1
        tokens = max(1, int(tokens * batch * args.tokens_scale))
        weight = torch.randn(out, inp, generator=g) * 0.02
        bias = (torch.randn(out, generator=g) * 0.1).to(device)
        x = torch.randn(tokens, inp, generator=g).to(device)
        adapters = {a: make_adapter(a, out, inp, g).moved(device) for a in algos}
        for dtype_name in args.dtypes.split(","):
            layer = Layer(weight.to(device), bias, stored[dtype_name])
            with torch.no_grad():
                fns = [lambda: layer.forward(x)] + [
                    (lambda a=a: layer.bypassed(x, adapters[a], 1.0, geometry, args.form)) for a in algos]
                plain, *bypass = timed(fns, args.repeats)
            cells = []
            for a, t in zip(algos, bypass):
                ratios[(a, dtype_name)].append(t / plain)
                totals[(a, dtype_name)][0] += t
                totals[(a, dtype_name)][1] += plain
                mark = "p" if layer.patches(x, adapters[a], args.form) else "x"
                cells.append(f"{t / plain:8.3f}{mark}")
            print(f"{name:18s} {tokens:6d} {dtype_name:6s} {plain * 1e3:9.2f} " + " ".join(cells), flush=True)
    print("\ngeometric mean over layers")
    for dtype_name in args.dtypes.split(","):
        cells = [f"{math.exp(statistics.mean(map(math.log, ratios[(a, dtype_name)]))):8.3f}x" for a in algos]
        print(f"{'all':18s} {'':6s} {dtype_name:6s} {'':9s} " + " ".join(cells))
    print("time of all layers together (bypassed / plain)")
    for dtype_name in args.dtypes.split(","):
        cells = [f"{totals[(a, dtype_name)][0] / totals[(a, dtype_name)][1]:8.3f}x" for a in algos]
        print(f"{'sum':18s} {'':6s} {dtype_name:6s} {'':9s} " + " ".join(cells))
    print(f"\nLoHa at rank {RANK} (r1 = r2): the rank-{RANK * RANK} product form or the dense delta built once, "
          "whichever has fewer multiply-adds per token; extra memory kept per layer (fp32):")
    for name, out, inp, _ in layers:
        loha = make_adapter("loha", out, inp, g)
        if loha.product_factors_cheaper(geometry, (out, inp)):
            form, values = "product", RANK * RANK * (out + inp)
        else:
            form, values = "dense delta", out * inp
        floor = 1 + min(RANK * RANK * (out + inp), out * inp) / (out * inp)
        print(f"  {name:18s} {form:12s} {values * 4 / 2**20:7.2f} MiB  FLOP floor {floor:.3f}x")


if __name__ == "__main__":
    main()
