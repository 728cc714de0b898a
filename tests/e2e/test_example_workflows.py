"""Every API-format example workflow (example_workflows/api/*_api.json) posted to the real ComfyUI server,
each checked for the effect its node is for: an image, a new adapter or checkpoint that lycoris_core
reads (compared with what the core computes from the inputs), a report in the prompt history.
`lycoris_loader_api.json` (the main job, with its own LoHa adapter) is run by test_main_job.py; here
it is only checked to use nodes the server has.

The utility nodes write into the first loras / checkpoints folder, which on a server started by
the harness is the runtime's own `models/` folder: the tests give each output a unique name and
delete what they wrote."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from e2e import make_models
from e2e.make_models import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows" / "api"
LORA = "e2e_kohya_lora.safetensors"
DYLORA = "e2e_kohya_dylora.safetensors"
PNG = b"\x89PNG\r\n\x1a\n"

# one API workflow per node of the pack
WORKFLOW_OF = {
    "LycorisLoader": "lycoris_loader_api.json",
    "LycorisLoaderModelOnly": "lycoris_loader_model_only_api.json",
    "LycorisStack": "lycoris_stack_api.json",
    "LycorisBlockWeight": "lycoris_block_weight_api.json",
    "LycorisResize": "lycoris_resize_api.json",
    "LycorisDyLoRASlice": "lycoris_dylora_slice_api.json",
    "LycorisCombine": "lycoris_combine_api.json",
    "LycorisExtract": "lycoris_extract_api.json",
    "LycorisMergeToCheckpoint": "lycoris_merge_to_checkpoint_api.json",
    "LycorisInspect": "lycoris_inspect_api.json",
    "LycorisSchedule": "lycoris_schedule_api.json",
}
# more examples of one node (README: schedules and torch.compile); -> core nodes they need that older
# runtimes lack (the pinned March-2024 ComfyUI has no TorchCompileModel)
MORE_EXAMPLES = {
    "lycoris_schedule_negative_api.json": set(),
    "lycoris_compile_api.json": {"TorchCompileModel"},
}


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def node_of(graph: dict, class_type: str) -> str:
    [node] = [key for key, node in graph.items() if node["class_type"] == class_type]
    return node


def ui_text(entry: dict, node: str) -> str:
    return "\n".join(entry["outputs"].get(node, {}).get("text", []))


def image(server, entry: dict) -> np.ndarray:
    from PIL import Image

    [path] = server.output_files(entry)
    assert path.read_bytes()[:8] == PNG, path
    return np.asarray(Image.open(path), dtype=np.int16)


def unique(graph: dict) -> dict:
    """The workflow with unique output names (SaveImage prefixes, utility output files)."""
    tag = uuid.uuid4().hex[:8]
    for node in graph.values():
        for field in ("filename_prefix", "output_name"):
            if field in node["inputs"]:
                node["inputs"][field] = f"{node['inputs'][field]}_{tag}"
    return graph


@pytest.fixture
def written():
    """Collects the files a workflow wrote into the model folders; deletes them afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def run_utility(server, graph: dict, written: list) -> tuple[Path, str]:
    """Run a one-file utility workflow; (the file its report says it wrote, the report)."""
    node = next(key for key, n in graph.items() if n["class_type"].startswith("Lycoris") and "output_name" in n["inputs"])
    entry = server.run(unique(graph), timeout=300)
    report = ui_text(entry, node)
    match = re.search(r": wrote (.+?\.safetensors)$", report.splitlines()[0] if report else "")
    assert match, report
    path = Path(match.group(1))
    written.append(path)
    assert path.is_file(), report
    return path, report


def test_every_node_of_the_pack_has_a_workflow_using_nodes_the_server_has(comfy_server):
    info = comfy_server.object_info()
    pack_nodes = {name for name in info if name.startswith("Lycoris")}
    assert pack_nodes == set(WORKFLOW_OF), pack_nodes ^ set(WORKFLOW_OF)
    files = {path.name for path in WORKFLOWS.glob("*_api.json")}
    expected = set(WORKFLOW_OF.values()) | set(MORE_EXAMPLES)
    assert files == expected, files ^ expected
    for name in files:
        missing = {n["class_type"] for n in workflow(name).values()} - set(info)
        allowed = MORE_EXAMPLES.get(name, set())
        assert not missing - allowed, f"{name} uses nodes this server does not have: {missing}"


