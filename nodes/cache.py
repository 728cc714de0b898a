"""Decoded adapter files, kept between runs so re-running a workflow does not re-read them.

An entry is valid while the file's path, size and modification time are unchanged. The cache is
sized in bytes, not entries: it holds at most `BUDGET_SHARE` of the memory that is free now plus
what it already holds (its own entries are memory it can give back), so a stack of ten Flux-sized
files stays cached on a machine with room for them and a small machine keeps only what fits. The
least recently used entries go first; a file larger than the whole budget is decoded for the
run but not kept.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from ..lycoris_core import load_adapter_file

BUDGET_SHARE = 0.25

_ENTRIES: "OrderedDict[str, tuple[tuple[int, int], object, int]]" = OrderedDict()


def free_memory() -> int:
    """Bytes of RAM available to this process now."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # every ComfyUI installs psutil; keep a plain fallback for other hosts
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def held_bytes() -> int:
    return sum(size for _, _, size in _ENTRIES.values())


def budget() -> int:
    """The most bytes the cache may hold, read against the memory free at this moment."""
    return int(BUDGET_SHARE * (free_memory() + held_bytes()))


def decoded_bytes(adapter_file) -> int:
    """Bytes of tensors a decoded file holds (each storage counted once)."""
    seen, total = set(), 0
    for adapter in adapter_file.adapters.values():
        for tensor in adapter.tensors.values():
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def load_cached(path: str):
    """The decoded `AdapterFile` for `path`, from the cache when the file did not change."""
    stat = os.stat(path)
    stamp = (stat.st_size, stat.st_mtime_ns)
    entry = _ENTRIES.get(path)
    if entry is not None and entry[0] == stamp:
        _ENTRIES.move_to_end(path)
        return entry[1]
    _ENTRIES.pop(path, None)
    adapter_file = load_adapter_file(path)
    _ENTRIES[path] = (stamp, adapter_file, decoded_bytes(adapter_file))
    limit = budget()
    while _ENTRIES and held_bytes() > limit:
        _ENTRIES.popitem(last=False)
    return adapter_file


def clear() -> None:
    _ENTRIES.clear()
