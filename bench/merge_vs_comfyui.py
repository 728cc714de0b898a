"""Merge speed inside ComfyUI: Load LyCORIS vs ComfyUI's own LoraLoader, same file, same run.

A full-size SD1.5 UNet (ComfyUI's SD15 model class, random fp16 weights, on the CPU) and, per
algorithm, one adapter file with rank 16 (alpha 8) on every Linear of its transformer blocks
(LoRA; LoHa; LoKr with an 8x8 w1 and a rank-16 w2), random factors in kohya names. Timed: load
+ patch, i.e. the loader node on the model, then `patch_model()` computing every patched weight
as ComfyUI does when it loads the model (unpatched after the timer). Runs alternate between the
two loaders; prints the median times and the ratio ours / ComfyUI (<= 1: no slower).

Runs on the ComfyUI that tests/comfyui_runtime.py finds (COMFYUI_PATH first), e.g.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python bench/merge_vs_comfyui.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from comfyui_runtime import import_comfy, import_pack, use_loras_folder  # noqa: E402

RANK, ALPHA, LOKR_FACTOR = 16, 8.0, 8


def sd15_patcher():
    """ComfyUI's SD1.5 BaseModel at full size (configured by ComfyUI's own detection from the
    diffusers layout) with random fp16 weights, in a CPU ModelPatcher."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # diffusers' defaults are SD1.5's UNet but for its text width
        diffusers_layout = UNet2DConditionModel(cross_attention_dim=768).state_dict()
    config = comfy.supported_models.SD15(comfy.model_detection.unet_config_from_diffusers_unet(diffusers_layout))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def transformer_linears(patcher) -> dict:
    """kohya module name -> weight shape, for every Linear inside a transformer block (one name
    per layer: ComfyUI knows each under its diffusers and its original name)."""
    import comfy.lora

    weights = patcher.model.state_dict()
    layers = {}
    for name, key in comfy.lora.model_lora_keys_unet(patcher.model, {}).items():
        if name.startswith("lora_unet_") and "transformer_blocks" in key and weights[key].dim() == 2:
            layers.setdefault(key, (name, tuple(weights[key].shape)))
    return dict(layers.values())


def adapter_tensors(algo: str, layers: dict, g) -> dict:
    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    tensors = {}
    for name, (out, inp) in layers.items():
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        if algo == "lora":
            tensors.update({f"{name}.lora_up.weight": r(out, RANK), f"{name}.lora_down.weight": r(RANK, inp)})
        elif algo == "loha":
            for j in "12":
                tensors.update({f"{name}.hada_w{j}_a": r(out, RANK), f"{name}.hada_w{j}_b": r(RANK, inp)})
        else:
            f = LOKR_FACTOR
            tensors.update({f"{name}.lokr_w1": r(f, f), f"{name}.lokr_w2_a": r(out // f, RANK),
                            f"{name}.lokr_w2_b": r(RANK, inp // f)})
    return tensors


def time_load_and_patch(load) -> float:
    start = time.perf_counter()
    patched = load()
    patched.patch_model()
    elapsed = time.perf_counter() - start
    patched.unpatch_model()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--algos", default="lora,loha,lokr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_comfy()
    pack = import_pack()
    import nodes
    from safetensors.torch import save_file

    from lycoris_pack.nodes import cache

    patcher = sd15_patcher()
    layers = transformer_linears(patcher)
    params = sum(v.numel() for v in patcher.model.diffusion_model.state_dict().values())
    print(f"SD1.5 UNet: {params / 1e6:.0f} M parameters (fp16); {len(layers)} transformer Linears at rank {RANK}; "
          f"{args.threads} threads")
    ours_node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()

    def ours(name):
        cache.clear()  # decode the file every run, as ComfyUI's loader reads it every run
        with contextlib.redirect_stdout(io.StringIO()):  # the node prints its load report
            return ours_node.load(patcher, name, 1.0, "merge")["result"][0]

    def comfyui(name):
        return nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)[0]  # fresh: no cached file

    print(f"{'algo':6s} {'ours s':>8s} {'ComfyUI s':>10s} {'ours/ComfyUI':>13s}")
    with tempfile.TemporaryDirectory() as folder:
        use_loras_folder(folder)
        g = torch.Generator().manual_seed(1)
        for algo in args.algos.split(","):
            name = f"{algo}.safetensors"
            save_file(adapter_tensors(algo, layers, g), os.path.join(folder, name))
            times = {"ours": [], "comfyui": []}
            loaders = [("ours", ours), ("comfyui", comfyui)]
            time_load_and_patch(lambda: ours(name))  # warm the file cache and both code paths
            time_load_and_patch(lambda: comfyui(name))
            for i in range(args.repeats):
                for label, load in loaders if i % 2 == 0 else loaders[::-1]:
                    times[label].append(time_load_and_patch(lambda: load(name)))
            o, c = statistics.median(times["ours"]), statistics.median(times["comfyui"])
            print(f"{algo:6s} {o:8.2f} {c:10.2f} {o / c:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