def test_loader_model_only(comfy_server):
    pixels, reports = [], []
    for strength in (1.0, 0.0):
        graph = unique(workflow("lycoris_loader_model_only_api.json"))
        loader = node_of(graph, "LycorisLoaderModelOnly")
        graph[loader]["inputs"]["strength_model"] = strength
        entry = comfy_server.run(graph, timeout=300)
        pixels.append(image(comfy_server, entry))
        reports.append(ui_text(entry, loader))
    assert "strength_model 1" in reports[0] and "modules matched" in reports[0], reports[0]
    assert np.abs(pixels[0] - pixels[1]).max() > 0, "the adapter did not change the image"


def sample_steps(comfy_server, graph: dict) -> np.ndarray:
    return image(comfy_server, comfy_server.run(unique(graph), timeout=300))


def pinned_runtime(comfy_server) -> bool:
    """The March-2024 ComfyUI: its sampler does not pass the sigmas (no step-count keyframes) and it has
    no TorchCompileModel."""
    return "TorchCompileModel" not in comfy_server.object_info()


def test_schedule_lightning_first_two_steps(comfy_server):
    """The lightning example (the LoRA for the first 2 of 6 steps): its image differs from both the
    unscheduled LoRA's and the plain model's, and the report names the schedule. The pinned runtime
    cannot count steps: it refuses the workflow with a message saying what to use instead."""
    graph = unique(workflow("lycoris_schedule_api.json"))
    loader, schedule = node_of(graph, "LycorisLoader"), node_of(graph, "LycorisSchedule")
    assert graph[schedule]["inputs"]["preset"] == "first 2 steps" and graph[node_of(graph, "KSampler")]["inputs"][
        "steps"] > 2
    if pinned_runtime(comfy_server):
        entry = comfy_server.wait_history(comfy_server.post_prompt(graph), timeout=300, check=False)
        errors = [m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and "keyframes in steps" in errors[0] and "fractions" in errors[0], entry["status"]
        return
    entry = comfy_server.run(graph, timeout=300)
    scheduled = image(comfy_server, entry)
    report = ui_text(entry, loader)
    assert "schedule: 0:1, 2 steps:0 (hold)" in report, report
    always = json.loads(json.dumps(graph))
    always[schedule]["inputs"]["preset"] = "always"
    off = json.loads(json.dumps(graph))
    off[loader]["inputs"]["strength_model"] = 0.0
    assert np.abs(scheduled - sample_steps(comfy_server, always)).max() > 0, "the schedule changed nothing"
    assert np.abs(scheduled - sample_steps(comfy_server, off)).max() > 0, "the scheduled LoRA had no effect"


def test_schedule_negative_pass(comfy_server):
    """The negative-pass example (the LoRA on the positive pass only): its image differs from the LoRA
    on both passes and from the plain model, and the report says the negative multiplier."""
    graph = unique(workflow("lycoris_schedule_negative_api.json"))
    loader, schedule = node_of(graph, "LycorisLoader"), node_of(graph, "LycorisSchedule")
    assert graph[schedule]["inputs"]["negative_multiplier"] == 0.0
    entry = comfy_server.run(graph, timeout=300)
    positive_only = image(comfy_server, entry)
    report = ui_text(entry, loader)
    assert "schedule: 0:1 (hold), negative pass x0" in report, report
    both = json.loads(json.dumps(graph))
    both[schedule]["inputs"]["negative_multiplier"] = 1.0
    off = json.loads(json.dumps(graph))
    off[loader]["inputs"]["strength_model"] = 0.0
    assert np.abs(positive_only - sample_steps(comfy_server, both)).max() > 0, "the negative multiplier did nothing"
    assert np.abs(positive_only - sample_steps(comfy_server, off)).max() > 0, "the LoRA had no effect"


def sampled_latent(comfy_server, graph: dict) -> torch.Tensor:
    """The sampler's latent of `graph`, saved by SaveLatent in place of the decode and the image (the
    tiny test VAE rounds small differences away)."""
    from safetensors.torch import load_file

    graph = json.loads(json.dumps(graph))
    sampler = node_of(graph, "KSampler")
    for node in [key for key, n in graph.items() if n["class_type"] in ("VAEDecode", "SaveImage")]:
        del graph[node]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "lycoris_e2e"}}
    [path] = comfy_server.output_files(comfy_server.run(unique(graph), timeout=900), kind="latents")
    return load_file(str(path))["latent_tensor"]


