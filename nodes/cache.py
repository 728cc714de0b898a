"""Decoded adapter files, kept between runs so re-running a workflow does not re-read them.

An entry is valid while the file's path, size and modification time are unchanged.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from ..lycoris_core import load_adapter_file

_ENTRIES: "OrderedDict[str, tuple[tuple[int, int], object]]" = OrderedDict()
MAX_ENTRIES = 8


def load_cached(path: str):
    """The decoded `AdapterFile` for `path`, from the cache when the file did not change."""
    stat = os.stat(path)
    stamp = (stat.st_size, stat.st_mtime_ns)
    entry = _ENTRIES.get(path)
    if entry is not None and entry[0] == stamp:
        _ENTRIES.move_to_end(path)
        return entry[1]
    adapter_file = load_adapter_file(path)
    _ENTRIES[path] = (stamp, adapter_file)
    _ENTRIES.move_to_end(path)
    while len(_ENTRIES) > MAX_ENTRIES:
        _ENTRIES.popitem(last=False)
    return adapter_file


def clear() -> None:
    _ENTRIES.clear()
