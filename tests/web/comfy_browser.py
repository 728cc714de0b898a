"""Headless Chromium on ComfyUI's real page, for the browser tests and the UI-workflow generator.

    with launch_chromium() as browser:
        page = ComfyPage(fresh_page(browser), server.url)
        page.open()
        page.load_workflow(json.loads(path.read_text()))

The browser is Debian's `chromium` (`CHROMIUM`, default /usr/bin/chromium), driven by Playwright
(PyPI `playwright`, pinned in tests/requirements-web.txt) through `executable_path`: Playwright's
own browser download is never used. Flags keep a headless run off the network (no sync, no
component updates, no QUIC). Every page gets a browser context of its own (`fresh_page`): the new
front-end keeps its open workflow tabs in the browser's storage and would bring one page's edited
workflow back in the next. A missing browser or Playwright raises
`BrowserUnavailable` with the install command, so the tests fail instead of skipping.

`ComfyPage` knows both ComfyUI front-ends this pack supports: the March-2024 one (pinned runtime,
plain LiteGraph canvas, "Queue Prompt" button) and the current Vue one (ComfyUI 0.28 serves
comfyui-frontend-package 1.45: "Run" button, first-run template dialog), the latter with its nodes
drawn on the canvas or, with the setting `Comfy.VueNodes.Enabled` ("Nodes 2.0"), rendered as Vue
components in the page (combo widgets are then listbox buttons, not canvas menus). Everything else
goes through what they share: `window.app` (loadGraphData, graphToPrompt, graph) and LiteGraph's canvas.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}
NO_VUE_NODES = "the March-2024 front-end (pinned runtime) has no Vue node rendering (Nodes 2.0)"
EXTENSIONS = ("lycorisnodepack.BlockWeightEditor", "lycorisnodepack.AdapterInfo", "lycorisnodepack.Report",
              "lycorisnodepack.ExampleFiles")
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"  # comfyui-frontend-package's "Modern Node Design (Nodes 2.0)"
INSTALL_HINT = ("run scripts/setup_env.sh (it installs Debian's chromium with apt-get and Playwright from "
                "tests/requirements-web.txt)")


class BrowserUnavailable(RuntimeError):
    """No browser to run the front-end tests with (a failure, never a skip)."""


@contextlib.contextmanager
def launch_chromium():
    """A Playwright browser on the system Chromium, closed on exit."""
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserUnavailable(f"Chromium not found at {CHROMIUM}: {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise BrowserUnavailable(f"Playwright is not installed ({error}): {INSTALL_HINT}") from None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def fresh_page(browser, viewport: dict | None = None):
    """A page in a new browser context (empty storage); closing the page closes its context."""
    return browser.new_page(viewport=viewport or VIEWPORT, device_scale_factor=1)


class ComfyPage:
    """One ComfyUI page in the browser, with the few UI gestures the tests need."""

    def __init__(self, page, url: str, vue_nodes: bool = False):
        self.page = page
        self.url = url.rstrip("/")
        self.vue_nodes = vue_nodes  # asked for; open() checks the front-end has them
        self.errors: list[str] = []  # uncaught page errors and console errors that name this pack
        page.on("pageerror", lambda error: self.errors.append(f"{error}\n{error.stack or ''}"))
        page.on("console", self._console)
        page.set_default_timeout(30_000)

    def _console(self, message) -> None:
        if message.type == "error" and "lycoris" in message.text.lower():
            self.errors.append(message.text)

    def pack_errors(self) -> list[str]:
        """Errors raised from this pack's scripts (the front-ends have harmless ones of their own)."""
        return [e for e in self.errors if "lycoris" in e.lower()]

    # -- opening and loading --------------------------------------------------------------------

    def _post_setting(self, key: str, value) -> None:
        """Server-side user setting (both front-ends read them at start); best effort."""
        request = urllib.request.Request(f"{self.url}/settings/{key}", data=json.dumps(value).encode(), method="POST")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(request, timeout=10).close()

    def open(self) -> None:
        """Load the page and wait until the app runs with this pack's extensions registered, with Vue
        node rendering on or off as asked (a user setting, read by the front-end when it starts)."""
        self._post_setting("Comfy.TutorialCompleted", True)  # the new front-end's template dialog
        self._post_setting(VUE_NODES_SETTING, self.vue_nodes)
        self.page.goto(self.url + "/")
        self.page.wait_for_function(
            """(names) => window.app?.graph && window.app.extensions
                 && names.every((name) => window.app.extensions.some((ext) => ext.name === name))""",
            arg=list(EXTENSIONS), timeout=60_000)
        self.page.keyboard.press("Escape")  # any first-run dialog
        if self.is_new_frontend:
            shown = self.page.evaluate("(key) => window.app.extensionManager.setting.get(key)", VUE_NODES_SETTING)
            assert shown == self.vue_nodes, f"{VUE_NODES_SETTING} is {shown} in the page, asked for {self.vue_nodes}"

    def switch_vue_nodes(self, on: bool) -> None:
        """Switch Vue node rendering in the open page, as a person does in the settings dialog."""
        self.page.evaluate("([key, on]) => app.extensionManager.setting.set(key, on)", [VUE_NODES_SETTING, on])
        self.vue_nodes = on
        self.page.wait_for_selector(".lg-node[data-node-id]", state="attached" if on else "detached")
        self.settle()

    @property
    def rendering(self) -> str:
        """Which front-end and node rendering the page runs (screenshot names)."""
        if not self.is_new_frontend:
            return "frontend2024"
        return "vue-nodes" if self.vue_nodes else "canvas-nodes"

    @property
    def is_new_frontend(self) -> bool:
        return self.page.evaluate("() => !!window.comfyAPI")

    def load_workflow(self, workflow: dict) -> None:
        self.page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
        if self.vue_nodes:  # the nodes are elements of the page, not drawings on the canvas
            self.page.wait_for_selector(".lg-node[data-node-id]")
        self.settle()

    def settle(self, seconds: float = 0.3) -> None:
        """Let the canvas draw and the pack's panels see changes (they look every 250 ms) and fetch."""
        self.page.evaluate("() => app.graph.setDirtyCanvas(true, true)")
        time.sleep(seconds)

    def node_id(self, class_type: str) -> int:
        ids = self.page.evaluate(
            "(type) => app.graph._nodes.filter((n) => n.comfyClass === type || n.type === type).map((n) => n.id)",
            class_type)
        assert len(ids) == 1, f"expected one {class_type} node, found {ids}"
        return ids[0]

    def widget_value(self, node_id: int, name: str):
        return self.page.evaluate(
            "([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name).value", [node_id, name])

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    # -- gestures -------------------------------------------------------------------------------

    def scroll_to(self, node_id: int) -> None:
        """Zoom 1 (the front-ends hide widgets when zoomed out), the node's top-left in view."""
        self.page.evaluate(
            """(id) => {
                const node = app.graph.getNodeById(id);
                const ds = app.canvas.ds;
                ds.scale = 1;
                ds.offset[0] = 80 - node.pos[0];
                ds.offset[1] = 120 - node.pos[1];
                app.canvas.setDirty(true, true);
            }""", node_id)
        time.sleep(0.3)  # a frame: canvas widgets get their y when drawn, Vue nodes follow the offset

    def widget_point(self, node_id: int, name: str) -> tuple[float, float]:
        """Page coordinates of the middle of a canvas widget (combo, number) of a node, scrolled into view."""
        self.scroll_to(node_id)
        x, y = self.page.evaluate(
            """([id, name]) => {
                const node = app.graph.getNodeById(id);
                const widget = node.widgets.find((w) => w.name === name);
                const y = widget.last_y ?? widget.y;
                const height = widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
                const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + y + height / 2]);
                const rect = app.canvas.canvas.getBoundingClientRect();
                const ratio = rect.width / app.canvas.canvas.width;
                return [rect.left + cx * ratio, rect.top + cy * ratio];
            }""", [node_id, name])
        return x, y

    def vue_node(self, node_id: int):
        """The element a Vue-rendered node is (Nodes 2.0)."""
        return self.page.locator(f'.lg-node[data-node-id="{node_id}"]')

    def choose_combo(self, node_id: int, name: str, value: str) -> None:
        """Open a combo widget's menu with a click and click the entry `value`: on the canvas (a LiteGraph
        context menu), or with Vue nodes on the widget's listbox button (a searchable list of options)."""
        if self.vue_nodes:
            self.scroll_to(node_id)
            self.vue_node(node_id).locator(f'button[role="combobox"][aria-label="{name}"]').click()
            target = self.page.get_by_role("option", name=value, exact=True)
        else:
            x, y = self.widget_point(node_id, name)
            self.page.mouse.click(x, y)
            entry = self.page.locator(".litecontextmenu .litemenu-entry").filter(has_text=value)
            exact = entry.locator(f"xpath=self::*[normalize-space(.)='{value}']")
            target = exact if exact.count() else entry
        target.first.scroll_into_view_if_needed()
        target.first.click()
        self.settle()

    def block_cell(self, node_id: int, block: str):
        """The block-weight editor's number cell for `block` on node `node_id`."""
        return self.page.locator(f'.lycoris-blocks[data-lycoris-node="{node_id}"] input[data-lycoris-block="{block}"]')

    def type_into(self, locator, text: str) -> None:
        """Real keyboard input: click, select what is there, type, Tab out (commits the value)."""
        locator.click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.type(text)
        self.page.keyboard.press("Tab")

    def queue_with_button(self) -> str:
        """Click the front-end's queue button; returns the prompt id the server gave."""
        button = self.page.locator('[data-testid="queue-button"]') if self.is_new_frontend \
            else self.page.locator("#queue-button")
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                       timeout=60_000) as answer:
            button.first.click()
        body = answer.value.json()
        assert answer.value.ok and "prompt_id" in body, body
        return body["prompt_id"]

    def view_from_left(self) -> None:
        """Scale 1, the graph's top-left corner near the page's: what a person sees after loading."""
        self.page.evaluate("""() => {
            const nodes = app.graph._nodes;
            const ds = app.canvas.ds;
            ds.scale = 1;
            ds.offset[0] = 70 - Math.min(...nodes.map((n) => n.pos[0]));  // clear of the new front-end's side bar
            ds.offset[1] = 80 - Math.min(...nodes.map((n) => n.pos[1]));
            app.canvas.setDirty(true, true);
        }""")
        time.sleep(0.3)

    def screenshot(self, path: Path, **kwargs) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("() => app.canvas.draw(true, true)")
        self.page.screenshot(path=str(path), **kwargs)
        return path
