"""Merge speed: lycoris_core vs lycoris-lora on SDXL-shaped layers, side by side in one process.

Builds a synthetic model with the layer shapes of SDXL's 1280-channel transformer blocks and
resnets (random weights), trains nothing: wraps it with lycoris-lora for LoRA, LoHa and LoKr,
randomises and saves the adapter, then times, from the same file into the same base weights,
  ours:      load_adapter_file + merge_into_state_dict(inplace=True) on a copy
  reference: create_lycoris_from_weights + apply_to + merge_to  (lycoris-lora's own merge)
and prints the ratio. Median of --repeats runs each.

    .venv/bin/python bench/merge_speed.py [--blocks 2] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lycoris_core import load_adapter_file, merge_into_state_dict  # noqa: E402


class TransformerBlock(nn.Module):
    """SDXL BasicTransformerBlock shapes at 1280 channels (context 2048)."""

    def __init__(self, dim=1280, context=2048):
        super().__init__()
        self.attn1 = nn.ModuleDict({n: nn.Linear(dim, dim, bias=False) for n in ("to_q", "to_k", "to_v")})
        self.attn1_out = nn.Linear(dim, dim)
        self.attn2 = nn.ModuleDict({"to_q": nn.Linear(dim, dim, bias=False),
                                    "to_k": nn.Linear(context, dim, bias=False),
                                    "to_v": nn.Linear(context, dim, bias=False)})
        self.attn2_out = nn.Linear(dim, dim)
        self.ff_proj = nn.Linear(dim, dim * 8)
        self.ff_out = nn.Linear(dim * 4, dim)


class Resnet(nn.Module):
    def __init__(self, dim=1280):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.time_emb_proj = nn.Linear(dim, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)


class SDXLSlice(nn.Module):
    def __init__(self, blocks: int):
        super().__init__()
        self.proj_in = nn.Linear(1280, 1280)
        self.transformer_blocks = nn.ModuleList(TransformerBlock() for _ in range(blocks))
        self.proj_out = nn.Linear(1280, 1280)
        self.resnets = nn.ModuleList(Resnet() for _ in range(2))


ALGOS = {
    "lora": dict(algo="lora", linear_dim=16, linear_alpha=8, conv_dim=8, conv_alpha=4),
    "loha": dict(algo="loha", linear_dim=16, linear_alpha=8, conv_dim=8, conv_alpha=4),
    "lokr": dict(algo="lokr", linear_dim=16, linear_alpha=8, conv_dim=8, conv_alpha=4, factor=8),
}


def make_adapter(model: nn.Module, algo: str, path: str) -> None:
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
    kwargs = dict(ALGOS[algo])
    net = create_lycoris(copy.deepcopy(model), 1.0, **kwargs)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.01)
    net.save_weights(path, torch.float16, {})


def time_ours(state_dict, path) -> float:
    # like the reference (which merges into a model copy made before its timer), merge into a copy
    target = {k: v.clone() for k, v in state_dict.items()}
    start = time.perf_counter()
    adapter_file = load_adapter_file(path)
    merged, coverages = merge_into_state_dict(target, [(adapter_file, 1.0)], inplace=True)
    elapsed = time.perf_counter() - start
    assert coverages[0].matched and not coverages[0].unmatched, coverages[0].lines()
    del merged
    return elapsed


def time_reference(model, path) -> float:
    from lycoris import create_lycoris_from_weights

    target = copy.deepcopy(model)
    start = time.perf_counter()
    network, _ = create_lycoris_from_weights(1.0, path, target)
    network.apply_to()
    network.merge_to(1.0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import logging

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    model = SDXLSlice(args.blocks)
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state_dict.values())
    print(f"synthetic SDXL slice: {len(state_dict)} tensors, {params / 1e6:.1f} M parameters, {args.threads} threads")
    print(f"{'algo':6s} {'ours s':>8s} {'lycoris s':>10s} {'speed-up':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ALGOS:
            path = os.path.join(tmp, f"{algo}.safetensors")
            make_adapter(model, algo, path)
            ours, ref = [], []
            for _ in range(args.repeats):
                ours.append(time_ours(state_dict, path))
                ref.append(time_reference(model, path))
            o, r = statistics.median(ours), statistics.median(ref)
            print(f"{algo:6s} {o:8.3f} {r:10.3f} {r / o:8.2f}x")


if __name__ == "__main__":
    main()
