"""Bypass checks that need an NVIDIA GPU (issue 23), run in a few minutes on ComfyUI 0.28.

ComfyUI is imported as its main.py sets it up on NVIDIA: its own argument parser, comfy-aimdo
and dynamic VRAM (`ModelPatcherDynamic`) where the runtime picks it, cudaMallocAsync. Models load
through ComfyUI's own loaders and `load_models_gpu`, as a workflow runs them. Checks:

  1 algorithms  every algorithm (LoRA, LoKr, LoHa, IA3, Diag-OFT, BOFT, GLoRA, DoRA output and
                input side, Full; lycoris-lora writes the files) in bypass and auto, both bypass
                forms (factored, patched), two calls each, on a tiny Flux loaded by UNETLoader with
                fp8 weight_dtype and from a 0.28 comfy_quant file: the adapter's effect (output
                minus the plain model's) against the same run on the CPU (a child process with
                ComfyUI in CPU mode), relative error < 1e-3. Both compute in fp32 (fp32 inputs:
                the layers cast their weights to the input's dtype; no TF32) on the same stored
                values (float values written bf16-exact, so the GPU's bf16 storage holds what the
                CPU's fp32 holds): in bf16 the effect's error against the fp32 run is 0.1-0.16
                (measured on the CPU), too coarse to see a wrong scale or a stale DoRA norm.
  2 sync        one more call of each under torch.cuda.set_sync_debug_mode("error"): no host sync
                inside a bypassed forward. The first call stages the adapters' tensors on the GPU
                (synchronous copies from pageable memory, once per model load), so it runs outside
                the debug mode; its syncs are counted and printed (debug mode "warn").
  3 memory      torch.cuda.memory_allocated around a patched-form call on a Flux `linear1`-sized
                layer (3072 -> 21504, rank 16, bf16) and after unload_all_models() +
                soft_empty_cache(): the adapters' device copies must go (back within 8 MiB).
  4 pressure    check 1 again in a child process started with ComfyUI's --reserve-vram, so that
                only --pressure-free-mb of VRAM is left to ComfyUI (or --reserve-vram GB as given):
                dynamic VRAM then streams the weights per call.

--dry-run runs the same code on the CPU (ComfyUI in CPU mode, no aimdo): the device side of check 1
is ComfyUI's partial load with every layer casting its weight per call; check 2 calls each model
with its inputs on the `meta` device (any host read of a device tensor raises there); check 3
counts the adapters' device copies; check 4's child runs with the reserve set. Each CUDA-only step
prints SKIP with the reason. On the pinned March-2024 ComfyUI (no Flux, no quantized ops) a tiny
SD1.5 UNet takes the tiny Flux's place.

    COMFYUI_PATH=/path/to/ComfyUI-0.28 python bench/gpu_checks.py
        [--algos lora,dora] [--formats fp8_e4m3fn,float8_e4m3fn] [--reserve-vram GB]
        [--pressure-free-mb 64] [--quick] [--dry-run] [--keep]

Prints one PASS / FAIL / SKIP line per case, then one line per check and the verdict; exit status
1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# no torch import up here: on NVIDIA, ComfyUI's setup (aimdo, the CUDA allocator) comes first
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTS = os.path.join(REPO, "tests")
for _path in (os.path.join(TESTS, "in_comfyui"), TESTS):
    if _path not in sys.path:
        sys.path.append(_path)  # appended: ComfyUI's root (put first on import) must win

CHECKS = {"1": "algorithms", "2": "sync", "3": "memory", "4": "pressure"}
CONV = {"conv_dim": 4, "conv_alpha": 2}
ALGOS = {  # name -> lycoris-lora's create_lycoris arguments (as tests/in_comfyui/test_offloaded_bypass.py)
    "lora": {"algo": "lora", **CONV},
    "lokr": {"algo": "lokr", "factor": 4, **CONV},
    "loha": {"algo": "loha", **CONV},
    "ia3": {"algo": "ia3"},
    "diag-oft": {"algo": "diag-oft"},
    "boft": {"algo": "boft", "linear_dim": 16},  # Flux's 1536 and 1792 need butterfly blocks of 12 and 14
    "glora": {"algo": "glora", **CONV},
    "dora": {"algo": "lora", "dora_wd": True, **CONV},
    "dora_in": {"algo": "lora", "dora_wd": True, "wd_on_output": False},
    "full": {"algo": "full"},
}
QUICK_ALGOS = ("lora", "ia3", "dora")  # plain low rank; reads the bias; reads the weight
FLUX_FORMATS = ("fp8_e4m3fn", "float8_e4m3fn")  # UNETLoader fp8 weight_dtype; a comfy_quant file
MODES = ("bypass", "auto")
FORMS = ("factored", "patched")
STRENGTH = 0.8
TOLERANCE = 1e-3  # relative error of the adapter's effect, fp32 on both sides
MEMORY_SLACK = 8 << 20  # bytes the allocator may keep after unload (not adapter copies)
LINEAR1 = "diffusion_model.single_blocks.0.linear1"


def describe(error) -> str:
    """An exception in one line: its type and the last line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


