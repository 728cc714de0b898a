"""The e2e harness itself, with ComfyUI's core nodes only: a generated SD1.x checkpoint plus a
kohya LoRA go through CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode -> KSampler (1 step,
64x64) -> VAEDecode -> SaveImage, posted to /prompt in API format and awaited on /history."""

from e2e.make_models import CHECKPOINT_NAME

LORA_NAME = "e2e_kohya_lora.safetensors"
PNG = b"\x89PNG\r\n\x1a\n"


def core_workflow(strength: float, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA_NAME,
                                                     "strength_model": strength, "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lycoris flower"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 7, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def test_core_nodes_workflow_writes_an_image(comfy_server):
    entry = comfy_server.run(core_workflow(1.0, "e2e_core"), timeout=300)
    images = comfy_server.output_files(entry)
    assert len(images) == 1, entry
    assert images[0].is_file() and images[0].read_bytes()[:8] == PNG
    assert "lora key not loaded" not in comfy_server.log_text(), comfy_server.log_tail()


def test_lora_strength_changes_the_image(comfy_server):
    from PIL import Image
    import numpy as np

    pixels = []
    for strength, prefix in ((0.0, "e2e_core_s0"), (1.0, "e2e_core_s1")):
        [image] = comfy_server.output_files(comfy_server.run(core_workflow(strength, prefix), timeout=300))
        pixels.append(np.asarray(Image.open(image), dtype=np.int16))
    assert pixels[0].shape == (64, 64, 3)
    assert np.abs(pixels[0] - pixels[1]).max() > 0, "the LoRA had no effect on the image"


def test_core_nodes_are_served(comfy_server):
    info = comfy_server.object_info("LoraLoader")
    assert LORA_NAME in info["LoraLoader"]["input"]["required"]["lora_name"][0]


def test_the_pack_imported_without_errors(comfy_server):
    failures = [line for line in comfy_server.import_failures() if "lycoris" in line.lower()]
    assert not failures, comfy_server.log_tail(150)
