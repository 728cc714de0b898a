"""The pack's front-end in headless Chromium on the real ComfyUI page (the runtime under test:
the pinned March-2024 front-end, or the current one with COMFYUI_PATH).

What a person does is what the tests do: load an example workflow, pick a preset in the node's
combo with the mouse, type block weights into the editor's cells with the keyboard, click the
queue button, and read what the server ran from its history. The oracle for every weights text
is lycoris_core's own parser (what the node reads); screenshots go to out/test_artifacts/
(<name>_<rendering>.png). Tests taking `vue_nodes` run with the new front-end's nodes drawn on the
canvas and rendered as Vue components ("Nodes 2.0"), once on the March-2024 front-end."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from comfy_browser import NO_VUE_NODES
from make_ui_workflows import NEWER_RUNTIME, same_prompt

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
PNG = b"\x89PNG\r\n\x1a\n"


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def ui_examples() -> dict[str, Path]:
    """API twin (api/<name>_api.json) -> the UI example that names it."""
    return {json.loads(p.read_text()).get("extra", {}).get("lycoris_api_twin"): p for p in WORKFLOWS.glob("*.json")}


def example(api_name: str) -> dict:
    """The UI example whose API twin is example_workflows/api/<api_name>."""
    return json.loads(ui_examples()[f"api/{api_name}"].read_text())


def vector(text: str, architecture: str = "sd1") -> dict[str, float]:
    """What the node reads from `text` (seed 0, as the /lycoris/blocks presets)."""
    from lycoris_core.block_weights import parse_block_weights
    from lycoris_core.blocks import architecture_blocks

    return parse_block_weights(text, architecture, architecture_blocks(architecture), seed=0).vector


def items(text: str) -> list[tuple[str, float]]:
    return [(selector.strip(), float(value)) for selector, value in
            (item.split("=") for item in text.split(", ") if item)]


def cell_values(page, node_id: int) -> dict[str, float | None]:
    return page.page.evaluate(
        """(id) => Object.fromEntries([...document.querySelectorAll(
               `.lycoris-blocks[data-lycoris-node="${id}"] input[data-lycoris-block]`)]
               .map((input) => [input.dataset.lycorisBlock, Number.isNaN(input.valueAsNumber) ? null : input.valueAsNumber]))""",
        node_id)


def editor(page, node_id: int):
    return page.page.locator(f'.lycoris-blocks[data-lycoris-node="{node_id}"]')


def wait_text(locator, pattern: str, timeout: float = 20_000) -> str:
    """The locator's text once it matches `pattern` (a regular expression)."""
    from playwright.sync_api import expect

    expect(locator).to_contain_text(re.compile(pattern), timeout=timeout)
    return locator.inner_text()


def shown_in_node(page, node_id: int, panel_class: str) -> None:
    """With Vue nodes the pack's panel is a DOM widget inside the node's element, and visible."""
    if page.vue_nodes:
        page.scroll_to(node_id)
        assert page.vue_node(node_id).locator(f".{panel_class}").is_visible()


