"""In-process node tests run against a real ComfyUI (tests/comfyui_runtime.py), imported once.

No ComfyUI found -> the fixtures raise, so these tests error (never skip)."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # comfyui_runtime; tiny_models
    if str(path) not in sys.path:
        sys.path.append(str(path))  # appended: ComfyUI's root (put first by import_comfy) must win

from comfyui_runtime import import_comfy, import_pack  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "autograd(reason): runs outside torch.inference_mode(), for the reason given")


def _as_the_executor_runs(node):
    """ComfyUI's executor runs every node and the sampler under `torch.inference_mode()`, so the
    models a workflow loads hold inference tensors: tests build, load and run them the same way,
    unless marked `autograd` (with the reason)."""
    marker = node.get_closest_marker("autograd") if node is not None else None
    if marker is not None and not marker.args:
        raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.autograd needs the reason as its argument")
    return torch.inference_mode(marker is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _as_the_executor_runs(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    with _as_the_executor_runs(getattr(request, "node", None)):
        yield


@pytest.fixture(scope="session")
def comfy_root():
    """The ComfyUI root, imported (CPU) in this process."""
    return import_comfy()


@pytest.fixture(scope="session")
def comfy(comfy_root):
    """ComfyUI's `comfy` package, with lora, model_management, sd and utils imported."""
    return sys.modules["comfy"]


@pytest.fixture(scope="session")
def pack(comfy_root):
    """This repository imported as ComfyUI imports a custom node package."""
    return import_pack()


@pytest.fixture
def bypass_form(pack, monkeypatch):
    """`bypass_form(form)` pins bypass to one form for the test: "factored" (beside the layer),
    "patched" (a patched copy of the weight the layer reads, on layers whose forward dequantises)
    or "cost" (the cost model's choice). Returns the list of layers each patched-form call ran."""
    import importlib

    module = importlib.import_module(f"{pack.__name__}.nodes.bypass")

    def pin(form):
        if form != "cost":
            monkeypatch.setattr(module, "patching_cheaper", lambda *_: form == "patched")
        calls = []
        real = module.BypassForward._patched_forward
        monkeypatch.setattr(module.BypassForward, "_patched_forward",
                            lambda self, x, entries: calls.append(self.module) or real(self, x, entries))
        return calls

    return pin
