"""The ComfyUI layer: node classes only translate between ComfyUI objects and lycoris_core."""

from .loader import LycorisLoader, LycorisLoaderModelOnly

NODE_CLASS_MAPPINGS = {
    "LycorisLoader": LycorisLoader,
    "LycorisLoaderModelOnly": LycorisLoaderModelOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LycorisLoader": "Load LyCORIS",
    "LycorisLoaderModelOnly": "Load LyCORIS (model only)",
}