def test_block_weights_typed_in_the_editor_are_what_the_server_runs(comfy_page, vue_nodes, web_server, artifacts):
    page = comfy_page
    page.load_workflow(example("lycoris_block_weight_api.json"))
    node = page.node_id("LycorisBlockWeight")
    shown_in_node(page, node, "lycoris-blocks")
    assert page.widget_value(node, "preset") == "SD-INALL" and page.widget_value(node, "weights") == ""

    # auto: the editor followed the model link to the checkpoint and shows the preset's values
    wait_text(editor(page, node).locator(".lycoris-status"), r"^sd1 · 27 blocks of e2e_tiny_sd15")
    assert cell_values(page, node) == vector("SD-INALL")

    # a preset picked in the combo menu fills the cells and writes its named weights
    page.choose_combo(node, "preset", "SD-OUTALL")
    assert page.widget_value(node, "preset") == "SD-OUTALL"
    written = page.widget_value(node, "weights")
    assert vector(written) == vector("SD-OUTALL") != vector("SD-INALL"), written
    assert all(value != 1 for _, value in items(written)), written  # only the blocks not at 1
    assert cell_values(page, node) == vector("SD-OUTALL")

    # typing into two cells: the text follows, the preset no longer applies
    page.type_into(page.block_cell(node, "IN04"), "0.5")
    # a value of its own per rendering: the server would take a prompt it ran already from its cache
    # and report nothing new for it
    typed = 0.75 if page.vue_nodes else 0.25
    page.type_into(page.block_cell(node, "OUT05"), str(typed))
    expected = {**vector("SD-OUTALL"), "IN04": 0.5, "OUT05": typed}
    weights = page.widget_value(node, "weights")
    assert vector(weights) == expected, weights
    assert all(value != 1 for _, value in items(weights)), weights
    assert page.widget_value(node, "preset") == "none"
    assert cell_values(page, node) == expected

    # queued with the front-end's button: the server runs exactly what the widget wrote
    prompt_id = page.queue_with_button()
    entry = web_server.wait_history(prompt_id, timeout=240)
    ran = entry["prompt"][2][str(node)]["inputs"]
    assert (ran["preset"], ran["weights"]) == ("none", weights)
    [image] = web_server.output_files(entry)
    assert image.read_bytes()[:8] == PNG
    loader = str(page.node_id("LycorisLoader"))
    from lycoris_core.block_weights import parse_block_weights
    from lycoris_core.blocks import architecture_blocks

    resolved = parse_block_weights(weights, "sd1", architecture_blocks("sd1")).describe(compact=True)
    report = "\n".join(entry["outputs"][loader]["text"])
    assert f"block weights (named, sd1): {resolved}" in report, report

    # the node's report comes back to the editor; a person looks at the screenshot
    wait_text(editor(page, node).locator(".lycoris-report"), r"LyCORIS Block Weight \(sd1\)")
    page.view_from_left()
    shot = page.screenshot(artifacts / f"browser_block_weights_{page.rendering}.png")
    assert shot.read_bytes()[:8] == PNG


def test_editor_and_panel_follow_a_switch_of_node_rendering_in_the_open_page(comfy_page):
    """Nodes 2.0 switched on and off again in the settings while a workflow is open: the same editor
    and panel move between the canvas and the Vue nodes and keep writing the weights."""
    page = comfy_page
    if not page.is_new_frontend:
        pytest.skip(NO_VUE_NODES)
    page.load_workflow(example("lycoris_block_weight_api.json"))
    node = page.node_id("LycorisBlockWeight")
    loader = page.node_id("LycorisLoader")
    wait_text(editor(page, node).locator(".lycoris-status"), r"^sd1 · 27 blocks")
    expected = vector("SD-INALL")
    for on, block, value in ((True, "OUT03", 0.3), (False, "IN05", 0.6)):
        page.switch_vue_nodes(on)
        shown_in_node(page, loader, "lycoris-info")
        shown_in_node(page, node, "lycoris-blocks")
        page.scroll_to(node)
        page.type_into(page.block_cell(node, block), str(value))
        expected[block] = value
        assert vector(page.widget_value(node, "weights")) == expected
        assert cell_values(page, node) == expected
        assert page.page.locator(".lycoris-blocks").count() == 1  # moved, not built a second time
    text = wait_text(page.page.locator(f'.lycoris-info[data-lycoris-node="{loader}"]'), "algorithms:")
    assert "lora ×120" in text, text


