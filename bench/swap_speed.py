"""Swap cost inside ComfyUI 0.28's executor: re-queueing a workflow with only the adapter's strength,
its file or its schedule changed, until the sampler's first model step is done, eager and under
core's TorchCompileModel.

Users who switch adapters per request (API servers, A/B grids) re-queue the same workflow; ComfyUI
re-runs only the nodes whose inputs changed (the loader, TorchCompileModel after it, the sampler),
then `load_models_gpu` swaps the patched model in. What that costs depends on the loader: a merge
rewrites every patched weight, a bypass rewrites none; under torch.compile a change the compiled
code guards on recompiles frames (minutes on a whole UNet).

The model is ComfyUI 0.28's SD1.5 class at full size with random weights (bench/merge_vs_comfyui.py),
computed in fp32 on the CPU, handed to the workflow by a bench node in place of a checkpoint loader
(cached by the executor as a checkpoint loader is). Adapters: two kohya LoRA files of the same
structure (rank 16 on every transformer Linear). The workflow, run in-process by
`execution.PromptExecutor` under the inference mode it sets, one sampler step at an 8x8 latent (the
weights, not the pixels, are what a swap touches) with CFG (cond and uncond in one batch):

    model -> loader [-> TorchCompileModel (inductor)] -> KSampler (1 step) -> sink

Engines: `bypass` (Load LyCORIS model-only, mode bypass), `merge` (the same, mode merge), `core`
(core's LoraLoaderModelOnly). Per engine and mode: a warm-up run (the compile), then each swap
alternating between two states, each followed by a re-run with only the seed changed (nothing to
re-patch or recompile). Two figures per swap, medians over the repeats, each the swap run's minus the
re-run's, from timestamps around BaseModel.apply_model (outside the compiled region): the time from
queueing to the first model call (the loader, then ComfyUI swapping the patched model in: the weight
work) and the first model call itself (recompiles, lazy per-call set-up). Dynamo's figures per swap: frames
compiled (after the warm-up every one is a recompile) and graph breaks, from
torch._dynamo.utils.counters; `dynamo.reset()` between engines so one engine's recompiles do not use
up another's recompile limit. Swaps: `strength` (1.0 <-> 0.5), `file` (A <-> B), and for bypass
`schedule` (LyCORIS Schedule keyframes 0:1, 0.5:0 <-> 0:0.6, 0.5:0.2, already connected).

    COMFYUI_PATH=.cache/comfyui-recent .venv/bin/python bench/swap_speed.py [--quick] [--repeats 2]
        [--engines bypass,merge,core] [--modes eager,compiled] [--threads 2] [--latent 8]
        [--compiled-swaps 1]

`--quick`: eager only, one repeat. Compiled rows make one swap each (`--compiled-swaps`): the first
compile of the UNet takes many minutes on a CPU. Needs ComfyUI >= 0.3.x (TorchCompileModel, the executor API).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from comfyui_runtime import import_comfy, import_pack, use_loras_folder  # noqa: E402

FILES = ("swap_a.safetensors", "swap_b.safetensors")
STRENGTHS = (1.0, 0.5)
SCHEDULES = ("0:1, 0.5:0", "0:0.6, 0.5:0.2")
SWAPS = {"bypass": ("strength", "file", "schedule"), "merge": ("strength", "file"), "core": ("strength", "file")}


class Clock:
    """Times of the first model call after `start()`: its start and its end (perf_counter); and the
    latent the last run sampled."""

    def __init__(self):
        self.queued = self.first_start = self.first_end = self.latent = None

    def start(self):
        self.queued, self.first_start, self.first_end = time.perf_counter(), None, None

    def install(self):
        import comfy.model_base

        original = comfy.model_base.BaseModel.apply_model
        clock = self

        def apply_model(model, *args, **kwargs):
            if clock.first_start is None:
                clock.first_start = time.perf_counter()
            out = original(model, *args, **kwargs)
            if clock.first_end is None:
                clock.first_end = time.perf_counter()
            return out

        comfy.model_base.BaseModel.apply_model = apply_model


CLOCK = Clock()


def bench_nodes(patcher) -> dict:
    """In-process nodes standing in for the checkpoint loader, the text encoder and an output."""

    class SwapBenchModel:
        CATEGORY, FUNCTION, RETURN_TYPES = "bench", "load", ("MODEL",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return (patcher,)

    class SwapBenchConditioning:
        CATEGORY, FUNCTION, RETURN_TYPES = "bench", "encode", ("CONDITIONING",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0})}}

        def encode(self, seed):
            g = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, 77, 768, generator=g), {}]],)

    class SwapBenchSink:
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "bench", "take", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}}

        def take(self, samples):
            CLOCK.latent = samples["samples"]
            return {}

    return {cls.__name__: cls for cls in (SwapBenchModel, SwapBenchConditioning, SwapBenchSink)}


def prompt(engine: str, compiled: bool, state: dict, seed: int, latent: int) -> dict:
    """The API workflow of one run: `state` holds strength, file and schedule keyframes."""
    graph = {
        "model": {"class_type": "SwapBenchModel", "inputs": {}},
        "pos": {"class_type": "SwapBenchConditioning", "inputs": {"seed": 1}},
        "neg": {"class_type": "SwapBenchConditioning", "inputs": {"seed": 2}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": latent * 8, "height": latent * 8,
                                                                 "batch_size": 1}},
    }
    model = ["model", 0]
    if engine != "none":
        if state.get("schedule"):
            graph["schedule"] = {"class_type": "LycorisSchedule", "inputs": {
                "preset": "always", "keyframes": state["schedule"], "interpolation": "hold",
                "negative_multiplier": 1.0}}
        graph["loader"] = _loader(engine, state)
        model = ["loader", 0]
    if compiled:
        graph["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
        model = ["compile", 0]
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    graph["sink"] = {"class_type": "SwapBenchSink", "inputs": {"samples": ["sampler", 0]}}
    return graph


def _loader(engine: str, state: dict) -> dict:
    if engine == "core":
        return {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["model", 0], "lora_name": state["file"], "strength_model": state["strength"]}}
    node = {"class_type": "LycorisLoaderModelOnly", "inputs": {
        "model": ["model", 0], "lora_name": state["file"], "strength_model": state["strength"], "mode": engine,
        "block_weights": ""}}
    if state.get("schedule"):
        node["inputs"]["schedule"] = ["schedule", 0]
    return node


class Server:
    """What PromptExecutor asks of ComfyUI's server: no client, messages dropped."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self, *args, **kwargs):
        pass


