"""Every algorithm x mode x model storage through the real server, compared with the trainer.

Each cell is a workflow posted to /prompt: UNETLoader (or ComfyUI-GGUF's UnetLoaderGGUF) -> Load
LyCORIS (model only) in auto / merge / bypass -> KSampler (1 step, fixed seed) -> SaveLatent, read
back with safetensors. The oracle is lycoris-lora itself: its network, made on the float UNet and
saved as the adapter file, is merged by lycoris-lora (`merge_to`) into a copy of the weights the
runtime holds (the float UNet, or the quantized UNet as the runtime's own loader dequantises it)
and that merged UNet goes through the same workflow without an adapter. Before merging, the
trainer's merge is checked against the trainer's wrapped forward on the same weights.

error = |ours - reference| / |reference - base|: relative to the adapter's effect (base: the same
workflow on the same weights without an adapter). Float-exact cells must stay under 1e-4. A merge
into fp8-stored weights (UNETLoader's fp8 weight_dtype, the quantized layers of a comfy_quant file)
is requantized by ComfyUI: there the report must warn (on fp8 storage every merge touches such
weights) and the error is only recorded; elsewhere on quantized storage the compute floor
(the quantized base against its dequantised twin, relative to the adapter's effect) is allowed
twice on top of 1e-4, as in tests/in_comfyui/test_quantized.py.

The model: the e2e SD1.x checkpoint's UNet (320 channels, one level, detected as SD1.x by both
runtimes) as a diffusion-model file. Storages: fp32, fp8 (0.28: UNETLoader weight_dtype; pinned
2024 runtime: a second server started with its `--fp8_e4m3fn-unet`), a ComfyUI 0.28 comfy_quant
file, GGUF Q4_0 (ComfyUI-GGUF copied into the server's custom_nodes). The pinned runtime has
neither comfy_quant nor a GGUF loader: those storages are not collected there
(`test_the_runtime_offers_the_storages_it_should` pins which runtime runs which).
"""

from __future__ import annotations

import copy
import functools
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_runtime import comfyui_root

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "in_comfyui") not in sys.path:
    sys.path.append(str(HERE.parent / "in_comfyui"))  # tiny_models / quantized_models helpers

RECENT = (comfyui_root() / "comfy" / "quant_ops.py").is_file()  # ComfyUI 0.28 (QuantizedTensor)
STORAGES = ("fp32", "fp8", "comfy_quant", "gguf_q4_0") if RECENT else ("fp32", "fp8")
MODES = ("auto", "merge", "bypass")
COMFY_QUANT_FORMAT = "float8_e4m3fn"  # scaled fp8: the comfy_quant format the field ships most

CONV = {"conv_dim": 4, "conv_alpha": 2}
LINEAR, CONVS, NORMS = ("Linear",), ("Linear", "Conv2d"), ("GroupNorm", "LayerNorm")
ALGOS = {  # name -> (modules lycoris-lora adapts, create_lycoris arguments)
    "lora": (LINEAR, {"algo": "lora"}),
    "locon": (CONVS, {"algo": "locon", **CONV}),
    "loha": (CONVS, {"algo": "loha", **CONV}),
    "lokr": (CONVS, {"algo": "lokr", "factor": 4, "conv_dim": 2, "conv_alpha": 1}),
    "ia3": (LINEAR, {"algo": "ia3"}),
    "diag-oft": (LINEAR, {"algo": "diag-oft"}),
    "boft": (LINEAR, {"algo": "boft", "linear_dim": 10}),  # 320 * 2^k channels: butterfly factor 10
    "glora": (CONVS, {"algo": "glora", **CONV}),
    "dora": (LINEAR, {"algo": "lora", "dora_wd": True}),
    "full": (LINEAR, {"algo": "full"}),
    "norm": (NORMS, {"algo": "lora", "train_norm": True}),
}
# Cells the pack gets wrong today, each with the report's words that say so: such a cell must keep
# saying it, and fails as soon as it is exact, so that its entry goes. (Norm adapters on fp8-stored
# norm layers were here until they ran in the layers' own casts, nodes/cast_patches.py.)
KNOWN_WRONG: dict = {}
FIGURES: dict = {}  # (storage, algo, column) -> error, printed at the end of the module
TIMEOUT = 300


