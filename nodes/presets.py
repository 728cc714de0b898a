"""User block-weight presets: the files people already have, read as they are.

Sources, later ones overriding earlier ones of the same name:
- ComfyUI-Inspire-Pack's `resources/lbw-preset.custom.txt` when that pack is installed beside
  this one (its shipped `lbw-preset.txt` equals ours, so only the custom file is read);
- every `*.txt` in this pack's `user_presets/` folder (Inspire's or sd-webui LBW's preset files
  copied as they are, or `NAME:value` lines in any of our dialects).

Files are read on each call (cheap, a few lines each) so a preset added while ComfyUI runs
appears on the next refresh. An unreadable file is reported and skipped: presets are a
convenience and must not stop the pack from loading.
"""

from __future__ import annotations

import glob
import os

import folder_paths

from ..lycoris_core.block_weights import BlockWeightError, load_preset_file

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_PRESET_DIR = os.path.join(PACK_DIR, "user_presets")


def preset_files() -> list[str]:
    """The user preset files in the order they are read."""
    files = []
    for custom_nodes in folder_paths.get_folder_paths("custom_nodes"):
        pattern = os.path.join(custom_nodes, "*", "resources", "lbw-preset.custom.txt")
        files += sorted(p for p in glob.glob(pattern) if "inspire" in os.path.basename(os.path.dirname(os.path.dirname(p))).lower())
    files += sorted(glob.glob(os.path.join(USER_PRESET_DIR, "*.txt")))
    return files


def user_presets() -> dict[str, str]:
    """name -> preset text from every user preset file."""
    presets: dict[str, str] = {}
    for path in preset_files():
        try:
            presets.update(load_preset_file(path))
        except BlockWeightError as error:
            print(f"LyCORIS: skipped a preset file: {error}")
    return presets
