"""The in-process runtime: ComfyUI imports on the CPU and its model folders can be redirected."""

import sys


def test_comfy_imports_on_cpu(comfy, comfy_root):
    import comfy.model_management as mm
    import nodes

    assert mm.cpu_state == mm.CPUState.CPU and mm.get_torch_device().type == "cpu"
    assert sys.modules["comfy.lora"].__file__.startswith(str(comfy_root))
    assert {"CheckpointLoaderSimple", "LoraLoader", "KSampler"} <= set(nodes.NODE_CLASS_MAPPINGS)
    assert hasattr(comfy.lora, "model_lora_keys_unet") and hasattr(comfy.lora, "model_lora_keys_clip")


def test_model_folders_can_point_at_a_temp_dir(comfy, tmp_path):
    import folder_paths
    from comfyui_runtime import use_checkpoints_folder, use_loras_folder

    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "x.safetensors").write_bytes(b"")
    (tmp_path / "c").mkdir()
    use_loras_folder(tmp_path / "l")
    use_checkpoints_folder(tmp_path / "c")
    assert folder_paths.get_filename_list("loras") == ["x.safetensors"]
    assert folder_paths.get_filename_list("checkpoints") == []
    assert folder_paths.get_full_path("loras", "x.safetensors") == str(tmp_path / "l" / "x.safetensors")