def test_compile(comfy_server):
    """The loader followed by core's TorchCompileModel (inductor, on the server's CPU): the compiled
    model samples the uncompiled one's latent (to float rounding), and the LoRA shows in it far above
    that rounding. The pinned runtime has no TorchCompileModel."""
    if pinned_runtime(comfy_server):
        pytest.skip("the pinned March-2024 ComfyUI has no TorchCompileModel (core added it later in 2024)")
    graph = workflow("lycoris_compile_api.json")
    compile_node, loader = node_of(graph, "TorchCompileModel"), node_of(graph, "LycorisLoader")
    assert graph[node_of(graph, "KSampler")]["inputs"]["model"] == [compile_node, 0]
    compiled = sampled_latent(comfy_server, graph)
    eager = json.loads(json.dumps(graph))
    eager[node_of(eager, "KSampler")]["inputs"]["model"] = [loader, 0]
    del eager[compile_node]
    uncompiled = sampled_latent(comfy_server, eager)
    off = json.loads(json.dumps(eager))
    off[loader]["inputs"]["strength_model"] = 0.0
    effect = (uncompiled - sampled_latent(comfy_server, off)).abs().max().item()
    error = (compiled - uncompiled).abs().max().item()
    assert effect > 1e-3 and error < effect / 100, f"LoRA effect {effect}, compiled vs uncompiled {error}"


def test_stack(comfy_server, e2e_models):
    """Three rows posted as API JSON: the two that are on are applied (one merged, one bypassed with
    block weights), the third is off; the image changes with the stack, and the report carries each
    row and the hash Civitai reads."""
    from lycoris_core.trigger_words import tensor_sha256

    models, _ = e2e_models
    graph = unique(workflow("lycoris_stack_api.json"))
    node = node_of(graph, "LycorisStack")
    entry = comfy_server.run(graph, timeout=300)
    stacked = image(comfy_server, entry)
    report = ui_text(entry, node)
    assert report.startswith("LyCORIS stack: 2 of 3 rows applied"), report
    assert "[row 1] LyCORIS e2e_kohya_lora" in report and "[row 2] LyCORIS e2e_kohya_dylora" in report, report
    assert "[row 3] e2e_kohya_lora.safetensors: off" in report and "block weights (named, sd1)" in report, report
    assert "overlap: row 1 and row 2 both change" in report, report
    digest = tensor_sha256(str(models / "loras" / LORA))[:12]
    assert f"hash: e2e_kohya_lora: {digest}" in report, report

    off = unique(workflow("lycoris_stack_api.json"))
    off[node]["inputs"].update({"rows.on_1": False, "rows.on_2": False})
    assert np.abs(stacked - image(comfy_server, comfy_server.run(off, timeout=300))).max() > 0, \
        "the stack did not change the image"


def test_block_weight(comfy_server):
    from lycoris_core.block_weights import parse_block_weights
    from lycoris_core.blocks import architecture_blocks

    graph = unique(workflow("lycoris_block_weight_api.json"))
    block_node, loader = node_of(graph, "LycorisBlockWeight"), node_of(graph, "LycorisLoader")
    preset = graph[block_node]["inputs"]["preset"]
    entry = comfy_server.run(graph, timeout=300)
    weighted = image(comfy_server, entry)
    expected = parse_block_weights(preset, "sd1", architecture_blocks("sd1")).describe(compact=True)
    assert f"preset {preset}" in ui_text(entry, block_node), ui_text(entry, block_node)
    report = ui_text(entry, loader)
    assert f"block weights (named, sd1): {expected}" in report, report

    ones = unique(workflow("lycoris_block_weight_api.json"))
    ones[block_node]["inputs"].update(preset="none", weights="")
    plain = image(comfy_server, comfy_server.run(ones, timeout=300))
    assert np.abs(weighted - plain).max() > 0, "the block weights did not change the image"


def test_resize(comfy_server, e2e_models, written):
    from lycoris_core import load_adapter_file

    models, _ = e2e_models
    graph = workflow("lycoris_resize_api.json")
    rank = graph["1"]["inputs"]["rank"]
    path, report = run_utility(comfy_server, graph, written)
    resized, source = load_adapter_file(path), load_adapter_file(models / "loras" / LORA)
    assert resized.ranks() == [rank] and set(resized.adapters) == set(source.adapters), report
    assert "relative error" in report


def test_dylora_slice(comfy_server, e2e_models, written):
    from lycoris_core import load_adapter_file
    from lycoris_core.dylora import new_alpha

    models, _ = e2e_models
    graph = workflow("lycoris_dylora_slice_api.json")
    rank = graph["1"]["inputs"]["rank"]
    path, report = run_utility(comfy_server, graph, written)
    source, sliced = load_adapter_file(models / "loras" / DYLORA), load_adapter_file(path)
    assert sliced.ranks() == [rank] and set(sliced.adapters) == set(source.adapters)
    assert sliced.metadata["lycoris_pack.alpha_policy"] == "sds-train", report  # read from networks.dylora
    for name, adapter in source.adapters.items():
        torch.testing.assert_close(sliced.adapters[name].tensors["lora_down.weight"],
                                   adapter.tensors["lora_down.weight"][:rank])
        assert sliced.adapters[name].alpha == pytest.approx(
            new_alpha("sds-train", adapter.alpha, adapter.rank, rank), rel=1e-3)


