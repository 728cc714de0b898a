"""In-process node tests run against a real ComfyUI (tests/comfyui_runtime.py), imported once.

No ComfyUI found -> the fixtures raise, so these tests error (never skip)."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # comfyui_runtime; tiny_models
    if str(path) not in sys.path:
        sys.path.append(str(path))  # appended: ComfyUI's root (put first by import_comfy) must win

from comfyui_runtime import import_comfy, import_pack  # noqa: E402


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