class Report:
    """PASS / FAIL / SKIP lines as they happen, one line per check at the end."""

    def __init__(self, prefix=""):
        self.rows = []
        self.prefix = prefix

    def line(self, check, status, case, detail=""):
        self.rows.append((check, status))
        print(f"{self.prefix}{status:4s}  {check} {CHECKS[check]:10s}  {case}  {detail}".rstrip(), flush=True)

    def fail(self, check, case, error):
        """A case that raised: the exception's last line, its traceback on stderr."""
        traceback.print_exc(file=sys.stderr)
        self.line(check, "FAIL", case, describe(error))

    def summary(self, checks) -> int:
        print("\nsummary")
        failed = 0
        for check in checks:
            statuses = [s for c, s in self.rows if c == check]
            counts = {s: statuses.count(s) for s in ("PASS", "FAIL", "SKIP")}
            if counts["FAIL"] or not statuses:
                verdict = "FAIL"
            elif counts["PASS"]:
                verdict = "PASS"
            else:
                verdict = "SKIP"
            failed += verdict == "FAIL"
            print(f"check {check} {CHECKS[check]:10s}  {verdict:4s}  {counts['PASS']} passed, {counts['FAIL']} failed, "
                  f"{counts['SKIP']} skipped" + ("" if statuses else " (nothing ran)"), flush=True)
        print("ALL PASSED" if not failed else f"{failed} CHECK(S) FAILED", flush=True)
        return 1 if failed else 0


# --- ComfyUI setup ---------------------------------------------------------------------------


def _parse_comfy_args(argv):
    """ComfyUI's own parser on exactly `argv` (never this script's), as main.py runs it."""
    import comfy.options

    saved_argv, saved_flag = sys.argv, comfy.options.args_parsing
    sys.argv = ["main.py", *argv]
    comfy.options.enable_args_parsing(True)
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved_argv
        comfy.options.enable_args_parsing(saved_flag)
    return comfy.cli_args