class Dynamo:
    """Dynamo's counters around one run: frames compiled, graph breaks, and the recompile reasons
    and limit warnings it logged."""

    def __init__(self):
        self.messages: list[str] = []
        seen = []
        handler = logging.Handler()  # on both loggers: a record that reaches both is kept once

        def emit(record):
            if not seen or seen[-1] is not record:
                seen[:] = [record]
                self.messages.append(record.getMessage())

        handler.emit = emit
        torch._logging.set_logs(recompiles=True)
        for name in ("torch._dynamo.guards.__recompiles", "torch._dynamo"):
            logging.getLogger(name).addHandler(handler)

    @staticmethod
    def snapshot() -> tuple[int, int]:
        counters = torch._dynamo.utils.counters
        return counters["frames"]["ok"], sum(counters["graph_break"].values())

    def reasons(self) -> tuple[list[str], int]:
        """(the recompiles dynamo logged since the last call: function and reason, how many times it
        hit its recompile limit, after which that function runs uncompiled)."""
        found, limits = [], 0
        for message in self.messages:
            lines = [line.strip() for line in message.strip().splitlines()]
            if lines and lines[0].startswith("torch._dynamo hit config."):
                limits += 1
            elif lines and lines[0].startswith("Recompiling function"):
                found.append(lines[0].replace("Recompiling function ", "") + ": "
                             + next((line for line in lines[1:] if line.startswith("-")), "").lstrip("- "))
        self.messages.clear()
        return found, limits


class WorkflowFailed(RuntimeError):
    """The prompt did not run; the row says why instead of a figure."""


