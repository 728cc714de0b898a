"""Trigger words and hashes for prompts and image savers: the sidecar files other tools write, the
trainers' metadata fields, and the hash Civitai reads from sd-webui's "Lora hashes"."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core.trigger_words import adapter_info, hashes_text, metadata_trigger_words, tensor_sha256, trigger_text

TENSORS = {"b.lora_up.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
           "a.lora_down.weight": torch.ones(2, 3, dtype=torch.float16)}


def _tensor_bytes_in_file_order(path) -> bytes:
    """The data region rebuilt from the tensors themselves, placed by the header's offsets."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return b"".join(TENSORS[k].contiguous().view(torch.uint8).numpy().tobytes() for k in order)


def test_hash_is_the_tensor_data_sha256_and_ignores_metadata(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(TENSORS, str(one), {"ss_output_name": "x"})
    save_file(TENSORS, str(two), {"modelspec.title": "something much longer " * 20})
    expected = hashlib.sha256(_tensor_bytes_in_file_order(one)).hexdigest()
    assert tensor_sha256(str(one)) == expected == tensor_sha256(str(two))
    assert hashlib.sha256(one.read_bytes()).hexdigest() != expected  # not the whole-file (AutoV2) hash
    changed = dict(TENSORS, **{"a.lora_down.weight": torch.zeros(2, 3, dtype=torch.float16)})
    save_file(changed, str(two))
    assert tensor_sha256(str(two)) != expected
    info = adapter_info(str(one), {}, [str(tmp_path)])
    assert hashes_text([info, info]) == f"one: {expected[:12]}"


@pytest.mark.parametrize("metadata, words, key", [
    ({"modelspec.trigger_phrase": "ohwx person, red coat"}, ["ohwx person", "red coat"], "modelspec.trigger_phrase"),
    ({"ss_trigger_words": '["zk style", "ink"]'}, ["zk style", "ink"], "ss_trigger_words"),
    ({"ss_tag_frequency": json.dumps({"10_a": {"1girl": 5, "zkx": 9}, "5_b": {"1girl": 6, "hat": 1}})},
     ["1girl", "zkx", "hat"], "ss_tag_frequency"),
    ({"ss_tag_frequency": "not json"}, [], None),
    ({}, [], None),
])
def test_metadata_trigger_words(metadata, words, key):
    assert metadata_trigger_words(metadata) == (words, key)


def test_sidecars_of_three_tools(tmp_path):
    path = tmp_path / "sub" / "style.safetensors"
    path.parent.mkdir()
    save_file(TENSORS, str(path))
    (path.parent / "style.json").write_text(json.dumps({"activation text": "zk style, Ink", "preferred weight": 0.7}))
    (path.parent / "style.civitai.info").write_text(json.dumps({"trainedWords": ["ink", "brush strokes"]}))
    (path.parent / "style.metadata.json").write_text(json.dumps(
        {"civitai": {"trainedWords": ["zkx"]}, "usage_tips": json.dumps({"strength": 0.5})}))
    metadata = {"ss_tag_frequency": json.dumps({"d": {"tagonly": 3}})}
    info = adapter_info(str(path), metadata, [str(tmp_path)])
    assert info.trigger_words == ["zk style", "Ink", "brush strokes", "zkx"]  # tags not added: triggers are named
    assert info.preferred_weight == 0.7
    assert info.sources == ["style.json", "style.civitai.info", "style.metadata.json"]
    info = adapter_info(str(path), {"modelspec.trigger_phrase": "zkp"}, [str(tmp_path)])
    assert info.trigger_words[-1] == "zkp"
    assert trigger_text([info, info]) == "zk style, Ink, brush strokes, zkx, zkp"


def test_bad_or_foreign_sidecars_are_ignored(tmp_path):
    loras, elsewhere = tmp_path / "loras", tmp_path / "private"
    loras.mkdir(), elsewhere.mkdir()
    path = loras / "a.safetensors"
    save_file(TENSORS, str(path))
    (elsewhere / "secret.json").write_text(json.dumps({"activation text": "leaked"}))
    os.symlink(elsewhere / "secret.json", loras / "a.json")
    (loras / "a.civitai.info").write_text("{ not json")
    (loras / "a.metadata.json").write_text(json.dumps(["a list"]))
    info = adapter_info(str(path), {}, [str(loras)])
    assert info.trigger_words == [] and info.sources == [] and info.preferred_weight is None