# -- models -----------------------------------------------------------------------------------------

def _float_unet_state(e2e_models) -> dict:
    """The e2e checkpoint's UNet in fp32, keyed as a diffusion-model file."""
    from e2e.make_models import CHECKPOINT_NAME, UNET_PREFIX

    models, _ = e2e_models
    state = load_file(str(models / "checkpoints" / CHECKPOINT_NAME))
    return {k[len(UNET_PREFIX):]: v.float().contiguous() for k, v in state.items() if k.startswith(UNET_PREFIX)}


def _load_unet(folder: Path, name: str, fp8: bool = False):
    """`name` loaded in this process by the runtime's own UNETLoader (fp8: its fp8 weight storage)."""
    import nodes

    from comfyui_runtime import use_model_folder
    import folder_paths

    kind = "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"
    use_model_folder(kind, folder)
    loader = nodes.UNETLoader()
    if "weight_dtype" in loader.INPUT_TYPES()["required"]:
        return loader.load_unet(name, "fp8_e4m3fn" if fp8 else "default")[0]
    if not fp8:
        return loader.load_unet(name)[0]
    import comfy.cli_args  # pinned 2024 runtime: fp8 storage is its --fp8_e4m3fn-unet switch

    comfy.cli_args.args.fp8_e4m3fn_unet = True
    try:
        return loader.load_unet(name)[0]
    finally:
        comfy.cli_args.args.fp8_e4m3fn_unet = False


def _dequantised(folder: Path, storage: str, float_state: dict) -> dict:
    """The weights the runtime computes with for `storage`, as float32, from its own loader."""
    from quantized_models import dequantised_weights, gguf_nodes, write_comfy_quant, write_gguf

    if storage == "fp32":
        return float_state
    if storage == "fp8":
        patcher = _load_unet(folder, "float.safetensors", fp8=True)
    elif storage == "comfy_quant":
        write_comfy_quant(folder / "comfy_quant.safetensors", float_state, COMFY_QUANT_FORMAT)
        patcher = _load_unet(folder, "comfy_quant.safetensors")
    else:
        write_gguf(folder / "q4_0.gguf", float_state, "Q4_0", arch="sd1")
        nodes = gguf_nodes(folder.parent)
        from comfyui_runtime import use_model_folder

        use_model_folder("diffusion_models", folder)
        patcher = nodes.UnetLoaderGGUF().load_unet("q4_0.gguf")[0]
    return {k: v.contiguous() for k, v in dequantised_weights(patcher).items()}


def _unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)


def _network(unet, algo: str, seed: int = 0):
    """lycoris-lora's network for `algo` on `unet` (applied), its weights randomised by `seed`."""
    from lycoris import LycorisNetwork, create_lycoris

    targets, kwargs = ALGOS[algo]
    kwargs = {"linear_dim": 4, "linear_alpha": 2, **kwargs}
    torch.manual_seed(seed)
    LycorisNetwork.apply_preset({"target_module": list(targets), "target_name": []})
    net = create_lycoris(unet, 1.0, **kwargs)
    net.apply_to()
    return net


def _rel(a, b, base) -> float:
    return float((a - b).norm() / (b - base).norm())


def _write_adapter(unet_float, algo: str, path: Path) -> dict:
    """The adapter file (lycoris-lora's own save, kohya `lora_unet_` names); returns the network's state."""
    unet = copy.deepcopy(unet_float)
    net = _network(unet, algo)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tmp = path.with_name(f"trainer_{path.name}")  # save_weights picks the format by the suffix
    net.save_weights(str(tmp), torch.float32, {})
    tensors = load_file(str(tmp))
    tmp.unlink()
    save_file({"lora_unet_" + k[len("lycoris_"):]: v for k, v in tensors.items()}, str(path))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _probe(module) -> torch.Tensor:
    """A random input for one layer (Linear, Conv2d, LayerNorm, GroupNorm)."""
    g = torch.Generator().manual_seed(5)
    if isinstance(module, torch.nn.Linear):
        return torch.randn(3, module.in_features, generator=g)
    if isinstance(module, torch.nn.LayerNorm):
        return torch.randn(2, 3, *module.normalized_shape, generator=g)
    channels = module.in_channels if isinstance(module, torch.nn.Conv2d) else module.num_channels
    return torch.randn(2, channels, 5, 5, generator=g)


