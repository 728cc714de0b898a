"""Load LyCORIS Stack's speed on a full-size SD1.5 UNet inside ComfyUI, side by side in one process.

The model is ComfyUI's SD15 class at full size with random weights, built as bench/merge_vs_comfyui.py
builds it; the adapter files are random factors at rank 16 (alpha 8, LoKr with an 8x8 w1) on every
Linear of its transformer blocks (bench/bypass_model.py's layers and factors), written as fp16 files
to a temporary loras folder. Four measurements, each the best of `--repeats` interleaved runs:

(a) merge, five files (3 LoRA, 2 LoKr) on the fp16 model: load + patch, i.e. the stack node's call
    (rows in mode merge) and then ComfyUI's `load_models_gpu`, which computes every patched weight,
    against five chained core `LoraLoaderModelOnly` nodes and the same `load_models_gpu`. Each run
    reads and decodes the files (the pack's decoded-file and hash caches are emptied; ComfyUI's
    loaders are fresh nodes), and the models are unloaded after the timer.
(b) bypass, the same five rows in mode bypass on the model computed in fp32 (the CPU has no fast
    fp16): one forward of the diffusion model at 512x512 (a 64x64 latent, 77-token context, batch 2
    as CFG runs cond and uncond) against the same forward without adapters.
(c) a mixed stack in bypass (LoRA, LoKr, LoHa, LoRA, DoRA): the same ratio, and each row alone as a
    one-row stack, so the table shows what each row costs and whether the stack costs more than the
    sum of its rows.
(d) the decoded-file cache: files opened by the stack's first run, by a re-run of the same rows and
    by a re-run with one strength changed (every Python-level open under the loras folder is counted
    through an audit hook: decoding, hashing, sidecars).

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python bench/stack_speed.py [--repeats 3] [--threads 2]
        [--latent 64] [--batch 2] [--parts abcd] [--quick]

`--quick` (a 16x16 latent, batch 1, one repeat) checks that every part runs; its times mean little.
No test runs it: building the full-size model and patching it still took 8 minutes on the project's
shared 2-core CPU, past the 60 s a test may take.
Run on ComfyUI 0.28 for the figures the README gives; the pinned March-2024 runtime works too.
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

from comfyui_runtime import import_comfy, import_pack, use_loras_folder  # noqa: E402

MERGE_ROWS = ("lora", "lora", "lora", "lokr", "lokr")
MIXED_ROWS = ("lora", "lokr", "loha", "lora", "dora")


class FileOpens:
    """Counts Python-level opens of files under one folder (an audit hook: it sees the pack's
    readers, which all open through Python; hooks cannot be removed, so it is switched on and off)."""

    def __init__(self, folder: str):
        self.folder = os.path.realpath(folder) + os.sep
        self.paths: list[str] = []
        self.active = False
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], str):
            if os.path.realpath(args[0]).startswith(self.folder):
                self.paths.append(os.path.basename(args[0]))

    @contextlib.contextmanager
    def counting(self):
        self.paths, self.active = [], True
        try:
            yield self
        finally:
            self.active = False


def write_files(folder: str, rows, layers: dict, g, tag: str) -> list[str]:
    """One fp16 file per row (its own random factors), named `<tag><n>_<algo>.safetensors`."""
    from bypass_model import adapter_file
    from safetensors.torch import save_file

    names = []
    for n, algo in enumerate(rows, 1):
        name = f"{tag}{n}_{algo}.safetensors"
        save_file({k: v.to(torch.float16) for k, v in adapter_file(algo, layers, g).items()},
                  os.path.join(folder, name))
        names.append(name)
    return names


def run_stack(pack, model, names, mode, strengths=None):
    """The registered LycorisStack node on `model`, its rows as API JSON gives them; the patched model."""
    node = pack.NODE_CLASS_MAPPINGS["LycorisStack"]
    strengths = strengths or [1.0] * len(names)
    fields = {}
    for n, (name, strength) in enumerate(zip(names, strengths), 1):
        fields.update({f"lora_name_{n}": name, f"strength_model_{n}": strength, f"strength_clip_{n}": 0.0,
                       f"mode_{n}": mode})
    with contextlib.redirect_stdout(io.StringIO()):  # the node prints its report
        if hasattr(node, "define_schema"):  # V3 node (ComfyUI 0.28): the dynamic combo's nested dict
            return node.execute(model=model, rows={"rows": str(len(names)), **fields}).args[0]
        return node().load(model, str(len(names)), **{f"rows.{k}": v for k, v in fields.items()})["result"][0]


def clear_pack_caches(pack) -> None:
    """Forget decoded files and file hashes, so the next load reads every file as a first run does."""
    from lycoris_pack.lycoris_core import trigger_words
    from lycoris_pack.nodes import cache

    cache.clear()
    trigger_words._HASHES.clear()


def load_and_patch(load) -> tuple[float, object]:
    """(seconds, patched weights sample) for `load()` + ComfyUI's load_models_gpu; unloaded after."""
    import comfy.model_management as mm

    start = time.perf_counter()
    patcher = load()
    mm.load_models_gpu([patcher])
    elapsed = time.perf_counter() - start
    sample = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()
              if "attn1.to_q.weight" in k}
    mm.unload_all_models()
    return elapsed, sample