class Runner:
    def __init__(self, args, dynamo: Dynamo):
        import execution

        self.args, self.dynamo = args, dynamo
        self.executor = execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self.seed = 0

    def run(self, engine: str, compiled: bool, state: dict, seed: int | None = None) -> dict:
        """One queued prompt; the seed changes every run (unless given) so the sampler always runs."""
        self.seed += 1
        graph = prompt(engine, compiled, state, self.seed if seed is None else seed, self.args.latent)
        frames, breaks = self.dynamo.snapshot()
        CLOCK.start()
        with contextlib.redirect_stdout(io.StringIO()):  # the loaders print their reports
            self.executor.execute(graph, uuid.uuid4().hex, {}, ["sink"])
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise WorkflowFailed(errors[0]["exception_message"].strip().splitlines()[-1] if errors
                                 else str(self.executor.status_messages))
        frames_after, breaks_after = self.dynamo.snapshot()
        reasons, limits = self.dynamo.reasons()
        return {"latent": CLOCK.latent, "to_step": CLOCK.first_end - CLOCK.queued, "before_step": CLOCK.first_start - CLOCK.queued,
                "frames": frames_after - frames, "breaks": breaks_after - breaks, "reasons": reasons,
                "limits": limits}


def swap_states(swap: str) -> list[dict]:
    """The two states a swap alternates between (everything else fixed)."""
    base = {"strength": STRENGTHS[0], "file": FILES[0], "schedule": SCHEDULES[0] if swap == "schedule" else ""}
    if swap == "strength":
        return [base, dict(base, strength=STRENGTHS[1])]
    if swap == "file":
        return [base, dict(base, file=FILES[1])]
    return [base, dict(base, schedule=SCHEDULES[1])]


