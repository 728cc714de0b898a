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
