"""The pack's main job, end to end: a real ComfyUI with this pack in `custom_nodes`, serving on
127.0.0.1, executes `example_workflows/lycoris_loader_api.json` through the HTTP API.

Models are generated with random weights (scripts/make_demo_models.py); the output image and
the loader's coverage report are left in `out/main_job/`. ComfyUI comes from COMFYUI_PATH, or
the pinned one of the test setup (tests/comfyui_runtime.py).

    .venv/bin/python scripts/run_main_job.py [--out out/main_job] [--timeout 600]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "lycoris_loader_api.json"
PACK_LINK = "comfyui-lycoris-pack"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_pack(root: Path) -> None:
    """This repository in the ComfyUI's custom_nodes (a symlink; replaced if stale)."""
    link = root / "custom_nodes" / PACK_LINK
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(REPO, target_is_directory=True)


class ComfyServer:
    """ComfyUI's main.py in a subprocess on 127.0.0.1; always terminated on exit."""

    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "comfyui.log"
        self.output_dir = work / "output"
        self.process = None

    def __enter__(self):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = self.work / "extra_model_paths.yaml"
        paths.write_text(f"lycoris_demo:\n    base_path: {self.work / 'models'}\n"
                         f"    checkpoints: checkpoints\n    loras: loras\n")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--extra-model-paths-config", str(paths),
                   "--output-directory", str(self.output_dir)]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                self.get("/object_info/LycorisLoader")
                return self
            time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within 300 s:\n{self.tail()}")

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_prompt(self, workflow: dict) -> str:
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"/prompt refused the workflow: {error.read().decode(errors='replace')}") from None

    def wait_history(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or (entry.get("outputs") is not None and status.get("completed",
                                                                                                          True)):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.tail()}")
            time.sleep(1)
        raise RuntimeError(f"the prompt did not finish within {timeout:.0f} s:\n{self.tail()}")


def run(out: Path, timeout: float = 600) -> dict:
    """Run the example workflow; returns {"image": path, "report": text, "history": entry}."""
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from comfyui_runtime import import_comfy  # the same runtime resolution as the tests

    root = import_comfy()
    from make_demo_models import write_demo_models

    out.mkdir(parents=True, exist_ok=True)
    write_demo_models(out / "models" / "checkpoints", out / "models" / "loras")
    install_pack(root)
    workflow = json.loads(WORKFLOW.read_text())
    with ComfyServer(root, out) as server:
        entry = server.wait_history(server.post_prompt(workflow), timeout)
        if entry.get("status", {}).get("status_str") == "error":
            raise RuntimeError(f"the workflow failed: {json.dumps(entry.get('status'), indent=1)[:4000]}")
        images = [img for node in entry["outputs"].values() for img in node.get("images", [])]
        if not images:
            raise RuntimeError(f"no image in the history: {json.dumps(entry)[:2000]}\n{server.tail()}")
        image = server.output_dir / images[0].get("subfolder", "") / images[0]["filename"]
        report = "\n".join(entry["outputs"].get("2", {}).get("text", []))
    final = out / "lycoris_example.png"
    shutil.copyfile(image, final)
    (out / "coverage_report.txt").write_text(report + "\n")
    return {"image": final, "report": report, "history": entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "out" / "main_job"))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = run(Path(args.out), args.timeout)
    print(result["report"])
    print(f"image written: {result['image']}")


if __name__ == "__main__":
    main()
