"""The HTTP routes' pure functions (nodes/routes.py) on real ComfyUI folder lists in tmp dirs:
which names are refused before any lookup, that only listed files are opened, and what the
answers hold (the real server is exercised in tests/e2e/test_routes.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

TAGS = {"set": {"lycoris flower": 5, "watercolor": 2}}


def _lora(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in {"lora_unet_input_blocks_1_1_proj_in": (8, 8),
                                    "lora_unet_output_blocks_3_1_proj_out": (8, 8)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_dim, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora", "ss_tag_frequency": json.dumps(TAGS)})
    return path


def _model(path, keys):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


@pytest.fixture
def routes(pack):
    import importlib

    return importlib.import_module("lycoris_pack.nodes.routes")


@pytest.fixture
def folders(pack, tmp_path):
    """loras/ (a.safetensors, sub/b.safetensors, junk.safetensors), checkpoints/, and an adapter
    beside loras/ that '..' would reach if it were followed."""
    import folder_paths
    from comfyui_runtime import use_checkpoints_folder, use_loras_folder, use_model_folder

    loras, checkpoints, unet = tmp_path / "loras", tmp_path / "checkpoints", tmp_path / "unet"
    _lora(loras / "a.safetensors")
    _lora(loras / "sub" / "b.safetensors", seed=1)
    (loras / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    _lora(tmp_path / "outside.safetensors", seed=2)
    checkpoints.mkdir()
    unet.mkdir()
    use_loras_folder(loras)
    use_checkpoints_folder(checkpoints)
    use_model_folder("diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet", unet)
    return tmp_path


def test_nothing_is_registered_outside_a_running_server(routes):
    assert routes._ROUTES is None


def test_listed_names_resolve_to_their_files(routes, folders):
    assert routes.listed_file("loras", "a.safetensors")[0] == str(folders / "loras" / "a.safetensors")
    path, entry = routes.listed_file("loras", "sub/b.safetensors")
    assert path.replace("\\", "/").endswith("loras/sub/b.safetensors") and entry.replace("\\", "/") == "sub/b.safetensors"


@pytest.mark.parametrize("name, status", [
    ("../outside.safetensors", 403),  # the file exists there: refused, not looked up
    ("sub/../../outside.safetensors", 403),
    ("sub/../a.safetensors", 403),  # even when it would land inside
    ("..", 403),
    ("/etc/passwd", 403),
    ("C:\\x.safetensors", 403),
    ("C:/x.safetensors", 403),
    ("c:x.safetensors", 403),
    ("sub\\b.safetensors", 403),
    ("\\\\server\\share\\x.safetensors", 403),
    ("a.safetensors\x00.txt", 403),
    ("", 400),
    (None, 400),
    ("missing.safetensors", 404),
    ("sub", 404),  # a folder, not a listed file
    ("outside.safetensors", 404),
])
def test_refusals(routes, folders, name, status):
    with pytest.raises(routes.RouteError) as caught:
        routes.listed_file("loras", name)
    assert caught.value.status == status, caught.value.message


def test_an_absolute_path_to_a_listed_file_is_refused(routes, folders):
    with pytest.raises(routes.RouteError) as caught:
        routes.listed_file("loras", str(folders / "loras" / "a.safetensors"))
    assert caught.value.status == 403


def test_adapter_info_is_the_core_summary_under_the_listed_name(routes, folders):
    from lycoris_pack.lycoris_core import load_adapter_file
    from lycoris_pack.lycoris_core.inspection import summarize

    answer = routes.adapter_info("sub/b.safetensors")
    expected = summarize(load_adapter_file(folders / "loras" / "sub" / "b.safetensors"))
    expected["file"] = "sub/b.safetensors"
    assert json.loads(json.dumps(answer["summary"])) == json.loads(json.dumps(expected))
    assert answer["name"] == "sub/b.safetensors" and answer["path_folder"] == 0
    assert "lycoris flower (5)" in answer["text"] and str(folders) not in json.dumps(answer)


def test_a_listed_file_that_is_not_an_adapter_is_422_naming_it(routes, folders):
    with pytest.raises(routes.RouteError) as caught:
        routes.adapter_info("junk.safetensors")
    error = caught.value
    assert error.status == 422 and error.message.startswith("junk.safetensors: ") and str(folders) not in error.message


def test_block_table(routes):
    from lycoris_pack.lycoris_core.block_weights import parse_block_weights
    from lycoris_pack.lycoris_core.blocks import ARCHITECTURES, architecture_blocks, id_group

    table = routes.block_table("sd15")  # an alias
    ids = architecture_blocks("sd1")
    assert table["architecture"] == "sd1" and table["ids"] == ids
    assert table["groups"] == {block: id_group(block) for block in ids}
    for preset in ("SD-ALL", "SD-INALL", "ALL", "INS"):
        assert table["presets"][preset] == parse_block_weights(preset, "sd1", ids, seed=0).vector
    assert list(table["presets"]["SD-ALL"]) == ids
    assert not any(name.startswith(("SDXL-", "FLUX-")) for name in table["presets"]), list(table["presets"])
    assert set(table["architectures"]) == set(ARCHITECTURES) - {"unknown"}
    assert json.loads(json.dumps(table)) == table


@pytest.mark.parametrize("architecture", ["bogus", "", None])
def test_block_table_refuses_unknown_architectures(routes, architecture):
    with pytest.raises(routes.RouteError) as caught:
        routes.block_table(architecture)
    assert caught.value.status == 400


def test_model_architecture_reads_the_header(routes, folders):
    from lycoris_pack.lycoris_core.blocks import architecture_blocks

    sd1 = ["model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
           "model.diffusion_model.output_blocks.11.1.proj_out.weight",
           "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    _model(folders / "checkpoints" / "sd1.safetensors", sd1)
    flux = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(3)] + \
           [f"single_blocks.{i}.linear1.weight" for i in range(5)]
    _model(folders / "unet" / "flux.safetensors", flux)
    assert routes.model_architecture("checkpoints", "sd1.safetensors") == {
        "architecture": "sd1", "ids": architecture_blocks("sd1")}
    for folder in ("unet", "diffusion_models"):  # the old and the new name, on either ComfyUI
        answer = routes.model_architecture(folder, "flux.safetensors")
        assert answer == {"architecture": "flux", "ids": architecture_blocks("flux", flux)}
        assert "D02" in answer["ids"] and "D03" not in answer["ids"] and "S04" in answer["ids"]


@pytest.mark.parametrize("folder, name, status", [
    ("vae", "sd1.safetensors", 400),
    (None, "sd1.safetensors", 400),
    ("loras", "a.safetensors", 400),  # only model folders
    ("checkpoints", "../loras/a.safetensors", 403),
    ("checkpoints", "a.safetensors", 404),  # an adapter's name, not in the checkpoints list
])
def test_model_architecture_refusals(routes, folders, folder, name, status):
    with pytest.raises(routes.RouteError) as caught:
        routes.model_architecture(folder, name)
    assert caught.value.status == status, caught.value.message


def test_model_architecture_of_a_file_that_is_not_safetensors_is_422(routes, folders):
    (folders / "checkpoints" / "old.safetensors").write_bytes(b"\x80\x02junk that looks like a pickle")
    with pytest.raises(routes.RouteError) as caught:
        routes.model_architecture("checkpoints", "old.safetensors")
    assert caught.value.status == 422 and caught.value.message.startswith("old.safetensors: ")
