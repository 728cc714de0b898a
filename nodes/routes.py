"""Read-only HTTP routes for the front-end: an adapter's summary, an architecture's block ids and
presets, and a model file's architecture (`/lycoris/info`, `/lycoris/blocks`, `/lycoris/architecture`).

The routes take file names from the browser, so a name is checked as text (no absolute path, drive
letter, backslash, `..` segment or NUL) before anything looks at the disk, and then only a name
that ComfyUI lists for that folder is opened. The work is done by pure functions (`listed_file`,
`adapter_info`, `block_table`, `model_architecture`) that raise `RouteError`; the handlers only
read the query, run them off the event loop and turn the result into JSON. Outside a running
ComfyUI server (plain imports, tests) nothing is registered.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys

import folder_paths

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.block_weights import BlockWeightError, parse_block_weights, presets_for
from ..lycoris_core.blocks import (ARCHITECTURES, architecture_blocks, canonical_architecture,
                                   detect_architecture, id_group)
from ..lycoris_core.fit import trained_for
from ..lycoris_core.inspection import format_summary, summarize
from ..lycoris_core.safe_io import SafetensorsReader
from .cache import load_cached
from .loader import rename_legacy_inputs

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")
# ComfyUI renamed "unet" to "diffusion_models" (the old name stays an alias); the March-2024 one knows only "unet"
_FOLDER_ALIASES = {"diffusion_models": "unet", "unet": "diffusion_models"}
_DRIVE = re.compile(r"^[A-Za-z]:")


class RouteError(Exception):
    """A refused request: the HTTP status and a one-line reason for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _listed_names(folder: str) -> list[str]:
    for kind in (folder, _FOLDER_ALIASES.get(folder)):
        if kind is None:
            continue
        try:
            return list(folder_paths.get_filename_list(kind))
        except KeyError:  # a folder kind this ComfyUI does not have
            continue
    raise RouteError(400, f"this ComfyUI has no '{folder}' model folder")


def _kind(folder: str) -> str:
    """The folder kind name this ComfyUI uses for `folder` (alias folded)."""
    if folder in folder_paths.folder_names_and_paths:
        return folder
    return _FOLDER_ALIASES.get(folder, folder)


def listed_file(folder: str, name: str | None) -> tuple[str, str]:
    """(full path, listed name) of `name` in ComfyUI's `folder` list, or `RouteError`.

    400: no name. 403: a name that could point outside the folder (absolute, drive letter,
    backslash, a `..` segment, NUL), refused before any lookup. 404: not listed. Names are compared
    with `/` separators, so a Windows listing (`sub\\x.safetensors`) is reached as `sub/x.safetensors`.
    """
    if not name:
        raise RouteError(400, "the 'name' parameter is missing")
    if "\x00" in name:
        raise RouteError(403, "a file name cannot contain a NUL character")
    if "\\" in name:
        raise RouteError(403, "use '/' in file names, not '\\'")
    if name.startswith("/") or _DRIVE.match(name) or os.path.isabs(name):
        raise RouteError(403, "absolute paths are refused: give the name as listed in the folder")
    if ".." in name.split("/"):
        raise RouteError(403, "'..' is refused in file names")
    listed = {entry.replace("\\", "/"): entry for entry in _listed_names(folder)}
    entry = listed.get(name)
    if entry is None:
        raise RouteError(404, f"'{name}' is not in the {folder} folders")
    path = folder_paths.get_full_path(_kind(folder), entry)
    if path is None or not os.path.isfile(path):
        raise RouteError(404, f"'{name}' is listed in the {folder} folders but is no longer there")
    return path, entry


def _folder_index(folder: str, entry: str, path: str) -> int | None:
    """Which of the folder kind's paths holds the file (ComfyUI searches them in order)."""
    for index, base in enumerate(folder_paths.get_folder_paths(_kind(folder))):
        if os.path.normcase(os.path.normpath(os.path.join(base, entry))) == os.path.normcase(os.path.normpath(path)):
            return index
    return None


