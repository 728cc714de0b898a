"""Browser-test fixtures: a real ComfyUI server with this pack and generated models, and headless
Chromium on its page (tests/web/comfy_browser.py).

The server is this directory's own (session scope): its models folder holds the e2e checkpoint and
LoRAs (tests/e2e/conftest.py `e2e_models`) plus the demo LoHa with trigger words that
the loader example names (scripts/run_main_job.py). No Chromium or Playwright
is an error, never a skip."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (HERE.parent, HERE, REPO / "scripts"):  # comfyui_runtime + e2e; comfy_browser; run_main_job
    if str(path) not in sys.path:
        sys.path.append(str(path))  # appended: ComfyUI's root (put first by import_comfy) must win

from e2e.conftest import e2e_models  # noqa: E402,F401  (the generated checkpoint and LoRAs)

ARTIFACTS = REPO / "out" / "test_artifacts"
from comfy_browser import NO_VUE_NODES  # noqa: E402


@pytest.fixture(scope="session")
def web_server(tmp_path_factory, e2e_models):  # noqa: F811
    """ComfyUI with the pack, serving the page the browser opens."""
    import run_main_job
    from e2e.server import ComfyServer

    models, _ = e2e_models
    run_main_job.write_models(models)  # + lycoris_demo_loha.safetensors
    with ComfyServer(tmp_path_factory.mktemp("comfyui_web"), models, extra_args=("--fp32-text-enc",)) as server:
        failures = [line for line in server.import_failures() if "lycoris" in line.lower()]
        assert not failures, f"ComfyUI could not import the pack: {failures}\n{server.log_tail()}"
        yield server


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium browser for the session (each page gets a context of its own)."""
    from comfy_browser import BrowserUnavailable, launch_chromium

    try:
        with launch_chromium() as browser:
            yield browser
    except BrowserUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def frontend_seen():
    """What the pages opened so far found: {"new": bool} once one has opened."""
    return {}


@pytest.fixture(params=[False, True], ids=["canvas-nodes", "vue-nodes"])
def vue_nodes(request, frontend_seen):
    """Node rendering for `comfy_page`: on the canvas, or as Vue components ("Nodes 2.0"), which only
    the new front-end has; a test that takes this fixture runs once on the March-2024 one."""
    if request.param and frontend_seen.get("new") is False:
        pytest.skip(NO_VUE_NODES)
    return request.param


@pytest.fixture
def comfy_page(request, chromium, web_server, frontend_seen):
    """A fresh ComfyUI page on the test server, with Vue node rendering if the test asks for it
    (the `vue_nodes` fixture; off otherwise); fails the test if the pack's scripts raised."""
    from comfy_browser import ComfyPage, fresh_page

    vue = request.getfixturevalue("vue_nodes") if "vue_nodes" in request.fixturenames else False
    page = ComfyPage(fresh_page(chromium), web_server.url, vue_nodes=vue)
    page.open()
    frontend_seen["new"] = page.is_new_frontend
    if vue and not page.is_new_frontend:
        page.page.close()
        pytest.skip(NO_VUE_NODES)
    yield page
    errors = page.pack_errors()
    page.page.close()
    assert not errors, "the pack's front-end raised:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def artifacts():
    """out/test_artifacts (git-ignored): screenshots the tests save for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