def _forward_delta(lora, module, x):
    """(weight, bias) deltas the trainer's forward adds: what the wrapped forward passes to the
    module's op on top of the original layer's own output."""
    calls = []
    real = lora.op

    def record(x, weight=None, bias=None, *args, **kwargs):
        calls.append((weight, bias))
        return real(x, weight, bias, *args, **kwargs)

    lora.op = record
    try:
        module(x)
    finally:
        lora.op = real
    assert len(calls) == 1, f"{lora.lora_name}: the forward called its op {len(calls)} times"
    return calls[0]


def _trainer_merge(unet_deq, algo: str, net_state: dict, storage: str) -> dict:
    """The UNet as the trainer's forward computes it. lycoris-lora's network (`net_state`) is merged
    into a copy of `unet_deq` by its own `merge_to`; each layer is then checked against the same
    network's wrapped forward on a random input, and a layer whose merge disagrees takes the delta
    that the forward itself computes (lycoris-lora 4.1.3's LoHa and LoKr merges apply alpha / rank
    twice, their forwards once). The result must reproduce the wrapped UNet's output."""
    inputs = _unet_inputs()
    wrapped, merged = copy.deepcopy(unet_deq), copy.deepcopy(unet_deq)
    run = lambda unet: unet(inputs[0], inputs[1], context=inputs[2])  # noqa: E731
    with torch.no_grad():
        y_base = run(unet_deq)
        net = _network(wrapped, algo)
        net.load_state_dict(net_state)
        y_wrapped = run(wrapped)
        merge = _network(merged, algo)
        merge.load_state_dict(net_state)
        merge.restore()
        merge.merge_to(1.0)
        FIGURES[(storage, algo, "lycoris merge_to vs forward")] = _rel(run(merged), y_wrapped, y_base)
        names = {id(m): n for n, m in wrapped.named_modules()}
        originals, targets = dict(unet_deq.named_modules()), dict(merged.named_modules())
        for lora in net.loras:
            name = names[id(lora.org_module[0])]
            base, target, x = originals[name], targets[name], _probe(originals[name])
            y_b, y_w = base(x), lora.org_module[0](x)
            if _rel(target(x), y_w, y_b) <= 1e-4:
                continue
            weight, bias = _forward_delta(lora, lora.org_module[0], x)
            target.weight.copy_(base.weight + weight)
            if bias is not None:
                target.bias.copy_(base.bias + bias)
            error = _rel(target(x), y_w, y_b)
            assert error <= 1e-4, f"{algo} {name}: neither merge_to nor the forward's delta gives its output ({error:.2e})"
        FIGURES[(storage, algo, "reference vs forward")] = error = _rel(run(merged), y_wrapped, y_base)
    assert error <= 1e-4, f"{algo} on {storage}: the reference UNet is {error:.2e} off the trainer's forward"
    return {k: v.detach().float().contiguous() for k, v in merged.state_dict().items()}


class Models:
    """The models folder the matrix server reads: `unet/` (float, quantized, dequantised and
    trainer-merged UNets) and `loras/` (one lycoris-lora file per algorithm), built once per module
    in this process with the runtime's own loaders (for the dequantised weights)."""

    def __init__(self, root: Path, e2e_models):
        import comfy.model_management  # noqa: F401  (imported by the e2e fixture)

        self.root = root
        self.unet_dir, self.loras = root / "unet", root / "loras"
        self.unet_dir.mkdir(parents=True)
        self.loras.mkdir(parents=True)
        self.float_state = _float_unet_state(e2e_models)
        save_file(self.float_state, str(self.unet_dir / "float.safetensors"))
        with torch.no_grad():
            self.float_unet = _load_unet(self.unet_dir, "float.safetensors").model.diffusion_model
        self.net_states = {algo: _write_adapter(self.float_unet, algo, self.loras / f"{algo}.safetensors")
                           for algo in ALGOS}

    @functools.cache
    def references(self, storage: str) -> dict:
        """algo -> the trainer-merged UNet file for `storage`, plus "base" -> the dequantised one."""
        deq = _dequantised(self.unet_dir, storage, self.float_state)
        out = {"base": f"deq_{storage}.safetensors"}
        save_file(deq, str(self.unet_dir / out["base"]))
        unet = _load_unet(self.unet_dir, out["base"]).model.diffusion_model
        for algo in ALGOS:
            out[algo] = f"ref_{storage}_{algo}.safetensors"
            save_file(_trainer_merge(unet, algo, self.net_states[algo], storage), str(self.unet_dir / out[algo]))
        return out


