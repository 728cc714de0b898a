"""The ComfyUI layer: node classes only translate between ComfyUI objects and lycoris_core."""

from .block_weight_node import LycorisBlockWeight
from .checkpoint_merge import LycorisMergeToCheckpoint
from .inspect_node import LycorisInspect
from .loader import LycorisLoader, LycorisLoaderModelOnly
from .schedule_node import LycorisSchedule
from .stack import LycorisStack
from .utilities import LycorisCombine, LycorisDyLoRASlice, LycorisExtract, LycorisResize
from . import routes  # noqa: F401  (registers the HTTP routes when running inside a ComfyUI server)

NODE_CLASS_MAPPINGS = {
    "LycorisLoader": LycorisLoader,
    "LycorisLoaderModelOnly": LycorisLoaderModelOnly,
    "LycorisStack": LycorisStack,
    "LycorisBlockWeight": LycorisBlockWeight,
    "LycorisResize": LycorisResize,
    "LycorisDyLoRASlice": LycorisDyLoRASlice,
    "LycorisCombine": LycorisCombine,
    "LycorisExtract": LycorisExtract,
    "LycorisMergeToCheckpoint": LycorisMergeToCheckpoint,
    "LycorisInspect": LycorisInspect,
    "LycorisSchedule": LycorisSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LycorisLoader": "Load LyCORIS",
    "LycorisLoaderModelOnly": "Load LyCORIS (model only)",
    "LycorisStack": "Load LyCORIS Stack",
    "LycorisBlockWeight": "LyCORIS Block Weight",
    "LycorisResize": "Resize LyCORIS",
    "LycorisDyLoRASlice": "Slice DyLoRA",
    "LycorisCombine": "Combine LyCORIS",
    "LycorisExtract": "Extract LyCORIS",
    "LycorisMergeToCheckpoint": "Merge LyCORIS to checkpoint",
    "LycorisInspect": "Inspect LyCORIS",
    "LycorisSchedule": "LyCORIS Schedule",
}