def part_merge(pack, patcher, folder, layers, g, repeats) -> str:
    import nodes

    names = write_files(folder, MERGE_ROWS, layers, g, "merge")
    base = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items() if "attn1.to_q.weight" in k}

    def ours():
        clear_pack_caches(pack)
        return run_stack(pack, patcher, names, "merge")

    def comfyui():
        model = patcher
        for name in names:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        return model

    _, mine = load_and_patch(ours)  # warm both code paths; both must change the same weights alike
    _, theirs = load_and_patch(comfyui)
    for key in base:
        effect = (theirs[key].float() - base[key].float()).norm()
        assert effect > 0, f"{key}: ComfyUI's loaders changed nothing"
        error = float((mine[key].float() - theirs[key].float()).norm() / effect)
        assert error < 1e-2, f"{key}: the stack's merge differs from ComfyUI's by {error:.1e} of the effect (fp16)"
    times = {"ours": [], "comfyui": []}
    for i in range(repeats):
        order = [("ours", ours), ("comfyui", comfyui)]
        for label, load in order if i % 2 == 0 else order[::-1]:
            times[label].append(load_and_patch(load)[0])
    o, c = min(times["ours"]), min(times["comfyui"])
    return (f"(a) merge, 5 files ({', '.join(MERGE_ROWS)}), load + patch (fp16 weights):\n"
            f"    Load LyCORIS Stack {o:7.2f} s   5 chained LoraLoaderModelOnly {c:7.2f} s   ratio {o / c:.2f}x")


def timed_forwards(configs: dict, plain, inputs, repeats) -> dict:
    """Best seconds per config (label -> patched model, bypass injected around each call) and "plain"."""
    from bypass_model import timed_forward

    _, y_plain = timed_forward(plain, inputs, False)
    for label, model in configs.items():  # warm: adapters moved and built; each must show
        _, y = timed_forward(model, inputs, True)
        assert not torch.equal(y, y_plain), f"{label}: bypass changed nothing"
    times = {label: [] for label in ["plain", *configs]}
    for _ in range(repeats):
        times["plain"].append(timed_forward(plain, inputs, False)[0])
        for label, model in configs.items():
            times[label].append(timed_forward(model, inputs, True)[0])
    return {label: min(values) for label, values in times.items()}


def computed_in_fp32(patcher):
    """The model's weights in fp32 and no manual cast, as bench/bypass_model.py runs it (in place)."""
    patcher.model.diffusion_model.to(torch.float32)
    patcher.model.diffusion_model.dtype = torch.float32
    patcher.model.manual_cast_dtype = None
    return patcher


