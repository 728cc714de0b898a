"""The real ComfyUI server for end-to-end tests: `main.py --cpu` on 127.0.0.1 in a subprocess.

    with ComfyServer(work_dir, models_dir) as server:
        prompt_id = server.post_prompt(api_workflow)
        entry = server.wait_history(prompt_id, timeout=300)
        images = server.output_files(entry)

ComfyUI comes from `comfyui_runtime.comfyui_root()` (COMFYUI_PATH, the host ComfyUI, or the
pinned copy). Everything it writes goes under `work_dir`: an `extra_model_paths.yaml` that points
`checkpoints`/`loras` (and any other folder kinds asked for) at `models_dir` and adds a
`custom_nodes` folder holding a symlink to this repository (both the pinned and the recent
ComfyUI read a `custom_nodes` entry there), the output, input, temp and user directories, and the
log. The runtime's own directory is not modified. If this pack is already installed in the
runtime's `custom_nodes` it is not added a second time. The process group is always killed on exit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_runtime import REPO, comfyui_root  # noqa: E402

PACK_DIR_NAME = "comfyui-lycoris-pack"  # the folder name ComfyUI loads the pack under
HOST = "127.0.0.1"


class ComfyServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pack_installed_in(root: Path) -> bool:
    """Whether `root`/custom_nodes already holds this repository (itself or a link to it)."""
    folder = root / "custom_nodes"
    if not folder.is_dir():
        return False
    return any(entry.resolve() == REPO for entry in folder.iterdir() if entry.is_dir())


class ComfyServer:
    """ComfyUI's main.py on 127.0.0.1:<free port>; a context manager (see the module docstring)."""

    def __init__(self, work_dir: Path, models_dir: Path, *, root: Path | None = None, with_pack: bool = True,
                 model_kinds: tuple[str, ...] = ("checkpoints", "loras"), extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 300):
        self.root = Path(root) if root is not None else comfyui_root()
        self.work = Path(work_dir)
        self.models = Path(models_dir)
        self.with_pack = with_pack
        self.model_kinds = model_kinds
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.output_dir = self.work / "output"
        self.log_path = self.work / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self._log = None

    # -- start / stop -------------------------------------------------------------------------

    def _supports(self, flag: str) -> bool:
        return f'"{flag}"' in (self.root / "comfy" / "cli_args.py").read_text(errors="replace")

    def _write_paths_config(self) -> Path:
        lines = ["lycoris_e2e:", f"    base_path: {json.dumps(str(self.models))}"]
        lines += [f"    {kind}: {kind}" for kind in self.model_kinds]
        for kind in self.model_kinds:
            (self.models / kind).mkdir(parents=True, exist_ok=True)
        if self.with_pack and not pack_installed_in(self.root):
            custom_nodes = self.work / "custom_nodes"
            custom_nodes.mkdir(parents=True, exist_ok=True)
            link = custom_nodes / PACK_DIR_NAME
            if not (link.is_symlink() and link.resolve() == REPO):
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(REPO, target_is_directory=True)
            lines.append(f"lycoris_e2e_nodes:\n    custom_nodes: {json.dumps(str(custom_nodes))}")
        config = self.work / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def command(self) -> list[str]:
        config = self._write_paths_config()
        dirs = {name: self.work / name for name in ("input", "temp", "user")}
        for path in [self.output_dir, *dirs.values()]:
            path.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(config),
               "--output-directory", str(self.output_dir), "--input-directory", str(dirs["input"]),
               "--temp-directory", str(dirs["temp"])]
        optional = {  # flags only the newer ComfyUI has: keep its files and side trips out of the runtime
            "--user-directory": [str(dirs["user"])],
            "--database-url": ["sqlite:///:memory:"],
            "--disable-api-nodes": [],
        }
        if not (self.root / "custom_nodes").is_dir():
            # ComfyUI 0.28 lists <base>/custom_nodes at start and exits if it is missing (the shared
            # snapshot has none): the work directory stands in as the base, the runtime stays as it is
            (self.work / "custom_nodes").mkdir(parents=True, exist_ok=True)
            optional["--base-directory"] = [str(self.work)]
        for flag, values in optional.items():
            if self._supports(flag):
                cmd += [flag, *values]
        return cmd + list(self.extra_args)

    def __enter__(self) -> "ComfyServer":
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1")
        env.pop("COMFYUI_PATH", None)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                       f"{self.log_tail()}")
            try:
                self.get_json("/prompt", timeout=5)  # answers once custom nodes are loaded and the server is up
                return
            except (OSError, ValueError):
                time.sleep(0.5)
        raise ComfyServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server and everything it started (its own process group). Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            atexit.unregister(self.stop)
            if process.poll() is None:
                for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                    try:
                        os.killpg(process.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        process.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            try:  # children left in the group after the leader exited
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is not None and exc_type is not KeyboardInterrupt:
            sys.stderr.write(f"\n--- ComfyUI log ({self.log_path}) ---\n{self.log_tail(120)}\n")

    # -- log ----------------------------------------------------------------------------------

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Lines where ComfyUI reports a custom node package it could not import."""
        return [line for line in self.log_text().splitlines() if "IMPORT FAILED" in line]

    # -- HTTP API -----------------------------------------------------------------------------

    def _request(self, path: str, data: dict | None = None, timeout: float = 30):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def get_json(self, path: str, timeout: float = 30):
        return self._request(path, timeout=timeout)

    def get_raw(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        """(HTTP status, body bytes) of a GET, error statuses included (nothing raised for them).
        `path` is sent as given: encode its query yourself."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def object_info(self, node_class: str | None = None) -> dict:
        """`/object_info` (every node) or `/object_info/<node_class>` ({} if it is not registered)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""), timeout=120)

    def post_prompt(self, api_workflow: dict) -> str:
        """Queue an API-format workflow; returns its prompt_id. A refused workflow raises with the
        server's node errors."""
        try:
            answer = self._request("/prompt", {"prompt": api_workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ComfyServerError(f"/prompt refused the workflow ({error.code}): {detail}\n{self.log_tail(40)}") \
                from None
        if answer.get("node_errors"):
            raise ComfyServerError(f"/prompt reported node errors: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 600, check: bool = True) -> dict:
        """Wait until `prompt_id` is in /history and return its entry. With `check`, a failed run
        raises with ComfyUI's execution error and the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry is not None:
                status = entry.get("status") or {}
                if check and status.get("status_str") == "error":
                    errors = [m for m in status.get("messages", []) if m and m[0] == "execution_error"]
                    raise ComfyServerError(f"prompt {prompt_id} failed: {json.dumps(errors or status)[:6000]}\n"
                                           f"{self.log_tail(60)}")
                return entry
            if self.process is None or self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, api_workflow: dict, timeout: float = 600) -> dict:
        """post_prompt + wait_history (checked)."""
        return self.wait_history(self.post_prompt(api_workflow), timeout)

    def output_files(self, entry: dict, kind: str = "images") -> list[Path]:
        """The files a history entry's outputs name (SaveImage & co.), under the output directory."""
        files = []
        for node_output in (entry.get("outputs") or {}).values():
            for item in node_output.get(kind, []):
                if item.get("type", "output") == "output":
                    files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files