def bench_engine(args, dynamo, engine: str, compiled: bool, repeats: int) -> list[dict]:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    torch._dynamo.reset()
    runner = Runner(args, dynamo)
    mode = "compiled" if compiled else "eager"
    state = swap_states("strength")[0]
    with_adapter = runner.run(engine, compiled, state, seed=999_999_999)["latent"]
    if torch.equal(with_adapter, runner.run(engine, compiled, dict(state, strength=0.0), seed=999_999_999)["latent"]):
        raise SystemExit(f"{engine} {mode}: the adapter changes nothing in the sampled latent; no swap to time")
    rows = []
    for swap in SWAPS[engine]:
        row = {"engine": engine, "mode": mode, "swap": swap}
        states = swap_states(swap)
        try:
            warm = runner.run(engine, compiled, states[0])  # first run of this graph: compile, file decode
            runner.run(engine, compiled, states[0])
            runs = []
            for i in range(repeats * 2 if not compiled else args.compiled_swaps):
                swapped = runner.run(engine, compiled, states[(i + 1) % 2])
                runs.append((swapped, runner.run(engine, compiled, states[(i + 1) % 2])))
        except WorkflowFailed as error:
            rows.append(dict(row, failed=str(error)))
            print(f"  {engine} {mode} {swap}: failed: {error}", flush=True)
            continue
        row.update(
            cost=statistics.median(s["to_step"] - r["to_step"] for s, r in runs),
            before=statistics.median(s["before_step"] - r["before_step"] for s, r in runs),
            step=statistics.median(r["to_step"] - r["before_step"] for _, r in runs),
            frames=max(s["frames"] for s, _ in runs), breaks=max(s["breaks"] for s, _ in runs),
            limits=sum(s["limits"] for s, _ in runs), warm=warm["to_step"], warm_frames=warm["frames"],
            warm_breaks=warm["breaks"], warm_limits=warm["limits"],
            reasons=[m for s, _ in runs for m in s["reasons"]])
        rows.append(row)
        print(f"  {engine} {mode} {swap}: {row['before'] * 1000:.0f} ms before the step, first step "
              f"{row['cost'] - row['before']:+.1f} s, "
              f"frames compiled per swap {[s['frames'] for s, _ in runs]}, warm-up {warm['to_step']:.1f} s "
              f"({warm['frames']} frames, {warm['breaks']} graph breaks, recompile limit hit {warm['limits']} times)",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="eager only, one repeat")
    parser.add_argument("--repeats", type=int, default=2, help="swaps each way per row")
    parser.add_argument("--engines", default="bypass,merge,core")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--compiled-swaps", type=int, default=1,
                        help="swaps per row when compiled (a recompile of the whole UNet takes minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=8, help="latent side (8: a 64x64 image; the step is noise "
                        "the swap is measured over, 17 s at 32 on a loaded 2-core CPU)")
    args = parser.parse_args()
    if args.quick:
        args.modes, args.repeats = "eager", 1
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import_comfy()
    pack = import_pack()
    import comfy.model_base
    import nodes
    from safetensors.torch import save_file

    if not hasattr(comfy.model_base.BaseModel, "apply_model") or not hasattr(nodes, "init_extra_nodes"):
        raise SystemExit("this ComfyUI is too old for the swap bench (needs 0.3.x or newer)")
    from bypass_model import fp32_sd15
    from merge_vs_comfyui import adapter_tensors, transformer_linears

    root = os.path.dirname(nodes.__file__)
    if not asyncio.run(nodes.load_custom_node(os.path.join(root, "comfy_extras", "nodes_torch_compile.py"),
                                               module_parent="comfy_extras")):
        raise SystemExit("core's TorchCompileModel did not load")
    patcher = fp32_sd15()
    nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    nodes.NODE_CLASS_MAPPINGS.update(bench_nodes(patcher))
    CLOCK.install()
    dynamo = Dynamo()
    layers = transformer_linears(patcher)
    print(f"SD1.5 UNet (fp32, CPU, {args.threads} threads), {args.latent}x{args.latent} latent, 1 step, CFG 4; "
          f"LoRA rank 16 on {len(layers)} transformer Linears; torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        use_loras_folder(folder)
        g = torch.Generator().manual_seed(1)
        for name in FILES:
            save_file(adapter_tensors("lora", layers, g), os.path.join(folder, name))
        for mode in args.modes.split(","):
            if mode == "eager":  # (compiled: one more whole-UNet compile for a figure the rows do not use)
                baseline = plain_step(args, dynamo, False)
                print(f"plain workflow, no adapter (eager): {baseline:.2f} s from queue to the first step's end",
                      flush=True)
            for engine in args.engines.split(","):
                rows += bench_engine(args, dynamo, engine, mode == "compiled", args.repeats)
    print_table(rows)


def plain_step(args, dynamo, compiled: bool) -> float:
    """The model without an adapter, re-queued with only the seed changed: the step time itself."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    torch._dynamo.reset()
    runner = Runner(args, dynamo)
    runner.run("none", compiled, {})
    return min(runner.run("none", compiled, {})["to_step"] for _ in range(2))


def print_table(rows: list[dict]) -> None:
    print()
    print("swap: the workflow re-queued with only that input changed, against a re-run with only the seed changed.")
    print("before step: from queueing to the first model call (the loader, ComfyUI swapping the patched model in);")
    print("first step: the first model call's time over the re-run's (recompiles land here; on a shared CPU it moves")
    print("by seconds from run to run, so only whole-UNet recompiles show in it); step: the re-run's model call.")
    print("recompiled: frames dynamo compiled again in the swap (limit: times it gave up on a function, which then")
    print("runs uncompiled); warm-up: the graph's first run (frames compiled, graph breaks, limits hit).")
    print(f"{'engine':7s} {'mode':9s} {'swap':9s} {'before step ms':>15s} {'first step s':>13s} {'step s':>7s} "
          f"{'recompiled':>11s} {'limit':>6s} {'warm-up s':>10s} {'frames':>7s} {'breaks':>7s} {'limits':>7s}")
    for r in rows:
        head = f"{r['engine']:7s} {r['mode']:9s} {r['swap']:9s}"
        if "failed" in r:
            print(f"{head} failed: {r['failed'][:120]}")
            continue
        print(f"{head} {r['before'] * 1000:15.0f} {r['cost'] - r['before']:+13.1f} {r['step']:7.2f} "
              f"{r['frames']:11d} {r['limits']:6d} {r['warm']:10.1f} {r['warm_frames']:7d} {r['warm_breaks']:7d} "
              f"{r['warm_limits']:7d}")
    for r in rows:
        if r.get("reasons"):
            print(f"{r['engine']} {r['mode']} {r['swap']}: {len(r['reasons'])} recompiles, first: "
                  f"{r['reasons'][0][:200]}")


if __name__ == "__main__":
    main()