def test_info_panel_shows_what_the_selected_file_holds(comfy_page, vue_nodes, e2e_models, artifacts):
    from lycoris_core import load_adapter_file
    from lycoris_core.inspection import summarize

    page = comfy_page
    models, _ = e2e_models
    page.load_workflow(example("lycoris_loader_api.json"))
    node = page.node_id("LycorisLoader")
    name = page.widget_value(node, "lora_name")
    panel = page.page.locator(f'.lycoris-info[data-lycoris-node="{node}"]')
    shown_in_node(page, node, "lycoris-info")

    summary = summarize(load_adapter_file(models / "loras" / name))
    assert len(summary["algorithms"]) > 1 and summary["trigger_words"]  # a mixed file with trigger words
    text = wait_text(panel, "algorithms:")
    for algorithm, count in summary["algorithms"].items():
        assert f"{algorithm} ×{count}" in text, text
    assert f"rank: {', '.join(map(str, summary['ranks']))}" in text, text
    assert f"base model: {summary['training']['ss_base_model_version']}" in text, text
    assert f"trigger words: {summary['trigger_words'][0][0]}" in text, text
    page.view_from_left()
    page.screenshot(artifacts / f"browser_info_panel_{page.rendering}.png")

    # another file picked in the combo menu: the panel follows
    page.choose_combo(node, "lora_name", "e2e_kohya_lora.safetensors")
    other = summarize(load_adapter_file(models / "loras" / "e2e_kohya_lora.safetensors"))
    [(algorithm, count)] = other["algorithms"].items()
    text = wait_text(panel, rf"algorithms: {algorithm} ×{count} ")
    assert "loha" not in text and "trigger words: none recorded" in text, text

    # a name the loras folders do not list: the server's refusal, shown politely
    page.page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'lora_name')"
                       ".value = 'gone.safetensors'; }", node)
    page.settle()
    text = wait_text(panel, "cannot show")
    assert "cannot show gone.safetensors: 'gone.safetensors' is not in the loras folders" in text, text


