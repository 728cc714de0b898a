"""Write the UI-format example workflows (drag-and-drop, and ComfyUI's template browser) from each
example_workflows/api/<name>_api.json.

    .venv/bin/python tests/web/make_ui_workflows.py [NAME_api.json ...]

ComfyUI 0.28 lists every `example_workflows/*.json` of a custom node in its template browser and
shows the file name as the title and, with `-`/`_` read as spaces, as the description (it reads no
index for custom nodes): so each UI file is named by its title (`TITLES`), the API twins live in
`api/` (an API-format file opened as a template would be refused), and each UI file names its twin
in `extra.lycoris_api_twin`. Each gets a Note saying what to pick (`NOTES`), and its file widgets
the property `lycoris_example_files`: web/js/lycoris_examples.js replaces a file the user does not
have with the first one they do, so an example runs as opened.

Runs the real front-end: a ComfyUI server with this pack (the pinned runtime unless COMFYUI_PATH
says otherwise; its UI files load in the current front-end too) and headless Chromium. An example with a
core node the pinned runtime lacks (`lycoris_compile_api.json`: TorchCompileModel) is written with
`COMFYUI_PATH=.cache/comfyui-recent`, whose front-end saves a newer (equally loadable) layout. Each API
workflow goes through the front-end's own `app.loadApiJson`; widget values are then set back to
exactly the API file's inputs (loading runs widget callbacks, e.g. the block-weight editor fills
`weights` from a preset), seeds are fixed, the graph is laid out left to right, and
`app.graph.serialize()` is written after checking that `app.graphToPrompt()` gives the API
file's nodes and inputs back. The models the workflows name are generated as for the tests.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKFLOWS = REPO / "example_workflows"
API_WORKFLOWS = WORKFLOWS / "api"
# API file -> the UI file's name: its title in the template browser
TITLES = {
    "lycoris_loader_api.json": "LyCORIS 1 - Load a LoRA or LyCORIS file (mode auto)",
    "lycoris_loader_model_only_api.json": "LyCORIS 2 - Load an adapter on the model only",
    "lycoris_block_weight_api.json": "LyCORIS 3 - Block weights (strength per UNet block)",
    "lycoris_inspect_api.json": "LyCORIS 4 - Inspect a file (report and block heat map)",
    "lycoris_resize_api.json": "LyCORIS 5 - Resize a LoRA to a lower rank",
    "lycoris_combine_api.json": "LyCORIS 6 - Combine adapters into one file",
    "lycoris_dylora_slice_api.json": "LyCORIS 7 - Slice a DyLoRA to a rank",
    "lycoris_extract_api.json": "LyCORIS 8 - Extract a LoRA from a model and a tuned model",
    "lycoris_merge_to_checkpoint_api.json": "LyCORIS 9 - Merge adapters into a checkpoint file",
    "lycoris_stack_api.json": "LyCORIS 10 - A stack of adapters in one node",
    "lycoris_schedule_api.json": "LyCORIS 11 - A lightning LoRA for the first 2 steps (schedule)",
    "lycoris_schedule_negative_api.json": "LyCORIS 12 - Another strength on the negative pass (schedule)",
    "lycoris_compile_api.json": "LyCORIS 13 - Load LyCORIS then torch.compile",
}
# API file -> core nodes it needs that the pinned March-2024 runtime lacks (its front-end cannot load it)
NEWER_RUNTIME = {"lycoris_compile_api.json": {"TorchCompileModel"}}
_PICK = ("The file boxes name the pack's test files; where you do not have them, the first file of your "
         "folder is put in their place: pick your own before running.")
NOTES = {
    "lycoris_stack_api.json": "Pick your checkpoint, then one file per row of Load LyCORIS Stack (add rows with "
    "its rows count); each row has its own strengths, mode and block weights. The report on the node lists every "
    "row and where rows overlap.",
    "lycoris_schedule_api.json": "Pick your checkpoint and, in Load LyCORIS, a lightning/turbo/hyper LoRA. "
    "LyCORIS Schedule (preset first 2 steps) keeps it for the first 2 steps of KSampler; the base model does the "
    "rest. Try other presets or your own keyframes (0:1, 0.3:0). Needs a 2025+ ComfyUI to count steps (older: "
    "use first 25%).",
    "lycoris_schedule_negative_api.json": "Pick your checkpoint and your LoRA. LyCORIS Schedule (preset always) "
    "with negative_multiplier 0 applies the LoRA to the positive prompt's pass only; 0.5 would halve it on the "
    "negative pass. The negative pass runs only with cfg above 1.",
    "lycoris_compile_api.json": "Pick your checkpoint and your adapter. TorchCompileModel goes after Load "
    "LyCORIS, right before the sampler; the first run compiles (minutes), later runs reuse the compiled code. "
    "Leave mode on auto; the loader's report says how each layer is applied.",
    "lycoris_loader_api.json": "Pick your checkpoint and, in Load LyCORIS, your LoRA or LyCORIS file (any "
    "format). Leave mode on auto. After a run the node shows its report; an orange node means the file does "
    "not fit this model (e.g. an SDXL LoRA on an SD1.5 checkpoint).",
    "lycoris_loader_model_only_api.json": "Pick your checkpoint and your adapter. Model only: the file's "
    "text-encoder part is skipped. Leave mode on auto.",
    "lycoris_block_weight_api.json": "Pick your checkpoint and adapter, then a preset or type block weights "
    "(IN04=0.5, OUT*=0) in LyCORIS Block Weight; the editor shows the blocks of the connected model.",
    "lycoris_inspect_api.json": "Pick a file in Inspect LyCORIS (the checkpoint is optional: it gives the "
    "block layout). The report shows on the node; the heat map in Preview Image.",
    "lycoris_resize_api.json": "Pick a LoRA/LoCon file and a rank; the new file is written into your loras "
    "folder (output_name). The report on the node gives the path and the error per layer.",
    "lycoris_combine_api.json": "Pick two or three adapters and their weights; rank 0 joins LoRA ranks "
    "exactly. The new file goes into your loras folder.",
    "lycoris_dylora_slice_api.json": "Pick a DyLoRA file (trained with DyLoRA) and a rank; the sliced file goes "
    "into your loras folder.",
    "lycoris_extract_api.json": "Pick the base checkpoint and the LoRA that makes the tuned model (or connect "
    "any two models); the extracted file goes into your loras folder.",
    "lycoris_merge_to_checkpoint_api.json": "Pick the checkpoint and up to three adapters; the merged checkpoint "
    "goes into your checkpoints folder (output_name).",
}
for path in (HERE.parent, HERE, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.append(str(path))

SETTLE_JS = """() => new Promise((resolve) => setTimeout(resolve, 50))"""

RESTORE_JS = """(api) => {
    // the API inputs, exactly; callbacks are not run (loading already ran them once)
    for (const [id, data] of Object.entries(api)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(data.inputs)) {
            if (Array.isArray(value)) continue;
            const widget = node.widgets?.find((w) => w.name === name);
            if (widget) widget.value = value;
        }
        for (const widget of node.widgets ?? []) {
            if (widget.name === "control_after_generate") widget.value = "fixed";
        }
    }
    for (const node of app.graph._nodes) {  // room for file names in combos
        if (node.widgets?.length && node.size[0] < 380) node.setSize([380, node.size[1]]);
    }
    app.graph.arrange(60);
    const nodes = app.graph._nodes;
    const left = Math.min(...nodes.map((n) => n.pos[0])), top = Math.min(...nodes.map((n) => n.pos[1]));
    for (const node of nodes) node.pos = [Math.round(node.pos[0] - left + 40), Math.round(node.pos[1] - top + 60)];
    app.graph.setDirtyCanvas(true, true);
}"""


def _default(spec) -> object:
    """The default value of an input spec from /object_info ([type or choices, options])."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    return {"STRING": "", "BOOLEAN": False, "INT": 0, "FLOAT": 0.0}.get(kind)


