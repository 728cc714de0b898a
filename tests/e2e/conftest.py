"""End-to-end fixtures: generated models and one real ComfyUI server per test session.

The helpers are imported as `e2e.server` / `e2e.make_models` (never as top-level `server`, which
is ComfyUI's own module name)."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))  # appended: ComfyUI's root must stay first for `comfy`

from comfyui_runtime import import_comfy  # noqa: E402


@pytest.fixture(scope="session")
def e2e_models(tmp_path_factory):
    """A models dir with `checkpoints/<CHECKPOINT_NAME>` (random SD1.x) and `loras/e2e_kohya_lora.safetensors`
    (kohya LoRA on its UNet transformers and text encoder; `e2e_kohya_dylora.safetensors` the same as an
    sd-scripts DyLoRA, rank 8, unit 2). Returns (models_dir, shapes)."""
    import torch

    import_comfy()  # the generator uses ComfyUI's own model classes
    from e2e import make_models

    models = tmp_path_factory.mktemp("e2e_models")
    with torch.inference_mode():
        make_models.write_checkpoint(models / "checkpoints" / make_models.CHECKPOINT_NAME)
        shapes = make_models.weight_shapes()
        make_models.write_kohya_lora(models / "loras" / "e2e_kohya_lora.safetensors", shapes, rank=4, seed=1)
        make_models.write_kohya_dylora(models / "loras" / "e2e_kohya_dylora.safetensors", shapes, rank=8, unit=2, seed=2)
    return models, shapes


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, e2e_models):
    """The ComfyUI server (pack in custom_nodes, models from `e2e_models`), shared by the session."""
    from e2e.server import ComfyServer

    models, _ = e2e_models
    # --fp32-text-enc: the recent ComfyUI otherwise runs the (fp16-stored) CLIP in fp16 on the CPU,
    # ~40x slower than fp32 there (2.5 s per CLIPTextEncode); the pinned one uses fp32 on CPU anyway.
    with ComfyServer(tmp_path_factory.mktemp("comfyui_server"), models, extra_args=("--fp32-text-enc",)) as server:
        yield server