def test_editor_reads_the_architecture_from_the_combo_or_through_a_reroute(comfy_page, vue_nodes):
    from lycoris_core.blocks import architecture_blocks

    page = comfy_page
    node = page.page.evaluate("""() => {
        app.graph.clear();
        const node = LiteGraph.createNode("LycorisBlockWeight");
        node.pos = [100, 100];
        app.graph.add(node);
        return node.id;
    }""")
    page.settle()
    wait_text(editor(page, node), "connect a model or pick the architecture")
    assert cell_values(page, node) == {}

    page.choose_combo(node, "architecture", "flux")
    wait_text(editor(page, node).locator(".lycoris-status"), r"^flux · 60 blocks")
    assert list(cell_values(page, node)) == architecture_blocks("flux")
    page.choose_combo(node, "preset", "FLUX-DBL-ALL")
    written = page.widget_value(node, "weights")
    assert vector(written, "flux") == vector("FLUX-DBL-ALL", "flux"), written

    # auto again, the model through a reroute: the checkpoint's architecture
    page.page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        const loader = LiteGraph.createNode("CheckpointLoaderSimple");
        loader.pos = [100, 600];
        app.graph.add(loader);
        loader.widgets.find((w) => w.name === "ckpt_name").value = "e2e_tiny_sd15.safetensors";
        const reroute = LiteGraph.createNode("Reroute");
        reroute.pos = [500, 600];
        app.graph.add(reroute);
        loader.connect(0, reroute, 0);
        reroute.connect(0, node, node.inputs.findIndex((input) => input.name === "model"));
        node.widgets.find((w) => w.name === "architecture").value = "auto";
    }""", node)
    page.settle()
    wait_text(editor(page, node).locator(".lycoris-status"), r"^sd1 · 27 blocks of e2e_tiny_sd15")


def test_weights_text_round_trips_through_the_nodes_parser(comfy_page):
    """The editor's writer and reader (web/js/lycoris_weights_text.js) against lycoris_core's parser."""
    from lycoris_core.block_weights import BlockWeightError
    from lycoris_core.blocks import architecture_blocks

    page = comfy_page
    url = page.page.evaluate("async () => (await (await fetch('/extensions')).json())"
                             ".find((path) => path.endsWith('/lycoris_weights_text.js'))")
    assert url, "the pack's web/js is not served"
    rng = random.Random(7)
    cases = []
    for architecture in ("sd1", "sdxl", "flux", "wan"):
        ids = architecture_blocks(architecture)
        for _ in range(6):
            values = {i: rng.choice([0.0, 0.25, 0.5, 1.0, 1.0, 1.0, 1.5, -0.5]) for i in ids}
            cases.append((architecture, ids, values))
        cases.append((architecture, ids, {i: 1.0 for i in ids}))
    texts = page.page.evaluate(
        """async ([url, cases]) => {
            const { formatWeights } = await import(url);
            return cases.map(([arch, ids, values]) => formatWeights(ids, values));
        }""", [url, cases])
    for (architecture, ids, values), text in zip(cases, texts):
        if all(v == 1 for v in values.values()):
            assert text == ""
        assert vector(text, architecture) == values, (architecture, text)
        assert all(value != 1 for _, value in items(text)), text

    sd1 = architecture_blocks("sd1")
    readable = ["IN04=0.5, OUT*=0", "in4=0.5; MID=2", "IN05-OUT05=0.3", "DEFAULT=0, IN=1, TE=0.5",
                "*=0.5\nTE=0", "OUT0?=0, OUT1?=0.2", "M=0.7, BASE=0", "IN00-IN11=0, M00=0.5, OUT00-OUT11=1"]
    refused = ["1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "IN04=R", "%in=0", "XX=1", "OUT05-IN05=1", "SD-MIDD"]
    answers = page.page.evaluate(
        """async ([url, ids, texts]) => {
            const { parseNamedWeights } = await import(url);
            return texts.map((text) => parseNamedWeights(text, ids));
        }""", [url, sd1, readable + refused])
    for text, answer in zip(readable, answers):
        assert answer.get("values") == vector(text), (text, answer)
    for text, answer in zip(refused, answers[len(readable):]):
        assert "error" in answer and "values" not in answer, (text, answer)
    for text in ("XX=1", "OUT05-IN05=1"):  # the node refuses these too
        with pytest.raises(BlockWeightError):
            vector(text)


def test_every_ui_workflow_gives_its_api_twin(comfy_page, vue_nodes, web_server):
    """Each UI example (named by its title in the template browser) loads in the front-end and queues
    as its API twin, example_workflows/api/<name>_api.json; each twin has one UI example."""
    page = comfy_page
    object_info = web_server.object_info()
    examples = ui_examples()
    apis = sorted(p.name for p in (WORKFLOWS / "api").glob("*_api.json"))
    assert sorted(examples) == [f"api/{name}" for name in apis], examples
    for twin, ui_path in sorted(examples.items()):
        ui = json.loads(ui_path.read_text())
        missing = {n["class_type"] for n in json.loads((WORKFLOWS / twin).read_text()).values()} - set(object_info)
        if missing:  # an example of a core node this runtime lacks: it must be declared as such
            assert missing <= NEWER_RUNTIME.get(Path(twin).name, set()), f"{ui_path.name} needs {missing}"
            continue
        assert "nodes" in ui and "links" in ui, f"{ui_path.name} is not in UI format"
        assert any(node["type"] == "Note" for node in ui["nodes"]), f"{ui_path.name} has no Note saying what to pick"
        page.load_workflow(ui)
        problems = same_prompt(page.graph_to_prompt(), json.loads((WORKFLOWS / twin).read_text()), object_info)
        assert not problems, f"{ui_path.name}: " + "\n".join(problems)


def _mismatched_adapter(models) -> str:
    """The e2e LoRA as an SDXL file would look to the e2e SD1.5 checkpoint: every UNet layer 8 input
    channels wider than the model's (its text-encoder part still fits), SDXL in its metadata."""
    import torch
    from safetensors.torch import load_file, save_file

    name = "e2e_sdxl_like.safetensors"
    tensors = load_file(str(models / "loras" / "e2e_kohya_lora.safetensors"))
    wide = {k: torch.cat([v, v[:, :8]], dim=1) if k.startswith("lora_unet_") and k.endswith("lora_down.weight") else v
            for k, v in tensors.items()}
    save_file(wide, str(models / "loras" / name), {"ss_base_model_version": "sdxl_base_v1-0"})
    return name


