"""ComfyUI entry point of the LyCORIS node pack (ComfyUI imports this folder as a package).

Outside ComfyUI (the test runner importing the repository root, `python -m lycoris_core`) there
are no nodes to register, so the node layer is only imported where ComfyUI is importable.
"""

import importlib.util

WEB_DIRECTORY = "./web/js"

if importlib.util.find_spec("folder_paths") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
