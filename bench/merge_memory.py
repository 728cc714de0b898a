"""Peak memory of `python -m lycoris_core merge` (streamed merge to checkpoint) vs the base file size.

Writes a ~1 GB fp32 base state dict (SDXL-like 1280/5120/10240-wide Linear layers and 3x3 convs)
and a rank-32 LoRA covering every layer, runs the merge in a child process and reads the child's
peak RSS from resource.getrusage(RUSAGE_CHILDREN).ru_maxrss (Linux: KiB). Also runs the child
with only `import lycoris_core` to show the interpreter + torch floor. Goal: peak <= 1.25x base.

    .venv/bin/python bench/merge_memory.py [--gib 1.0] [--dtype fp16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from lycoris_core.safe_io import save_tensors_atomic  # noqa: E402

LAYERS = [(1280, 1280), (10240, 1280), (1280, 5120), (1280, 1280, 3, 3)]


def build(folder: str, gib: float) -> tuple[str, str]:
    base, lora = {}, {}
    gen = torch.Generator().manual_seed(0)
    total, i = 0, 0
    while total < gib * 2**30:
        shape = LAYERS[i % len(LAYERS)]
        key = f"model.diffusion_model.blocks.{i}.layer"
        w = torch.randn(shape, generator=gen) * 0.02
        base[key + ".weight"] = w
        base[key + ".bias"] = torch.zeros(shape[0])
        total += w.numel() * 4 + shape[0] * 4
        name = f"lora_unet_blocks_{i}_layer"
        cols = int(torch.tensor(shape[1:]).prod())
        lora[name + ".lora_down.weight"] = (torch.randn(32, cols, generator=gen) * 0.01).reshape(32, *shape[1:])
        up_shape = (shape[0], 32) + ((1, 1) if len(shape) == 4 else ())
        lora[name + ".lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.01
        lora[name + ".alpha"] = torch.tensor(16.0)
        i += 1
    base_path, lora_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "lora.safetensors")
    save_tensors_atomic(base_path, base)
    save_tensors_atomic(lora_path, {k: v.half() for k, v in lora.items()})
    return base_path, lora_path


def child_peak(cmd) -> tuple[int, float]:
    """Peak RSS (bytes) of the child that ran `cmd`: RUSAGE_CHILDREN is the max over waited children,
    so each measurement runs in its own fresh intermediate process."""
    probe = (
        "import resource, subprocess, sys; "
        f"rc = subprocess.run({cmd!r}, cwd={ROOT!r}, stdout=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    kib, rc = out.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        raise SystemExit(f"child failed ({rc}): {out.stderr[-2000:]}")
    return int(kib) * 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="base file size in GiB (default 1)")
    parser.add_argument("--dtype", default=None, help="merge --dtype (default: as in the base)")
    parser.add_argument("--keep", help="folder to build in (kept); default a temporary folder")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="merge_memory_")
    base_path, lora_path = build(folder, args.gib)
    out_path = os.path.join(folder, "merged.safetensors")
    size = os.path.getsize(base_path)
    floor, _ = child_peak([sys.executable, "-c", "import lycoris_core"])
    cmd = [sys.executable, "-m", "lycoris_core", "merge", "--base", base_path, "--adapter", lora_path, "--out", out_path,
           "--overwrite"]  # a --keep folder may hold the last run's output
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    peak, elapsed = child_peak(cmd)
    print(f"base file {size / 2**20:.0f} MiB; merge child peak RSS {peak / 2**20:.0f} MiB "
          f"= {peak / size:.3f}x the base file ({elapsed:.1f} s); "
          f"interpreter+torch floor {floor / 2**20:.0f} MiB; above the floor {(peak - floor) / 2**20:.0f} MiB")
    print(f"goal <= 1.25x: {'met' if peak <= 1.25 * size else 'NOT met'}")
    if not args.keep:
        for name in ("base.safetensors", "lora.safetensors", "merged.safetensors"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        os.rmdir(folder)


if __name__ == "__main__":
    main()