def report_panel(page, node_id: int):
    return page.page.locator(f'.lycoris-report-panel[data-lycoris-node="{node_id}"]')


def test_a_report_and_a_mismatch_are_shown_on_the_node(comfy_page, vue_nodes, web_server, e2e_models, artifacts):
    """After a run the loader shows its report on the node; an SDXL-like file on the SD1.5 checkpoint
    turns the node orange with the cause in words; a fitting file takes the warning away again."""
    page = comfy_page
    models, _ = e2e_models
    name = _mismatched_adapter(models)
    page.load_workflow(example("lycoris_loader_api.json"))
    node = page.node_id("LycorisLoader")
    shown_in_node(page, node, "lycoris-report-panel")
    default_color = page.page.evaluate("(id) => app.graph.getNodeById(id).color ?? null", node)
    # a strength of its own per rendering: the server would answer a prompt it ran already from its cache
    strength = 0.9 if page.vue_nodes else 0.8
    for file, warned in ((name, True), ("e2e_kohya_lora.safetensors", False)):
        page.page.evaluate("""([id, file, strength]) => {
            const node = app.graph.getNodeById(id);
            node.widgets.find((w) => w.name === "lora_name").value = file;
            node.widgets.find((w) => w.name === "strength_clip").value = strength;
        }""", [node, file, strength])
        page.settle()
        prompt_id = page.queue_with_button()
        entry = web_server.wait_history(prompt_id, timeout=240)
        report = "\n".join(entry["outputs"][str(node)]["text"])
        shown = page.page.locator(f'.lycoris-report-panel[data-lycoris-node="{node}"] textarea')
        from playwright.sync_api import expect

        expect(shown).to_have_value(re.compile(re.escape(report.splitlines()[0])), timeout=20_000)
        assert shown.input_value() == report
        warning = report_panel(page, node).locator(".lycoris-warning")
        color = page.page.evaluate("(id) => app.graph.getNodeById(id).color ?? null", node)
        if warned:
            assert "an SDXL adapter on an SD1.5 model" in report, report
            assert "an SDXL adapter on an SD1.5 model" in warning.inner_text()
            assert color == "#b0600c", color
            if page.vue_nodes:  # the Vue node takes the colour too
                page.scroll_to(node)
                html = page.vue_node(node).evaluate("(element) => element.outerHTML").lower()
                assert any(c in html for c in ("b0600c", "176, 96, 12", "6a3a12", "106, 58, 18")), html[:600]
            page.view_from_left()
            page.screenshot(artifacts / f"browser_mismatch_{page.rendering}.png")
        else:
            assert "warning" not in report and warning.inner_text() == "", report
            assert color == default_color, color
    shown_in_node(page, node, "lycoris-report-panel")


def test_utility_reports_are_shown_on_the_node(comfy_page, vue_nodes, web_server):
    """Inspect's report (a utility node) on the node after a run, in both renderings."""
    page = comfy_page
    page.load_workflow(example("lycoris_inspect_api.json"))
    node = page.node_id("LycorisInspect")
    shown_in_node(page, node, "lycoris-report-panel")
    page.page.evaluate("""([id, value]) => { app.graph.getNodeById(id).widgets.find((w) => w.name === "architecture")
                          .value = value; }""", [node, "sd1" if page.vue_nodes else "auto"])
    entry = web_server.wait_history(page.queue_with_button(), timeout=240)
    report = "\n".join(entry["outputs"][str(node)]["text"])
    text = report_panel(page, node).locator("textarea")
    from playwright.sync_api import expect

    expect(text).to_have_value(re.compile("Inspect LyCORIS: e2e_kohya_lora"), timeout=20_000)
    assert text.input_value() == report