def part_bypass(pack, patcher, folder, layers, g, repeats, inputs, parts):
    """(b) and (c): yields the table's lines as each measurement ends."""
    if "b" in parts:
        names = write_files(folder, MERGE_ROWS, layers, g, "bypass")
        best = timed_forwards({"stack": run_stack(pack, patcher, names, "bypass")}, patcher, inputs, repeats)
        yield (f"(b) bypass forward, the 5 rows of (a) (fp32 weights):\n"
               f"    stack {best['stack']:7.2f} s   no adapters {best['plain']:7.2f} s   "
               f"ratio {best['stack'] / best['plain']:.3f}x")
    if "c" in parts:
        names = write_files(folder, MIXED_ROWS, layers, g, "mixed")
        configs = {f"row {n} {algo} alone": run_stack(pack, patcher, [name], "bypass")
                   for n, (algo, name) in enumerate(zip(MIXED_ROWS, names), 1)}
        configs["stack, 5 rows"] = run_stack(pack, patcher, names, "bypass")
        best = timed_forwards(configs, patcher, inputs, repeats)
        plain = best["plain"]
        yield f"(c) bypass forward, mixed stack ({', '.join(MIXED_ROWS)}), no adapters {plain:.2f} s:"
        yield f"    {'':22s} {'s':>7s} {'ratio':>7s} {'extra s':>8s}"
        for label in configs:
            yield f"    {label:22s} {best[label]:7.2f} {best[label] / plain:6.3f}x {best[label] - plain:8.2f}"
        rows_sum = sum(best[label] - plain for label in configs if label.endswith("alone"))
        yield f"    {'sum of the rows alone':22s} {'':7s} {'':7s} {rows_sum:8.2f}"


def part_cache(pack, patcher, folder, layers, g) -> list[str]:
    names = write_files(folder, MIXED_ROWS, layers, g, "cache")
    opens = FileOpens(folder)
    clear_pack_caches(pack)
    counts = []
    for strengths in ([1.0] * 5, [1.0] * 5, [1.0, 0.5, 1.0, 1.0, 1.0]):
        with opens.counting():
            run_stack(pack, patcher, names, "merge", strengths)
        if not counts:  # the hook sees the readers, or the re-runs' zeros would mean nothing
            assert set(opens.paths) == set(names), f"first run opened {sorted(set(opens.paths))}, not {names}"
        counts.append(f"{len(opens.paths)} opens of {len(set(opens.paths))} files")
    return [f"(d) decoded-file cache, 5 rows (merge): first run {counts[0]}; same rows again "
            f"{counts[1]}; one strength changed {counts[2]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: a 512x512 image)")
    parser.add_argument("--batch", type=int, default=2, help="images per forward (2: cond + uncond)")
    parser.add_argument("--parts", default="abcd", help="which measurements: any of a, b, c, d")
    parser.add_argument("--quick", action="store_true", help="16x16 latent, batch 1, one repeat: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.latent, args.batch, args.repeats = 16, 1, 1
    torch.set_num_threads(args.threads)
    root = import_comfy()
    pack = import_pack()
    from merge_vs_comfyui import sd15_patcher, transformer_linears

    version = "?"
    with contextlib.suppress(OSError):
        with open(os.path.join(root, "comfyui_version.py"), encoding="utf-8") as handle:
            version = handle.read().rsplit("=", 1)[-1].strip().strip("\"'")
    patcher = sd15_patcher()
    layers = transformer_linears(patcher)
    print(f"SD1.5 UNet (ComfyUI {version}), rank 16 on {len(layers)} transformer Linears, {args.threads} threads, "
          f"best of {args.repeats}; forwards: {args.latent}x{args.latent} latent, batch {args.batch}", flush=True)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch, 4, args.latent, args.latent, generator=g),
              torch.tensor([500.0] * args.batch), torch.randn(args.batch, 77, 768, generator=g))
    with tempfile.TemporaryDirectory() as folder:
        use_loras_folder(folder)
        if "a" in args.parts:
            print(part_merge(pack, patcher, folder, layers, g, args.repeats), flush=True)
        if "d" in args.parts:
            print("\n".join(part_cache(pack, patcher, folder, layers, g)), flush=True)
        if "b" in args.parts or "c" in args.parts:
            for line in part_bypass(pack, computed_in_fp32(patcher), folder, layers, g, args.repeats, inputs,
                                    args.parts):
                print(line, flush=True)


if __name__ == "__main__":
    main()