@pytest.fixture(scope="module")
def matrix_models(e2e_models, tmp_path_factory):
    yield Models(tmp_path_factory.mktemp("matrix_models"), e2e_models)
    print("\nworkflow matrix: error of each cell relative to the adapter's effect")
    for key, value in sorted(FIGURES.items()):
        print(f"{key[0]:>12} {key[1]:>9} {key[2]:>26}: {value:.2e}")


# -- servers ---------------------------------------------------------------------------------------

def _server(tmp_path_factory, models: Path, extra_args=()):
    from e2e.server import ComfyServer

    work = tmp_path_factory.mktemp("matrix_server")
    if RECENT:  # ComfyUI-GGUF, loaded from the server's own custom_nodes folder
        from quantized_models import GGUF_SOURCE

        shutil.copytree(GGUF_SOURCE, work / "custom_nodes" / "ComfyUI-GGUF",
                        ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return ComfyServer(work, models, model_kinds=("checkpoints", "loras", "unet"),
                       extra_args=("--fp32-text-enc", *extra_args))


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory, matrix_models, e2e_models):
    """One server for the module; the checkpoint (for its CLIP) is linked into the models folder."""
    from e2e.make_models import CHECKPOINT_NAME

    link = matrix_models.root / "checkpoints" / CHECKPOINT_NAME
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(e2e_models[0] / "checkpoints" / CHECKPOINT_NAME)
    with _server(tmp_path_factory, matrix_models.root) as server:
        yield server


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory, matrix_models, matrix_server):
    """The server that stores UNets in fp8: on 0.28 the same one (UNETLoader's weight_dtype); on the
    pinned runtime a second one started with --fp8_e4m3fn-unet (its only fp8 storage)."""
    if "weight_dtype" in matrix_server.object_info("UNETLoader")["UNETLoader"]["input"]["required"]:
        yield matrix_server
        return
    with _server(tmp_path_factory, matrix_models.root, ("--fp8_e4m3fn-unet",)) as server:
        yield server


# -- workflows -------------------------------------------------------------------------------------