def setup_comfy(options):
    """Import ComfyUI: on the CPU for --dry-run and the reference run, else as main.py sets it up
    on NVIDIA. Returns a line saying how it runs."""
    from comfyui_runtime import comfyui_root, import_comfy

    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    cpu = options.dry_run or options.prepare
    cli = _parse_comfy_args(["--cpu"] if cpu else [])
    args = cli.args
    has_reserve = hasattr(args, "reserve_vram")
    if options.reserve_vram is not None and has_reserve:
        args.reserve_vram = options.reserve_vram
    if cpu:
        import_comfy()  # the tests' CPU import (it checks that --cpu took)
        return f"ComfyUI {root} on the CPU" + ("" if has_reserve else " (no --reserve-vram in this ComfyUI)")
    dynamic = getattr(cli, "enables_dynamic_vram", None)
    aimdo = None
    if dynamic is not None and dynamic():  # main.py: aimdo first, then the allocator, then torch
        import comfy_aimdo.control as aimdo

        _aimdo_init(aimdo, args.reserve_vram)
    with contextlib.suppress(ImportError):
        import cuda_malloc  # noqa: F401 - main.py's default: cudaMallocAsync where supported
    if options.child and options.reserve_vram is None and has_reserve:  # check 4's child: VRAM pressure
        import torch

        free, _ = torch.cuda.mem_get_info()
        args.reserve_vram = max(0.0, (free - options.pressure_free_mb * 2**20) / 2**30)
        if aimdo is not None:
            _aimdo_init(aimdo, args.reserve_vram)
    import comfy.model_management as mm

    how = "legacy ModelPatcher"
    if dynamic is not None and (args.enable_dynamic_vram or (dynamic() and mm.is_nvidia() and not mm.is_wsl())):
        import comfy.memory_management
        import comfy.model_patcher

        if not args.enable_dynamic_vram and mm.torch_version_numeric < (2, 8):
            how = "legacy ModelPatcher (dynamic VRAM needs torch >= 2.8)"
        elif _aimdo_devices(aimdo, args, mm):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            how = "dynamic VRAM (ModelPatcherDynamic)"
        else:
            how = "legacy ModelPatcher (no working comfy-aimdo)"
    import comfy.lora  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

    reserve = getattr(args, "reserve_vram", None)
    return (f"ComfyUI {root} on {mm.get_torch_device()}, {how}, "
            f"reserve_vram {'default' if reserve is None else f'{reserve:.2f} GB'}, "
            f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")


def _aimdo_init(aimdo, reserve_gb):
    try:
        aimdo.init(simple_vram_headroom=None if reserve_gb is None else int(reserve_gb * 2**30))
    except TypeError:  # comfy-aimdo 0.4.9
        aimdo.init()


def _aimdo_devices(aimdo, args, mm):
    if aimdo is None:
        return False
    devices = mm.get_all_torch_devices()
    try:
        return aimdo.init_devices((d.index, int(args.vram_headroom * 2**30)) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9
        return aimdo.init_devices(d.index for d in devices)


def patch_free_memory_for_meta():
    """ComfyUI's memory manager answers for the `meta` device as for an empty GPU (dry run)."""
    import comfy.model_management as mm

    real = mm.get_free_memory

    def free(dev=None, torch_free_too=False):
        if getattr(dev, "type", None) == "meta":
            return (1 << 34, 1 << 34) if torch_free_too else 1 << 34
        return real(dev, torch_free_too)

    mm.get_free_memory = free


# --- models and files ------------------------------------------------------------------------


def has_flux() -> bool:
    """Whether this ComfyUI loads Flux and quantized files (the pinned March-2024 one does neither)."""
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_formats(options):
    """The model formats this runtime can load (the pinned one: a tiny SD1.5 instead)."""
    if not has_flux():
        return ("sd15",)
    return tuple(options.formats.split(",")) if options.formats else FLUX_FORMATS


def model_inputs(fmt):
    """(args, kwargs) of one diffusion-model call, on the CPU in fp32 (test_quantized.py's for Flux)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if fmt == "sd15":
        return ((torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0])),
                {"context": torch.randn(1, 3, 64, generator=g)})
    return ((torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 32, generator=g),
             torch.randn(1, 16, generator=g)), {})


def sd15_model():
    """tests/in_comfyui/tiny_models.py's tiny SD1.5, loaded where ComfyUI would load a UNet."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from tiny_models import tiny_sd15

    return comfy.model_patcher.ModelPatcher(tiny_sd15().model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_model(folder, fmt):
    """The model of `fmt` through the runtime's own loader, from the files `write_files` left."""
    if fmt == "sd15":
        return sd15_model()
    from tiny_models import load_diffusion_model

    if fmt == "fp8_e4m3fn":
        return load_diffusion_model(folder, "float.safetensors", "fp8_e4m3fn")
    return load_diffusion_model(folder, f"{fmt}.safetensors")


def write_files(folder, fmt, algos):
    """The model file(s) of `fmt` and one lycoris-lora file per algorithm in `folder`. Float values
    are bf16-exact, so the GPU's bf16 storage of the float layers holds what the CPU's fp32 holds."""
    import torch
    from safetensors.torch import save_file
    from tiny_models import lycoris_file

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "sd15":
        model, target, drop_conv = sd15_model(), ("Linear", "Conv2d"), False
        float_model = model
    else:
        from quantized_models import dequantised_weights, write_comfy_quant
        from tiny_models import load_diffusion_model, write_tiny_flux

        state_dict = write_tiny_flux(folder / "float.safetensors", seed=0)
        state_dict = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in state_dict.items()}
        save_file(state_dict, str(folder / "float.safetensors"))
        if fmt != "fp8_e4m3fn":
            write_comfy_quant(folder / f"{fmt}.safetensors", state_dict, fmt)
        model = load_model(folder, fmt)
        save_file(dequantised_weights(model), str(folder / "dequantised.safetensors"))
        float_model = load_diffusion_model(folder, "dequantised.safetensors")
        target, drop_conv = ("Linear",), True
    for algo in algos:
        kwargs = {k: v for k, v in ALGOS[algo].items() if not (drop_conv and k.startswith("conv"))}
        lycoris_file(float_model.model.diffusion_model, folder / f"{algo}.safetensors", "lora_unet_",
                     kwargs.pop("algo"), target_module=target, **kwargs)
    return model


def load_adapter(pack, model, name, mode, strength=STRENGTH):
    """The pack's loader node, its printed report kept out of this script's output."""
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    with contextlib.redirect_stdout(io.StringIO()):
        patched, report = node.load(model, name, strength, mode)["result"][:2]
    if not re.search(r"(?<!\d)0 unmatched", report):
        raise AssertionError(f"{name}: the loader left modules unmatched: {report}")
    return patched


@contextlib.contextmanager
def pinned_form(pack, form):
    """Bypass pinned to one form ("factored" or "patched"), as the tests' bypass_form fixture pins it."""
    import importlib

    module = importlib.import_module(f"{pack.__name__}.nodes.bypass")
    real = module.patching_cheaper
    if form is not None:
        module.patching_cheaper = lambda *_: form == "patched"
    try:
        yield
    finally:
        module.patching_cheaper = real


def moved(inputs, device, dtype):
    """The call's inputs on `device`, floats in `dtype` (moved before a timed or watched call)."""
    args, kwargs = inputs
    move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
    return [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}


def forward(patcher, inputs):
    import torch

    args, kwargs = inputs
    with torch.no_grad():
        return patcher.model.diffusion_model(*args, **kwargs)


# --- the CPU reference (child process) --------------------------------------------------------


def prepare(options, workdir):
    """Child process, ComfyUI on the CPU: write every file, run the reference, save its outputs."""
    from pathlib import Path

    import torch
    from comfyui_runtime import import_pack, use_loras_folder
    from safetensors.torch import save_file

    started = time.perf_counter()
    pack = import_pack()
    workdir = Path(workdir)
    algos = options.algo_list
    outputs = {}
    for fmt in runtime_formats(options):
        folder = workdir / fmt
        model = write_files(folder, fmt, algos)
        use_loras_folder(folder)
        inputs = model_inputs(fmt)
        outputs[f"{fmt}|plain"] = _reference_call(model, inputs)
        for algo in algos:
            for mode in MODES:
                outputs[f"{fmt}|{algo}|{mode}"] = _reference_call(load_adapter(pack, model, f"{algo}.safetensors", mode),
                                                                  inputs)
        print(f"reference: {fmt} done at {time.perf_counter() - started:.0f} s", flush=True)
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(workdir / "reference.safetensors"))
    (workdir / "reference.json").write_text(json.dumps({"formats": list(runtime_formats(options)), "algos": algos}))


def _reference_call(patcher, inputs):
    """As the node tests run a model on the CPU: patched, one call, unpatched."""
    patcher.patch_model()
    try:
        return forward(patcher, inputs).float().cpu()
    finally:
        patcher.unpatch_model()


def start_reference(options, workdir):
    """The reference child (ComfyUI in CPU mode), started early so it overlaps this process's import."""
    if os.path.isfile(os.path.join(workdir, "reference.json")):
        return None
    command = [sys.executable, os.path.abspath(__file__), "--prepare", "--workdir", workdir,
               "--algos", ",".join(options.algo_list)]
    if options.formats:
        command += ["--formats", options.formats]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_reference(child, workdir):
    """The reference outputs; raises with the child's output when it failed."""
    from safetensors.torch import load_file

    if child is not None:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the CPU reference run failed (exit {child.returncode}):\n{out[-4000:]}")
    meta = json.loads(open(os.path.join(workdir, "reference.json")).read())
    return load_file(os.path.join(workdir, "reference.safetensors")), meta


# --- the device side ---------------------------------------------------------------------------


class Device:
    """Where the checks run: the GPU as ComfyUI loads models there, or (dry run) ComfyUI's partial
    load on the CPU, every layer casting its weight per call as it would to the GPU."""

    def __init__(self, dry_run: bool):
        import comfy.model_management as mm
        import torch

        self.dry_run = dry_run
        self.device = torch.device("cpu") if dry_run else mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float32
        if not dry_run and not self.cuda:
            raise SystemExit(f"no CUDA device (ComfyUI picked {self.device}): run with --dry-run on the CPU")
        if self.cuda:  # the comparison is of the adapters' arithmetic: full fp32 matmuls, no TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    @contextlib.contextmanager
    def loaded(self, patcher, partial=None):
        """`patcher` loaded for calls: on the GPU by `load_models_gpu`, as a workflow loads it; dry
        run: ComfyUI's partial load on the CPU (`partial`; by default where it is repeatable: the
        March-2024 runtime's partial load hands merge patches to biases, so its value calls run on
        a full load and only the host-read check on the partial one)."""
        import comfy.model_management as mm

        if not self.dry_run:
            mm.load_models_gpu([patcher])
            yield
            return
        pinned = hasattr(patcher, "patch_model_lowvram")  # March 2024
        if partial is None:
            partial = not pinned
        if not partial:
            patcher.patch_model(self.device)
        elif pinned:
            patcher.patch_model_lowvram(self.device, lowvram_model_memory=1)
        else:
            patcher.patch_model(self.device, lowvram_model_memory=1)
        try:
            if partial and not any(getattr(m, "comfy_cast_weights", False) for m in patcher.model.modules()):
                raise AssertionError("the partial load left no layer to cast in its forward")
            yield
        finally:
            patcher.unpatch_model()

    def call(self, patcher, inputs):
        return forward(patcher, moved(inputs, self.device, self.dtype)).float().cpu()

    def sync_free_call(self, patcher, inputs):
        """One call that must not read a device tensor on the host: under CUDA's sync debug mode
        ("error"; the inputs are on the GPU before it starts), or (dry run) with the inputs on
        `meta`, where ComfyUI casts every weight too."""
        import torch

        if self.cuda:
            on_device = moved(inputs, self.device, self.dtype)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                forward(patcher, on_device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return
        y = forward(patcher, moved(inputs, torch.device("meta"), self.dtype))
        if y.device.type != "meta":
            raise AssertionError(f"the output came back on {y.device}, not meta")

    def counted_first_call(self, patcher, inputs):
        """(output, synchronizing operations CUDA's sync debug mode ("warn") reported) of a call."""
        import warnings

        import torch

        if not self.cuda:
            return self.call(patcher, inputs), None
        on_device = moved(inputs, self.device, self.dtype)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                y = forward(patcher, on_device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        return y.float().cpu(), syncs


def relative(a, b):
    import torch

    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def check_algorithms(report, options, device, pack, reference, meta, workdir, sync=True, check="1"):
    """Checks 1 and 2 (and 4 in the pressure child): every format x algorithm x mode x form."""
    from pathlib import Path

    from comfyui_runtime import use_loras_folder

    tolerance = TOLERANCE
    if sync and not device.cuda:
        report.line("2", "SKIP", "torch.cuda.set_sync_debug_mode", "needs CUDA; the dry run puts the inputs on meta")
    for missing in [f for f in runtime_formats(options) if f not in meta["formats"]] + [
            a for a in options.algo_list if a not in meta["algos"]]:
        report.line(check, "FAIL", missing, f"not in the CPU reference of {workdir}")
    for fmt in [f for f in runtime_formats(options) if f in meta["formats"]]:
        started = time.perf_counter()
        folder = Path(workdir) / fmt
        use_loras_folder(folder)
        inputs = model_inputs(fmt)
        try:
            model = load_model(folder, fmt)
            with device.loaded(model):
                plain, plain_syncs = device.counted_first_call(model, inputs)
            if sync:
                with device.loaded(model, partial=True):
                    device.sync_free_call(model, inputs)
        except Exception as error:  # noqa: BLE001 - one line per failed case, then go on
            report.fail(check, f"{fmt} plain model", error)
            continue
        if sync:
            info = "" if plain_syncs is None else f"  (first call: {plain_syncs} syncs)"
            report.line("2", "PASS", f"{fmt} plain model", "no host read in a call" + info)
        plain_reference = reference[f"{fmt}|plain"]
        for algo in meta["algos"]:
            if algo not in options.algo_list:
                continue
            for mode in MODES:
                expected = reference[f"{fmt}|{algo}|{mode}"] - plain_reference
                for form in FORMS:
                    case = f"{fmt} {algo} {mode} {form}"
                    try:
                        if fmt == "sd15":  # a fresh one: see Device.loaded on the pinned runtime's partial load
                            model = load_model(folder, fmt)
                        with pinned_form(pack, form):
                            patched = load_adapter(pack, model, f"{algo}.safetensors", mode)
                            with device.loaded(patched):
                                first, syncs = device.counted_first_call(patched, inputs)
                                second = device.call(patched, inputs)
                            sync_error = None
                            if sync:
                                try:
                                    with device.loaded(patched, partial=True):
                                        device.sync_free_call(patched, inputs)
                                except Exception as error:  # noqa: BLE001
                                    sync_error = error
                    except Exception as error:  # noqa: BLE001
                        report.fail(check, case, error)
                        continue
                    size = float(expected.norm() / plain_reference.norm())
                    errors = [relative(y - plain, expected) for y in (first, second)]
                    ok = size > 1e-4 and max(errors) < tolerance
                    detail = (f"effect err {errors[0]:.1e} / {errors[1]:.1e} (calls 1/2, < {tolerance:g}), "
                              f"effect {size:.1e} of the output")
                    report.line(check, "PASS" if ok else "FAIL", case,
                                detail if size > 1e-4 else "the adapter changed nothing in the CPU reference")
                    if not sync:
                        continue
                    if sync_error is not None:
                        report.line("2", "FAIL", case, describe(sync_error))
                    else:
                        info = "" if syncs is None else f"  (first call, staging: {syncs} syncs)"
                        report.line("2", "PASS", case, "no host read in a call" + info)
        print(f"      {fmt}: {time.perf_counter() - started:.0f} s", flush=True)


# --- check 3 ----------------------------------------------------------------------------------


def memory_model(workdir, quick):
    """(patcher, layer path, adapter file name, layer input width): a Flux with one double and one
    single block at full width (its `linear1` 3072 -> 21504) or, --quick, at 256 (-> 1792), bf16
    values, loaded by UNETLoader; a rank-16 LoRA on that `linear1`. Pinned runtime: the tiny SD1.5
    and its widest Linear."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    folder = Path(workdir) / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    if not has_flux():
        model = sd15_model()
        name, layer = max(((n, m) for n, m in model.model.diffusion_model.named_modules()
                           if isinstance(m, torch.nn.Linear)), key=lambda item: item[1].weight.numel())
        path = f"diffusion_model.{name}"
    else:
        from diffusers import FluxTransformer2DModel
        from tiny_models import TINY_FLUX, comfy_layout, load_diffusion_model

        heads = 2 if quick else 24
        with torch.device("meta"):
            shapes = comfy_layout(FluxTransformer2DModel(**{**TINY_FLUX, "num_attention_heads": heads}).state_dict())
        save_file({k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in shapes.items()},
                  str(folder / "flux_width.safetensors"))
        model = load_diffusion_model(folder, "flux_width.safetensors")
        path = LINEAR1
        layer = model.model.diffusion_model.single_blocks[0].linear1
    out_features, in_features = layer.weight.shape
    key = "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")
    save_file({f"{key}.lora_down.weight": (torch.randn(16, in_features, generator=g) * 0.02).to(torch.bfloat16),
               f"{key}.lora_up.weight": (torch.randn(out_features, 16, generator=g) * 0.02).to(torch.bfloat16),
               f"{key}.alpha": torch.tensor(16.0)}, str(folder / "linear_lora.safetensors"))
    return model, path, folder, (out_features, in_features)


def held_copies(pack, patcher):
    """Adapter copies the bypass plan holds on any device, counted (None: no injections here)."""
    import importlib

    bypass = importlib.import_module(f"{pack.__name__}.nodes.bypass")
    getter = getattr(patcher, "get_injections", None)
    injections = (getter(bypass.INJECTION_KEY) or []) if getter is not None else []
    plans = [i.plan for i in injections if hasattr(i, "plan")]
    if not plans:
        return None
    return sum(len(state.layers) for state in plans[0]._staged.values())


def check_memory(report, options, device, pack, workdir):
    import comfy.model_management as mm
    import comfy.utils
    import torch
    from comfyui_runtime import use_loras_folder

    mib = 2**20
    model, path, folder, (out_features, in_features) = memory_model(workdir, options.quick)
    use_loras_folder(folder)
    tokens = 256 if options.quick else 4096
    case = f"{in_features} -> {out_features}, rank 16, {tokens} tokens, patched form"
    with pinned_form(pack, "patched"):
        patched = load_adapter(pack, model, "linear_lora.safetensors", "bypass", 1.0)
        mm.unload_all_models()
        mm.soft_empty_cache()
        allocated = torch.cuda.memory_allocated if device.cuda else None
        start = allocated() if allocated else None
        mm.load_models_gpu([patched])
        loaded = allocated() if allocated else None
        layer = comfy.utils.get_attr(patched.model, path)
        forward_type = type(layer.__dict__.get("forward")).__name__
        dtype = torch.bfloat16 if device.cuda else layer.weight.dtype
        x = torch.randn(tokens, in_features, dtype=dtype, device=device.device)
        if device.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = allocated() if allocated else None
        with torch.no_grad():
            y = layer(x)
        if device.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device.cuda else None
        after_call = allocated() if allocated else None
        output_bytes = y.numel() * y.element_size()
        del y, x
        after_free = allocated() if allocated else None
        copies_loaded = held_copies(pack, patched)
        mm.unload_all_models()
        mm.soft_empty_cache()
        end = allocated() if allocated else None
        copies_unloaded = held_copies(pack, patched)
    if forward_type != "BypassForward" and copies_loaded is None:
        report.line("3", "FAIL", case, f"the layer runs {forward_type}, not the pack's bypass: nothing measured")
        return
    if copies_loaded is None:  # the pinned runtime: object patches, undone on unpatch
        restored = type(layer.__dict__.get("forward")).__name__ != "BypassForward"
        report.line("3", "PASS" if restored else "FAIL", case + ": layer restored on unload",
                    "no BypassForward left on the layer" if restored else "a BypassForward outlived the unload")
        report.line("3", "SKIP", "adapter copies counted", "this ComfyUI has no injections: object patches keep "
                    "their copies with the patcher, not the model")
    else:
        ok = copies_loaded > 0 and copies_unloaded == 0
        report.line("3", "PASS" if ok else "FAIL", case + ": adapter copies released on unload",
                    f"{copies_loaded} staged while loaded, {copies_unloaded} after unload_all_models()")
    if not device.cuda:
        report.line("3", "SKIP", "torch.cuda.memory_allocated", "needs CUDA")
        return
    print(f"      memory (MiB): start {start / mib:.1f}, model loaded {loaded / mib:.1f}, before the call "
          f"{before / mib:.1f}, peak in the call +{(peak - before) / mib:.1f}, after it +{(after_call - before) / mib:.1f} "
          f"(output {output_bytes / mib:.1f}), output freed +{(after_free - before) / mib:.1f} (adapter copies), "
          f"after unload_all_models + soft_empty_cache {end / mib:.1f} ({(end - start) / mib:+.1f} from start)",
          flush=True)
    ok = end - start <= MEMORY_SLACK
    report.line("3", "PASS" if ok else "FAIL", case + ": memory back after unload",
                f"{(end - start) / mib:+.1f} MiB from the start (<= {MEMORY_SLACK // mib} MiB)")


# --- check 4 ----------------------------------------------------------------------------------


def check_pressure(report, options, workdir):
    """Check 1 again in a child process whose ComfyUI starts with --reserve-vram."""
    algos, formats = options.algo_list, runtime_formats(options)
    if options.quick:  # one algorithm on one format: the pressure path, not the matrix again
        algos, formats = algos[:1], formats[:1]
    command = [sys.executable, os.path.abspath(__file__), "--only", "1", "--workdir", workdir,
               "--algos", ",".join(algos), "--formats", ",".join(formats), "--child"]
    if options.dry_run:
        command.append("--dry-run")
    if options.quick:
        command.append("--quick")
    if options.reserve_vram is not None or options.dry_run:  # dry run: set, though the CPU has no VRAM to keep
        reserve = 1.0 if options.reserve_vram is None else options.reserve_vram
        command += ["--reserve-vram", f"{reserve:g}"]
        how = f"--reserve-vram {reserve:g}"
    else:
        command += ["--pressure-free-mb", str(options.pressure_free_mb)]
        how = f"--reserve-vram leaving {options.pressure_free_mb} MiB of free VRAM"
    print(f"      check 1 again under VRAM pressure ({how}), in a child process:", flush=True)
    child = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = child.stdout.splitlines()
    for text in lines:
        if text[:4] in ("PASS", "FAIL", "SKIP") or text.startswith("ComfyUI "):
            print(f"      | {text}", flush=True)
    cases = sum(text.startswith(("PASS  1", "FAIL  1")) for text in lines)
    if options.dry_run:
        report.line("4", "SKIP", "VRAM pressure", "the CPU device has no VRAM to reserve: the child ran check 1 "
                    "with the reserve set and no pressure")
    if child.returncode != 0 or cases == 0:
        sys.stderr.write("\n".join(lines[-60:]) + "\n")
    report.line("4", "PASS" if child.returncode == 0 and cases else "FAIL", f"check 1 under {how}",
                f"child exit {child.returncode}, {cases} cases")


# --- main -------------------------------------------------------------------------------------


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU (SKIP for CUDA-only steps)")
    parser.add_argument("--quick", action="store_true",
                        help=f"algorithms {','.join(QUICK_ALGOS)} only, check 3 at Flux width 256")
    parser.add_argument("--algos", default=None, help=f"comma-separated, of {','.join(ALGOS)}")
    parser.add_argument("--formats", default=None,
                        help="Flux formats: fp8_e4m3fn (UNETLoader weight_dtype) and/or comfy_quant ones "
                             "(float8_e4m3fn, int8_tensorwise, mxfp8, nvfp4)")
    parser.add_argument("--reserve-vram", type=float, default=None, metavar="GB",
                        help="ComfyUI's --reserve-vram for this process (and check 4's child)")
    parser.add_argument("--pressure-free-mb", type=int, default=64,
                        help="check 4: reserve all VRAM but this much (when --reserve-vram is not given)")
    parser.add_argument("--only", default=None, help="comma-separated check numbers to run (1-4)")
    parser.add_argument("--workdir", default=None, help="files and the CPU reference (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the reference child
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # check 4's child
    options = parser.parse_args(argv)
    if options.algos:
        unknown = sorted(set(options.algos.split(",")) - set(ALGOS))
        if unknown:
            parser.error(f"unknown algorithm(s) {', '.join(unknown)}; known: {', '.join(ALGOS)}")
        options.algo_list = options.algos.split(",")
    else:
        options.algo_list = list(QUICK_ALGOS if options.quick else ALGOS)
    options.checks = options.only.split(",") if options.only else list(CHECKS)
    if set(options.checks) - set(CHECKS):
        parser.error("--only takes check numbers 1-4")
    return options


def main(argv=None) -> int:
    options = parse(argv)
    started = time.perf_counter()
    if options.prepare:
        print(setup_comfy(options), flush=True)
        import torch

        with torch.inference_mode():
            prepare(options, options.workdir)
        return 0
    workdir = options.workdir or tempfile.mkdtemp(prefix="lycoris_gpu_checks_")
    needs_reference = {"1", "2", "4"} & set(options.checks)
    reference_child = start_reference(options, workdir) if needs_reference else None
    try:
        print(setup_comfy(options), flush=True)
        import torch
        from comfyui_runtime import import_pack

        pack = import_pack()
        report = Report()
        device = Device(options.dry_run)
        if options.dry_run:
            patch_free_memory_for_meta()
        print(f"algorithms {','.join(options.algo_list)}; files in {workdir}",
              flush=True)
        with torch.inference_mode():  # as ComfyUI's executor runs nodes and the sampler
            if "1" in options.checks or "2" in options.checks:
                try:
                    reference, meta = wait_reference(reference_child, workdir)
                    reference_child = None
                except Exception as error:  # noqa: BLE001
                    report.fail("1", "CPU reference", error)
                else:
                    check_algorithms(report, options, device, pack, reference, meta, workdir,
                                     sync="2" in options.checks)
            if "3" in options.checks:
                try:
                    check_memory(report, options, device, pack, workdir)
                except Exception as error:  # noqa: BLE001
                    report.fail("3", "memory", error)
        if "4" in options.checks:
            if reference_child is not None:
                wait_reference(reference_child, workdir)
                reference_child = None
            check_pressure(report, options, workdir)
        status = report.summary(options.checks)
        print(f"{time.perf_counter() - started:.0f} s", flush=True)
        return status
    finally:
        if reference_child is not None:
            reference_child.kill()
            reference_child.wait()
        if options.workdir is None and not options.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
