"""Node tests run against a real ComfyUI (see tests/comfyui_runtime.py), imported once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_runtime import import_comfy, import_pack  # noqa: E402


@pytest.fixture(scope="session")
def comfy_root():
    return import_comfy()


@pytest.fixture(scope="session")
def pack(comfy_root):
    return import_pack()