def test_combine(comfy_server, e2e_models, written):
    from lycoris_core import load_adapter_file

    models, _ = e2e_models
    graph = workflow("lycoris_combine_api.json")
    inputs = graph["1"]["inputs"]
    sources = [load_adapter_file(models / "loras" / inputs[f"lycoris_name_{i}"]) for i in (1, 2)]
    path, report = run_utility(comfy_server, graph, written)
    combined = load_adapter_file(path)
    assert inputs["rank"] == 0  # exact: the ranks add up
    assert combined.ranks() == [sum(s.ranks()[0] for s in sources)], report
    assert set(combined.adapters) == set(sources[0].adapters) | set(sources[1].adapters)


def test_extract(comfy_server, e2e_models, written):
    from lycoris_core import load_adapter_file

    models, _ = e2e_models
    graph = workflow("lycoris_extract_api.json")
    extract = node_of(graph, "LycorisExtract")
    path, report = run_utility(comfy_server, graph, written)
    extracted, source = load_adapter_file(path), load_adapter_file(models / "loras" / LORA)
    # the diffusion-model layers the LoRA changed, and only those, come back, at the LoRA's rank
    changed = {name for name in source.adapters if name.startswith("lora_unet_")}
    assert changed and set(extracted.adapters) == changed, set(extracted.adapters) ^ changed
    assert extracted.ranks() == [min(graph[extract]["inputs"]["rank"], source.ranks()[0])], report


def test_merge_to_checkpoint(comfy_server, e2e_models, written):
    from lycoris_core import load_adapter_file
    from lycoris_core.safe_io import load_tensors

    models, _ = e2e_models
    path, report = run_utility(comfy_server, workflow("lycoris_merge_to_checkpoint_api.json"), written)
    (base, _), (merged, _) = load_tensors(models / "checkpoints" / CHECKPOINT_NAME), load_tensors(path)
    assert set(merged) == set(base)
    modules = set(load_adapter_file(models / "loras" / LORA).adapters)
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed == {key for key in base if make_models.kohya_name(key) in modules}, report
    assert all(merged[key].dtype == base[key].dtype for key in base)  # "as stored"


def test_inspect(comfy_server):
    graph = unique(workflow("lycoris_inspect_api.json"))
    entry = comfy_server.run(graph, timeout=300)
    report = ui_text(entry, node_of(graph, "LycorisInspect"))
    assert f"Inspect LyCORIS: {LORA}" in report and "algorithms: lora x" in report, report
    heatmap = image(comfy_server, entry)
    assert heatmap.shape[0] > 64 and heatmap.std() > 0


def test_an_api_prompt_with_the_loaders_old_input_name_still_runs(comfy_server):
    """API workflows saved before the loaders' file input became `lora_name` (like core's LoraLoader)
    name it `lycoris_name`: the server validates and runs them."""
    graph = unique(workflow("lycoris_loader_model_only_api.json"))
    loader = node_of(graph, "LycorisLoaderModelOnly")
    inputs = graph[loader]["inputs"]
    inputs["lycoris_name"] = inputs.pop("lora_name")
    inputs["strength_model"] = 0.7
    entry = comfy_server.run(graph, timeout=300)
    report = ui_text(entry, loader)
    assert "LyCORIS e2e_kohya_lora.safetensors (mode auto, strength_model 0.7)" in report, report
    assert "0 unmatched" in report and entry["outputs"][loader]["lycoris_warning"] == [], report


def test_the_ui_examples_are_the_templates_comfyui_lists(comfy_server):
    """ComfyUI's template browser (GET /api/workflow_templates, 0.28) lists the pack's UI examples by
    their titles, and no API twin (which it could not open); each is served as a UI workflow."""
    from urllib.parse import quote

    from e2e.server import PACK_DIR_NAME

    status, body = comfy_server.get_raw("/api/workflow_templates")
    if status == 404:
        pytest.skip("this ComfyUI has no template browser (/api/workflow_templates came after March 2024)")
    listed = json.loads(body)[PACK_DIR_NAME]
    titles = sorted(path.stem for path in WORKFLOWS.parent.glob("*.json"))
    assert sorted(listed) == titles and all(title.startswith("LyCORIS ") for title in titles), listed
    for title in titles:
        status, raw = comfy_server.get_raw(f"/api/workflow_templates/{PACK_DIR_NAME}/{quote(title)}.json")
        assert status == 200, (title, status)
        served = json.loads(raw)
        assert "nodes" in served and served["extra"]["lycoris_api_twin"].startswith("api/"), title
