"""The pack's HTTP routes on the real ComfyUI server: /lycoris/info answers what lycoris_core's
inspection says about the same file, every name that could leave the loras folder list is refused
with the right status (and nothing of any file comes back), /lycoris/blocks serves the core's block
ids and presets, /lycoris/architecture reads a checkpoint's header."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest

from e2e.make_models import CHECKPOINT_NAME

LORA = "e2e_kohya_lora.safetensors"
DYLORA = "e2e_kohya_dylora.safetensors"
SAME_AS_CORE = ("modules", "algorithms", "ranks", "alphas", "dtypes", "parameters", "convention", "training",
                "network_args", "trigger_words", "unknown_keys", "problems", "per_module", "size_bytes")


def _get(server, path: str, query: str = ""):
    status, body = server.get_raw(path + ("?" + query if query else ""))
    return status, json.loads(body), body


@pytest.mark.parametrize("name", [LORA, DYLORA])
def test_info_is_the_core_summary_of_the_file(comfy_server, e2e_models, name):
    from lycoris_core import load_adapter_file
    from lycoris_core.inspection import summarize

    models, _ = e2e_models
    status, answer, _ = _get(comfy_server, "/lycoris/info", urlencode({"name": name}))
    assert status == 200, answer
    expected = json.loads(json.dumps(summarize(load_adapter_file(models / "loras" / name))))
    for field in SAME_AS_CORE:
        assert answer["summary"][field] == expected[field], field
    assert answer["name"] == name and answer["summary"]["file"] == name
    assert isinstance(answer["path_folder"], int)
    assert str(models) not in json.dumps(answer)  # the server's directories stay private
    assert "algorithms: lora x" in answer["text"]
    if name == DYLORA:
        assert expected["trigger_words"] == [["lycoris flower", 12], ["watercolor", 8]]
        assert "trigger words: lycoris flower (12), watercolor (8)" in answer["text"]


@pytest.fixture
def junk_adapter(e2e_models):
    """A listed file in the loras folder that is not a safetensors file (removed afterwards)."""
    models, _ = e2e_models
    path = models / "loras" / "e2e_routes_junk.safetensors"
    path.write_bytes(b"PK\x03\x04 certainly not a safetensors file")
    yield path.name
    path.unlink()


def _refusals(lora_path: str) -> list[tuple[str, int]]:
    """(query string as sent, expected status)."""
    by_name = [
        ("../x.safetensors", 403),
        ("../" + LORA, 403),
        ("sub/../../x", 403),
        ("sub/../" + LORA, 403),  # would land on the listed file: refused all the same
        ("/etc/passwd", 403),
        (lora_path, 403),  # the absolute path of the real file
        ("C:\\x", 403),
        ("C:/Windows/win.ini", 403),
        ("loras\\" + LORA, 403),
        (LORA + "\x00.png", 403),
        ("missing.safetensors", 404),
        (CHECKPOINT_NAME, 404),  # a real file, in the checkpoints list only
    ]
    queries = [("name=" + quote(name, safe=""), status) for name, status in by_name]
    queries += [
        ("name=../" + LORA, 403),  # unencoded
        ("name=..%2F" + LORA, 403),
        ("name=%2E%2E%2F" + LORA, 403),
        ("name=sub%2F..%2F..%2Fx.safetensors", 403),
        ("name=%2Fetc%2Fpasswd", 403),
        ("name=..%5C" + LORA, 403),  # ..\
        ("name=..%252F" + LORA, 404),  # decoded once only: a literal, unlisted name
        ("name=", 400),
        ("", 400),
    ]
    return queries


def test_info_refusals(comfy_server, e2e_models):
    models, _ = e2e_models
    lora_path = models / "loras" / LORA
    secret = lora_path.read_bytes()[8:40]  # the start of the file's header
    results = []
    for query, expected in _refusals(str(lora_path)):
        status, answer, body = _get(comfy_server, "/lycoris/info", query)
        results.append((query, status, expected))
        assert set(answer) == {"error"} and answer["error"], (query, answer)
        assert b"root:" not in body and secret not in body and b"lora_down" not in body, (query, body[:200])
    wrong = [r for r in results if r[1] != r[2]]
    assert not wrong, wrong


def test_info_of_a_listed_file_that_is_not_an_adapter_is_422(comfy_server, junk_adapter):
    status, answer, _ = _get(comfy_server, "/lycoris/info", urlencode({"name": junk_adapter}))
    assert status == 422 and answer["error"].startswith(junk_adapter + ": "), answer
    assert "PK" not in answer["error"]


@pytest.mark.parametrize("architecture, preset", [("sd1", "SD-ALL"), ("sdxl", "SDXL-ALL"), ("flux", "FLUX-ALL")])
def test_blocks(comfy_server, architecture, preset):
    from lycoris_core.block_weights import parse_block_weights
    from lycoris_core.blocks import architecture_blocks

    status, table, _ = _get(comfy_server, "/lycoris/blocks", urlencode({"architecture": architecture}))
    assert status == 200, table
    ids = architecture_blocks(architecture)
    assert table["architecture"] == architecture and table["ids"] == ids
    assert table["presets"][preset] == parse_block_weights(preset, architecture, ids, seed=0).vector
    assert architecture in table["architectures"]
    if architecture == "sd1":
        assert {"SD-ALL", "SD-INALL", "ALL", "INS"} <= set(table["presets"])


def test_blocks_refuses_an_unknown_architecture(comfy_server):
    for query in (urlencode({"architecture": "sd9"}), ""):
        status, answer, _ = _get(comfy_server, "/lycoris/blocks", query)
        assert status == 400 and "error" in answer, (query, answer)


def test_architecture_of_the_checkpoint(comfy_server, e2e_models):
    from lycoris_core.blocks import architecture_blocks
    from lycoris_core.safe_io import SafetensorsReader

    models, _ = e2e_models
    with SafetensorsReader(models / "checkpoints" / CHECKPOINT_NAME) as reader:
        keys = list(reader.keys())
    status, answer, _ = _get(comfy_server, "/lycoris/architecture",
                             urlencode({"folder": "checkpoints", "name": CHECKPOINT_NAME}))
    assert status == 200, answer
    assert answer == {"architecture": "sd1", "ids": architecture_blocks("sd1", keys)}


@pytest.mark.parametrize("query, status", [
    ({"folder": "vae", "name": CHECKPOINT_NAME}, 400),
    ({"folder": "loras", "name": LORA}, 400),
    ({"name": CHECKPOINT_NAME}, 400),
    ({"folder": "checkpoints", "name": "../checkpoints/" + CHECKPOINT_NAME}, 403),
    ({"folder": "checkpoints", "name": "/etc/passwd"}, 403),
    ({"folder": "checkpoints", "name": LORA}, 404),
    ({"folder": "diffusion_models", "name": CHECKPOINT_NAME}, 404),
])
def test_architecture_refusals(comfy_server, query, status):
    got, answer, body = _get(comfy_server, "/lycoris/architecture", urlencode(query))
    assert got == status and set(answer) == {"error"}, (query, got, answer)
    assert b"root:" not in body
