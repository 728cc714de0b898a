"""Bypass cost on a whole model forward inside ComfyUI: the full-size SD1.5 UNet with and without
Load LyCORIS in bypass mode, side by side in one process.

The model is ComfyUI's SD1.5 class at full size (bench/merge_vs_comfyui.py builds it), computed
in fp32 on the CPU, its Linear and Conv weights stored either as fp32 or as float8_e4m3fn
dequantised by ComfyUI's manual cast (what UNETLoader's fp8 weight_dtype gives). Per algorithm,
one file with random factors at rank 16 on every Linear of the transformer blocks, loaded by the
pack's loader node in bypass mode, so each layer call runs in the form bypass picks for its
token count. Timed: one forward of the diffusion model at 512x512 (a 64x64 latent, a 77-token
context) for `--batch` images (default 2: with CFG, ComfyUI runs cond and uncond as one batch when
memory allows), plain and bypassed runs interleaved; prints the best bypassed run of each algorithm over
the best of the plain runs interleaved with it (the machine drifts over a run of many minutes: a plain
run pooled from all algorithms let an early quiet minute inflate later algorithms' ratios by up to
30 %; single CPU runs of this size still move by up to 10 %).

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python bench/bypass_model.py [--repeats 3] [--threads 2]
        [--algos lora,loha] [--weights fp32,fp8] [--latent 64] [--batch 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from bypass_speed import make_adapter  # noqa: E402
from comfyui_runtime import import_comfy, import_pack, use_loras_folder  # noqa: E402

ALGOS = ("lora", "lokr", "loha", "oft", "boft", "dora", "glora", "ia3")


def fp32_sd15():
    """bench/merge_vs_comfyui.py's SD1.5 UNet, computed in fp32 (the CPU has no fast fp16)."""
    from merge_vs_comfyui import sd15_patcher

    patcher = sd15_patcher()
    patcher.model.diffusion_model.to(torch.float32)
    patcher.model.diffusion_model.dtype = torch.float32
    patcher.model.manual_cast_dtype = None
    return patcher


def store_as_fp8(patcher) -> None:
    """Linear/Conv weights stored as float8_e4m3fn, dequantised per call by ComfyUI's cast."""
    for module in patcher.model.diffusion_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
            module.comfy_cast_weights = True


def adapter_file(algo: str, layers: dict, g) -> dict:
    """kohya-named tensors of `algo` on every layer (bench/bypass_speed.py's random factors)."""
    tensors = {}
    for name, (out, inp) in layers.items():
        for suffix, value in make_adapter(algo, out, inp, g).tensors.items():
            tensors[f"{name}.{suffix}"] = value.contiguous()
    return tensors


def timed_forward(patcher, inputs, bypassed):
    """(seconds, output) of one forward, the bypass injected around it when `bypassed`."""
    with torch.no_grad():
        if bypassed:
            patcher.patch_model()
        try:
            start = time.perf_counter()
            y = patcher.model.diffusion_model(*inputs[:2], context=inputs[2])
            return time.perf_counter() - start, y
        finally:
            if bypassed:
                patcher.unpatch_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--weights", default="fp32,fp8")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: a 512x512 image)")
    parser.add_argument("--batch", type=int, default=2, help="images per forward (2: cond + uncond)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_comfy()
    pack = import_pack()
    from safetensors.torch import save_file

    from merge_vs_comfyui import transformer_linears

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch, 4, args.latent, args.latent, generator=g), torch.tensor([500.0] * args.batch),
              torch.randn(args.batch, 77, 768, generator=g))
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    print(f"SD1.5 UNet, {args.latent}x{args.latent} latent, batch {args.batch}, {args.threads} threads; "
          "rank 16 on every "
          "transformer Linear; bypassed forward / plain forward")
    print(f"{'weights':8s} {'plain s':>8s} " + " ".join(f"{a:>7s}" for a in args.algos.split(",")))
    with tempfile.TemporaryDirectory() as folder:
        use_loras_folder(folder)
        for weights in args.weights.split(","):
            patcher = fp32_sd15()
            layers = transformer_linears(patcher)
            if weights == "fp8":
                store_as_fp8(patcher)
            bests, plains = [], []  # per algorithm
            for algo in args.algos.split(","):
                name = f"{algo}.safetensors"
                save_file(adapter_file(algo, layers, g), os.path.join(folder, name))
                with contextlib.redirect_stdout(io.StringIO()):  # the node prints its load report
                    bypassed = node.load(patcher, name, 1.0, "bypass")["result"][0]
                # warm: adapters moved, DoRA scales and rotations built; the adapter must show
                _, y_bypassed = timed_forward(bypassed, inputs, True)
                _, y_plain = timed_forward(patcher, inputs, False)
                assert not torch.equal(y_bypassed, y_plain), f"{algo}: bypass changed nothing"
                patched, plain = [], []
                for _ in range(args.repeats):
                    plain.append(timed_forward(patcher, inputs, False)[0])
                    patched.append(timed_forward(bypassed, inputs, True)[0])
                bests.append(min(patched))
                plains.append(min(plain))
            print(f"{weights:8s} {min(plains):8.2f} " + " ".join(f"{b / p:6.3f}x" for b, p in zip(bests, plains)),
                  flush=True)


if __name__ == "__main__":
    main()
