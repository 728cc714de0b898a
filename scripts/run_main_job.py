"""The pack's main job, end to end: a real ComfyUI with this pack in `custom_nodes`, serving on
127.0.0.1, executes `example_workflows/api/lycoris_loader_api.json` through the HTTP API.

The models are generated with random weights by the test harness (tests/e2e/make_models.py): a
small SD1.x checkpoint that ComfyUI's own loader detects, and an adapter in kohya naming (LoHa on
the UNet, LoRA on the text encoder). The image and the loader's coverage report are left in
`out/main_job/`. ComfyUI comes from COMFYUI_PATH, or the pinned one (tests/comfyui_runtime.py).

    .venv/bin/python scripts/run_main_job.py [--out out/main_job] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "api" / "lycoris_loader_api.json"
ADAPTER = "lycoris_demo_loha.safetensors"

sys.path.append(str(REPO / "tests"))  # appended: ComfyUI's root must stay first for `comfy`


def write_models(models: Path) -> None:
    """The checkpoint and the adapter the example workflow names (reused when present)."""
    import torch

    from e2e import make_models

    with torch.inference_mode():
        make_models.write_checkpoint(models / "checkpoints" / make_models.CHECKPOINT_NAME)
        adapter = models / "loras" / ADAPTER
        if not adapter.is_file():
            shapes = make_models.weight_shapes()
            unet = lambda key, shape: key.startswith(make_models.UNET_PREFIX) and make_models.default_targets(key, shape)  # noqa: E731
            text = lambda key, shape: not key.startswith(make_models.UNET_PREFIX) and make_models.default_targets(key, shape)  # noqa: E731
            tensors = {**make_models.kohya_lora(shapes, algo="loha", select=unet, seed=3),
                       **make_models.kohya_lora(shapes, select=text, seed=4)}
            make_models.save_safetensors(adapter, tensors, {
                "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"}),
                "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"demo": {"lycoris demo": 1}})})


def run(out: Path, timeout: float = 600) -> dict:
    """Run the example workflow; returns {"image": path, "report": text, "history": entry}."""
    from comfyui_runtime import import_comfy

    import_comfy()  # the model generator uses the runtime's own classes
    from e2e.server import ComfyServer

    out.mkdir(parents=True, exist_ok=True)
    write_models(out / "models")
    workflow = json.loads(WORKFLOW.read_text())
    with ComfyServer(out / "server", out / "models", extra_args=("--fp32-text-enc",)) as server:
        entry = server.run(workflow, timeout)
        images = server.output_files(entry)
        if not images:
            raise RuntimeError(f"the workflow wrote no image:\n{server.log_tail()}")
        report = "\n".join(entry["outputs"].get("2", {}).get("text", []))
        image = out / "lycoris_example.png"
        shutil.copyfile(images[0], image)
    (out / "coverage_report.txt").write_text(report + "\n")
    return {"image": image, "report": report, "history": entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "out" / "main_job"))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    result = run(Path(args.out), args.timeout)
    print(result["report"])
    print(f"image written: {result['image']}")


if __name__ == "__main__":
    main()
