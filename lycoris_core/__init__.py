"""LyCORIS / LoRA adapters in pure PyTorch: decode every key layout, merge, bypass, extract.

Imports torch, safetensors and numpy only, never ComfyUI, so it is tested and used on its own
(`python -m lycoris_core`).
"""

from .algos import Adapter, DecodeContext, LayerGeometry
from .errors import AdapterFormatError
from .matching import Coverage, match_generic
from .merge import merge_files, merge_into_state_dict
from .reader import AdapterFile, decode_tensors, load_adapter_file

__all__ = [
    "Adapter", "AdapterFile", "AdapterFormatError", "Coverage", "DecodeContext", "LayerGeometry",
    "decode_tensors", "load_adapter_file", "match_generic", "merge_files", "merge_into_state_dict",
]