def test_an_example_opened_without_its_files_falls_back_to_the_users(comfy_page, web_server):
    """An example naming files this install does not have takes the first listed ones (its Note says to
    pick your own); a user's own workflow (no example property) is left as saved."""
    page = comfy_page
    ui = example("lycoris_loader_api.json")
    for node in ui["nodes"]:
        if node["type"] == "LycorisLoader":
            node["widgets_values"][0] = "not_here.safetensors"
    page.load_workflow(ui)
    node = page.node_id("LycorisLoader")
    listed = page.page.evaluate("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'lora_name')"
                                ".options.values", node)
    assert page.widget_value(node, "lora_name") == listed[0] != "not_here.safetensors"
    for node_data in ui["nodes"]:
        node_data.get("properties", {}).pop("lycoris_example_files", None)
    page.load_workflow(ui)
    assert page.widget_value(page.node_id("LycorisLoader"), "lora_name") == "not_here.safetensors"


def test_a_workflow_saved_with_lycoris_name_still_loads_and_runs(comfy_page, vue_nodes, web_server):
    """A UI workflow saved before the loaders' file input became `lora_name` (widget values are
    positional; the current front-end also saved a widget input named `lycoris_name`) keeps its file,
    strengths and mode, and runs."""
    page = comfy_page
    saved = json.loads((Path(__file__).parent / "data" / "saved_with_lycoris_name.json").read_text())
    page.load_workflow(saved)
    node = page.node_id("LycorisLoader")
    inputs = page.graph_to_prompt()[str(node)]["inputs"]
    assert "lycoris_name" not in inputs, inputs
    assert (inputs["lora_name"], inputs["strength_model"], inputs["strength_clip"], inputs["mode"]) == \
        ("lycoris_demo_loha.safetensors", 1, 1, "merge"), inputs
    # a strength of its own per rendering: the server would answer a prompt it ran already from its cache
    strength = 0.9 if page.vue_nodes else 0.8
    page.page.evaluate("""([id, strength]) => { app.graph.getNodeById(id).widgets
                          .find((w) => w.name === "strength_model").value = strength; }""", [node, strength])
    entry = web_server.wait_history(page.queue_with_button(), timeout=240)
    report = "\n".join(entry["outputs"][str(node)]["text"])
    assert f"LyCORIS lycoris_demo_loha.safetensors (mode merge, strength_model {strength:g}" in report, report


def test_the_info_panel_compares_the_files_base_model_with_the_checkpoint(comfy_page, vue_nodes, e2e_models):
    """Before anything runs: an SDXL-like file picked on a loader fed by the SD1.5 checkpoint says it
    will not fit; the fitting file does not."""
    page = comfy_page
    models, _ = e2e_models
    name = _mismatched_adapter(models)
    page.load_workflow(example("lycoris_loader_api.json"))
    node = page.node_id("LycorisLoader")
    panel = page.page.locator(f'.lycoris-info[data-lycoris-node="{node}"]')
    page.page.evaluate("([id, file]) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'lora_name')"
                       ".value = file; }", [node, name])
    text = wait_text(panel, "it will not fit")
    assert "SDXL file, sd1 model (e2e_tiny_sd15.safetensors): it will not fit" in text, text
    assert "base model: sdxl_base_v1-0 (SDXL)" in text, text
    page.page.evaluate("([id, file]) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'lora_name')"
                       ".value = file; }", [node, "e2e_kohya_lora.safetensors"])
    from playwright.sync_api import expect

    text = wait_text(panel, r"base model: sd_v1 \(SD1\.5\)")
    assert "will not fit" not in text, text