def _plain(value):
    """Links compare as lists (JSON has no tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def same_prompt(prompt: dict, api: dict, object_info: dict) -> list[str]:
    """Differences between a front-end prompt (graphToPrompt's output) and an API workflow: node
    ids, class types and inputs. The front-end's `_meta` titles are ignored, and so is an optional
    widget input the API file leaves out while the front-end sends its default (the front-end
    always sends its widgets; the node reads the same either way)."""
    problems = []
    if set(prompt) != set(api):
        problems.append(f"node ids {sorted(prompt)} != {sorted(api)}")
    for node_id in sorted(set(prompt) & set(api)):
        got, want = prompt[node_id], api[node_id]
        if got["class_type"] != want["class_type"]:
            problems.append(f"node {node_id}: {got['class_type']} != {want['class_type']}")
            continue
        optional = object_info.get(want["class_type"], {}).get("input", {}).get("optional", {})
        for name in sorted(set(got["inputs"]) | set(want["inputs"])):
            if name not in want["inputs"]:
                value = got["inputs"][name]
                if not (name in optional and not isinstance(value, list) and value == _default(optional[name])):
                    problems.append(f"node {node_id} ({want['class_type']}): the front-end adds {name}={value!r}")
            elif name not in got["inputs"]:
                problems.append(f"node {node_id} ({want['class_type']}): the front-end drops {name}")
            elif _plain(got["inputs"][name]) != _plain(want["inputs"][name]):
                problems.append(f"node {node_id} ({want['class_type']}): {name} is {got['inputs'][name]!r}, "
                                f"the API file has {want['inputs'][name]!r}")
    return problems


def ui_workflow(page, api: dict, object_info: dict) -> dict:
    """The UI-format workflow the front-end makes of `api` (see the module docstring)."""
    import time

    page.page.evaluate("(api) => app.loadApiJson(api, 'workflow.json')", api)
    time.sleep(1.5)  # route answers land, editors resize their nodes
    page.page.evaluate(RESTORE_JS, api)
    page.settle(0.5)
    problems = same_prompt(page.graph_to_prompt(), api, object_info)
    if problems:
        raise SystemExit("the front-end does not give the API workflow back:\n" + "\n".join(problems))
    workflow = page.page.evaluate("() => app.graph.serialize()")
    workflow.pop("extra", None)  # view state of this browser window
    return workflow


NOTE_JS = """(text) => {
    const note = LiteGraph.createNode("Note");
    const nodes = app.graph._nodes;
    note.pos = [40, Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 60];
    app.graph.add(note);
    note.widgets[0].value = text;
    note.setSize([520, 120]);
    return note.id;
}"""


def example(page, api_name: str, api: dict, object_info: dict) -> dict:
    """The UI example of `api_name`: the front-end's workflow, a Note, file widgets that fall back."""
    workflow = ui_workflow(page, api, object_info)
    for node in workflow["nodes"]:
        files = [name for name, value in api.get(str(node["id"]), {}).get("inputs", {}).items()
                 if isinstance(value, str) and value.endswith(".safetensors")]
        if files:
            node.setdefault("properties", {})["lycoris_example_files"] = files
    page.page.evaluate("(w) => app.loadGraphData(w)", workflow)
    page.settle(0.5)
    page.page.evaluate(NOTE_JS, NOTES[api_name] + " " + _PICK)
    workflow = page.page.evaluate("() => app.graph.serialize()")
    workflow["extra"] = {"lycoris_api_twin": f"api/{api_name}"}
    return workflow


def write_models(models: Path) -> None:
    """The checkpoint and adapters the example workflows name (as the browser tests make them)."""
    import torch

    import run_main_job
    from comfyui_runtime import import_comfy

    import_comfy()
    from e2e import make_models

    with torch.inference_mode():
        make_models.write_checkpoint(models / "checkpoints" / make_models.CHECKPOINT_NAME)
        shapes = make_models.weight_shapes()
        make_models.write_kohya_lora(models / "loras" / "e2e_kohya_lora.safetensors", shapes, rank=4, seed=1)
        make_models.write_kohya_dylora(models / "loras" / "e2e_kohya_dylora.safetensors", shapes, rank=8, unit=2,
                                       seed=2)
    run_main_job.write_models(models)


def main(names: list[str]) -> None:
    from comfy_browser import ComfyPage, fresh_page, launch_chromium
    from e2e.server import ComfyServer

    sources = [API_WORKFLOWS / name for name in names] if names else sorted(API_WORKFLOWS.glob("*_api.json"))
    with tempfile.TemporaryDirectory(prefix="lycoris-ui-workflows-") as work:
        models = Path(work) / "models"
        write_models(models)
        with ComfyServer(Path(work) / "server", models) as server, launch_chromium() as browser:
            page = ComfyPage(fresh_page(browser), server.url)
            page.open()
            object_info = server.object_info()
            for source in sources:
                api = json.loads(source.read_text())
                target = WORKFLOWS / f"{TITLES[source.name]}.json"
                target.write_text(json.dumps(example(page, source.name, api, object_info), indent=2) + "\n")
                print(f"wrote {target.relative_to(REPO)}")
            if page.pack_errors():
                raise SystemExit("the pack's front-end raised:\n" + "\n".join(page.pack_errors()))


if __name__ == "__main__":
    main(sys.argv[1:])