def _graph(server, unet: str, storage: str, adapter: tuple[str, str] | None) -> dict:
    """UNet loader -> (Load LyCORIS) -> KSampler (1 step) -> SaveLatent; `adapter` = (file, mode)."""
    from e2e.make_models import CHECKPOINT_NAME

    if storage == "gguf_q4_0":
        loader = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": unet}}
    else:
        loader = {"class_type": "UNETLoader", "inputs": {"unet_name": unet}}
        if "weight_dtype" in _loader_inputs(server, "UNETLoader"):
            loader["inputs"]["weight_dtype"] = "fp8_e4m3fn" if storage == "fp8" else "default"
    model = ["1", 0]
    graph = {
        "1": loader,
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lycoris flower"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    }
    if adapter is not None:
        name_input = _adapter_input(server)
        graph["4"] = {"class_type": "LycorisLoaderModelOnly", "inputs": {
            "model": model, name_input: adapter[0], "strength_model": 1.0, "mode": adapter[1]}}
        model = ["4", 0]
    graph["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0],
        "seed": 7, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    graph["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0],
                                                         "filename_prefix": f"matrix/{uuid.uuid4().hex[:12]}"}}
    return graph


@functools.cache
def _info(server, node: str) -> dict:
    info = server.object_info(node)
    assert node in info, f"the server has no {node} node: {server.import_failures()}"
    return info[node]


def _loader_inputs(server, node: str) -> dict:
    return _info(server, node)["input"]["required"]


def _adapter_input(server) -> str:
    """The file input of Load LyCORIS (model only): `lycoris_name`, or `lora_name` after the rename."""
    required = _loader_inputs(server, "LycorisLoaderModelOnly")
    [name] = [k for k in ("lycoris_name", "lora_name") if k in required]
    return name


def _run_all(server, graphs: dict) -> dict:
    """Queue every graph at once, then collect: key -> (latent, report text of Load LyCORIS)."""
    ids = {key: server.post_prompt(graph) for key, graph in graphs.items()}
    out = {}
    for key, prompt_id in ids.items():
        entry = server.wait_history(prompt_id, TIMEOUT)
        [path] = server.output_files(entry, "latents")
        latent = load_file(str(path))["latent_tensor"].float()
        report = "\n".join((entry["outputs"].get("4") or {}).get("text", []))
        out[key] = (latent, report)
    return out


# -- the matrix ------------------------------------------------------------------------------------

QUANTIZED_FILE = {"comfy_quant": "comfy_quant.safetensors", "gguf_q4_0": "q4_0.gguf"}


@pytest.mark.parametrize("storage", STORAGES)
def test_matrix(matrix_models, matrix_server, fp8_server, storage):
    refs = matrix_models.references(storage)
    quantized = storage != "fp32"
    server = fp8_server if storage == "fp8" else matrix_server
    stored = QUANTIZED_FILE.get(storage, "float.safetensors")
    # references and bases run on float storage: the fp32 server
    ref_graphs = {algo: _graph(matrix_server, refs[algo], "fp32", None) for algo in ["base", *ALGOS]}
    cell_graphs = {(algo, mode): _graph(server, stored, storage, (f"{algo}.safetensors", mode))
                   for algo in ALGOS for mode in MODES}
    cell_graphs["stored base"] = _graph(server, stored, storage, None)
    ref = _run_all(matrix_server, ref_graphs)
    cells = _run_all(server, cell_graphs)
    base = ref["base"][0]
    failures = []
    for algo in ALGOS:
        y_ref = ref[algo][0]
        effect = float((y_ref - base).norm())
        assert effect > 1e-3 * float(base.norm()), f"{algo}: the adapter has no measurable effect"
        # the storage's compute floor: the stored model against its dequantised twin, no adapter
        floor = float((cells["stored base"][0] - base).norm()) / effect if quantized else 0.0
        FIGURES[(storage, algo, "floor")] = floor
        tolerance = 1e-4 + 2 * floor
        for mode in MODES:
            y, report = cells[(algo, mode)]
            FIGURES[(storage, algo, mode)] = error = _rel(y, y_ref, base)
            if "0 unmatched" not in report and "unmatched" in report:
                failures.append(f"{storage} {algo} {mode}: modules unmatched\n{report}")
            requantized = "merged into quantized weights" in report  # ComfyUI requantizes the merged weight
            if mode == "merge" and storage == "fp8" and not requantized:  # every layer is fp8-stored
                failures.append(f"{storage} {algo} merge: no requantization warning\n{report}")
            if (storage, algo, mode) in KNOWN_WRONG:
                if KNOWN_WRONG[(storage, algo, mode)] not in report:
                    failures.append(f"{storage} {algo} {mode}: known wrong, and the report no longer says why\n{report}")
                if error <= tolerance:
                    failures.append(f"{storage} {algo} {mode}: now exact ({error:.2e}): remove it from KNOWN_WRONG")
                continue
            if mode == "merge" and requantized and storage in ("fp8", "comfy_quant"):
                continue  # warned: a requantized merge is as exact as the storage's steps allow
            if error > tolerance:
                failures.append(f"{storage} {algo} {mode}: error {error:.2e} > {tolerance:.2e}\n{report}")
    assert not failures, "\n\n".join(failures)


def test_the_runtime_offers_the_storages_it_should(matrix_server):
    """0.28 runs all four storages (comfy_quant and ComfyUI-GGUF present), the pinned runtime fp32 and
    fp8 only: the matrix never loses a storage silently."""
    info = matrix_server.object_info()
    if RECENT:
        assert STORAGES == ("fp32", "fp8", "comfy_quant", "gguf_q4_0")
        assert "UnetLoaderGGUF" in info, matrix_server.import_failures()
        assert "weight_dtype" in info["UNETLoader"]["input"]["required"]
    else:
        assert STORAGES == ("fp32", "fp8") and "UnetLoaderGGUF" not in info