def _unreadable(error: Exception, name: str) -> RouteError:
    """422 with the core's one-line error, naming the file as listed (not its path on the server)."""
    if isinstance(error, AdapterFormatError):
        error = AdapterFormatError(error.message, path=name, key=error.key)
        return RouteError(422, str(error))
    return RouteError(422, f"{name}: {' '.join(str(error).split()) or type(error).__name__}")


def adapter_info(name: str | None) -> dict:
    """`/lycoris/info`: the summary of an adapter file from the loras folders."""
    path, entry = listed_file("loras", name)
    try:
        adapter_file = load_cached(path)
        summary = summarize(adapter_file)
    except (AdapterFormatError, ValueError, OSError) as error:
        raise _unreadable(error, name) from None
    summary["file"] = name  # the listed name, not the server's directory layout
    return {"name": name, "path_folder": _folder_index("loras", entry, path), "summary": summary,
            "trained_for": trained_for(adapter_file.metadata, adapter_file.adapters).as_dict(),
            "text": format_summary(summary)}


def block_table(architecture: str | None) -> dict:
    """`/lycoris/blocks`: ids, their groups and every preset that reads for `architecture` (seed 0)."""
    from .presets import user_presets

    if not architecture:
        raise RouteError(400, "the 'architecture' parameter is missing")
    try:
        arch = canonical_architecture(architecture)
    except ValueError as error:
        raise RouteError(400, str(error)) from None
    ids = architecture_blocks(arch)
    user = user_presets()
    presets = {}
    for preset in presets_for(arch, ids, user):
        try:
            presets[preset] = parse_block_weights(preset, arch, ids, user, seed=0).vector
        except BlockWeightError:  # presets_for already left these out
            continue
    return {"architecture": arch, "ids": ids, "groups": {block: id_group(block) for block in ids},
            "presets": presets, "architectures": [a for a in ARCHITECTURES if a != "unknown"]}


def model_architecture(folder: str | None, name: str | None) -> dict:
    """`/lycoris/architecture`: the architecture of a model file, from its safetensors header only."""
    if folder not in MODEL_FOLDERS:
        raise RouteError(400, f"'folder' must be one of {', '.join(MODEL_FOLDERS)}")
    path, _ = listed_file(folder, name)
    try:
        with SafetensorsReader(path) as reader:
            keys = list(reader.keys())
    except (AdapterFormatError, ValueError, OSError) as error:
        raise _unreadable(error, name) from None
    architecture = detect_architecture(keys)
    return {"architecture": architecture, "ids": architecture_blocks(architecture, keys)}


def register(routes) -> None:
    """Add the three GET routes to an aiohttp `RouteTableDef` (ComfyUI's `PromptServer.instance.routes`)."""
    from aiohttp import web

    async def answer(work, *args):
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, work, *args)
        except RouteError as error:
            return web.json_response({"error": error.message}, status=error.status)
        return web.json_response(result)

    @routes.get("/lycoris/info")
    async def info(request):
        return await answer(adapter_info, request.query.get("name"))

    @routes.get("/lycoris/blocks")
    async def blocks(request):
        return await answer(block_table, request.query.get("architecture"))

    @routes.get("/lycoris/architecture")
    async def architecture(request):
        return await answer(model_architecture, request.query.get("folder"), request.query.get("name"))


def legacy_prompt_handler(json_data):
    """On-prompt handler: a posted API prompt that names the loaders' file `lycoris_name` (saved before
    the input became `lora_name`) is renamed before the server validates it."""
    if isinstance(json_data, dict) and isinstance(json_data.get("prompt"), dict):
        rename_legacy_inputs(json_data["prompt"])
    return json_data


def _server():
    """The running PromptServer; None outside a running ComfyUI server (its `server` module is
    imported by main.py before custom nodes load, so a plain import of the pack never imports it)."""
    if "server" not in sys.modules:
        return None
    try:
        from server import PromptServer

        return PromptServer.instance if hasattr(PromptServer.instance, "routes") else None
    except (ImportError, AttributeError):
        return None


_SERVER = _server()
_ROUTES = None if _SERVER is None else _SERVER.routes
if _SERVER is not None:
    register(_ROUTES)
    if hasattr(_SERVER, "add_on_prompt_handler"):
        _SERVER.add_on_prompt_handler(legacy_prompt_handler)
