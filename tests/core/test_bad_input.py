"""Bad adapter files: every failure is an `AdapterFormatError` naming the file (and the key where
there is one); a bad module never spoils the others; inputs are never modified."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from lycoris_core import AdapterFormatError, load_adapter_file, merge_into_state_dict

SHAPES = {"lin": (96, 64), "lin_nobias": (64, 96), "conv3": (32, 16, 3, 3), "conv1": (48, 32, 1, 1)}
RANK, ALPHA = 4, 2.0


def base_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in SHAPES.items():
        sd[f"{name}.weight"] = torch.randn(shape, generator=g) * 0.1
        if name != "lin_nobias":
            sd[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    return sd


def lora_tensors(names=tuple(SHAPES), prefix="lycoris_"):
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in names:
        shape = SHAPES[name]
        up_shape = (shape[0], RANK) + (1,) * (len(shape) - 2)
        down_shape = (RANK,) + shape[1:]
        out[f"{prefix}{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
        out[f"{prefix}{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
        out[f"{prefix}{name}.alpha"] = torch.tensor(ALPHA)
    return out


def expected_weight(sd, tensors, name, m=1.0, prefix="lycoris_"):
    up = tensors[f"{prefix}{name}.lora_up.weight"]
    down = tensors[f"{prefix}{name}.lora_down.weight"]
    w = sd[f"{name}.weight"]
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
    return w + m * (ALPHA / RANK) * delta


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata)
    return path


def assert_names(error: AdapterFormatError, path, key=None):
    text = str(error)
    assert str(path) in text or path.name in text, text
    if key is not None:
        assert key in text, text


def merge_checked(sd, adapter_file, m=1.0):
    """merge, and check that the input state dict was not modified."""
    before = {k: v.clone() for k, v in sd.items()}
    merged, coverages = merge_into_state_dict(sd, [(adapter_file, m)])
    for k, v in before.items():
        assert torch.equal(sd[k], v), f"input tensor {k} was modified"
    return merged, coverages


# -- unreadable files -----------------------------------------------------------------------
def good_bytes():
    return save(lora_tensors(), {"ss_network_module": "lycoris.kohya"})


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1, -100])
def test_truncated_file(tmp_path, cut):
    data = good_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)


@pytest.mark.parametrize("header", [
    b"not json at all!",
    b'{"a.lora_up.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 999]}}',
    b'{"a.lora_up.weight": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}}',
    b'{"a.lora_up.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
    b'[1, 2, 3]',
    b'{"a": 1, "a": 2}',
])
def test_corrupt_header(tmp_path, header):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)


def test_plain_checkpoint_is_not_an_adapter(tmp_path):
    path = write(tmp_path / "model.safetensors", base_state_dict())
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)
    assert "not a LoRA/LyCORIS adapter" in str(info.value) or "not an adapter" in str(info.value)


def test_empty_safetensors_is_not_an_adapter(tmp_path):
    path = write(tmp_path / "empty.safetensors", {})
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert_names(info.value, path)


def test_bad_adapter_config_json(tmp_path):
    write(tmp_path / "adapter_model.safetensors", {
        "base_model.model.lin.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.lin.lora_B.weight": torch.zeros(96, 4),
    })
    (tmp_path / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(tmp_path / "adapter_model.safetensors")
    assert "adapter_config.json" in str(info.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_raise_only_adapter_format_error(tmp_path, data):
    """Truncations and byte overwrites anywhere: load (and merge) either work or raise
    AdapterFormatError naming the file - never any other exception."""
    raw = bytearray(good_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        adapter_file = load_adapter_file(path)
        merge_into_state_dict(base_state_dict(), [(adapter_file, 1.0)])
    except AdapterFormatError as error:
        assert str(path) in str(error) or path.name in str(error), str(error)


# -- bad modules inside a good file ---------------------------------------------------------
def test_wrong_shape_for_the_layer(tmp_path):
    tensors = lora_tensors()
    g = torch.Generator().manual_seed(3)
    tensors["lycoris_lin.lora_up.weight"] = torch.randn(95, RANK, generator=g)  # the layer has 96 outputs
    path = write(tmp_path / "wrong_shape.safetensors", tensors)
    adapter_file = load_adapter_file(path)  # the factors agree with each other: decodes
    sd = base_state_dict()
    merged, (coverage,) = merge_checked(sd, adapter_file)
    assert len(coverage.problems) == 1, coverage.problems
    assert "lycoris_lin" in coverage.problems[0] and path.name in coverage.problems[0]
    assert "lycoris_lin" not in coverage.matched
    assert torch.equal(merged["lin.weight"], sd["lin.weight"])
    assert torch.equal(merged["lin.bias"], sd["lin.bias"])
    for name in ("lin_nobias", "conv3", "conv1"):
        assert torch.allclose(merged[f"{name}.weight"], expected_weight(sd, tensors, name), atol=1e-6), name
        assert coverage.matched[f"lycoris_{name}"] == f"{name}.weight"


def _inconsistent_modules():
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return {
        "lora_rank": {"lora_up.weight": r(96, 5), "lora_down.weight": r(4, 64), "alpha": torch.tensor(2.0)},
        "lora_up_1d": {"lora_up.weight": r(96), "lora_down.weight": r(4, 64)},
        "lora_mid": {"lora_up.weight": r(96, 4), "lora_down.weight": r(4, 64), "lora_mid.weight": r(3, 4, 3, 3)},
        "loha_rank": {"hada_w1_a": r(96, 4), "hada_w1_b": r(3, 64), "hada_w2_a": r(96, 4), "hada_w2_b": r(4, 64)},
        "loha_halves_disagree": {"hada_w1_a": r(96, 4), "hada_w1_b": r(4, 64),
                                 "hada_w2_a": r(96, 4), "hada_w2_b": r(4, 32)},
        "lokr_rank": {"lokr_w1": r(4, 4), "lokr_w2_a": r(24, 4), "lokr_w2_b": r(3, 16)},
        "lokr_kron_size": {"lokr_w1": r(4, 4), "lokr_w2": r(24, 15)},
        "glora_layout": {"a1.weight": r(64, 4), "a2.weight": r(4, 64), "b1.weight": r(96, 4), "b2.weight": r(3, 64)},
        "ia3_size": {"weight": r(95), "on_input": torch.tensor(0)},
        "full_size": {"diff": r(96, 63)},
        "dora_size": {"lora_up.weight": r(96, 4), "lora_down.weight": r(4, 64), "dora_scale": r(95, 1)},
        "tlora_rank": {"q_layer.weight": r(4, 64), "p_layer.weight": r(96, 3), "lambda_layer": r(1, 4)},
    }


@pytest.mark.parametrize("case", list(_inconsistent_modules()))
def test_inconsistent_module_is_reported_and_isolated(tmp_path, case):
    """A module whose factors do not fit together (or not the layer) is reported, in
    AdapterFile.problems (decode) or Coverage.problems (merge), naming file and module; the
    other modules merge exactly; nothing raises."""
    tensors = lora_tensors(("conv1", "lin_nobias"))
    tensors.update({f"lycoris_lin.{k}": v for k, v in _inconsistent_modules()[case].items()})
    path = write(tmp_path / f"{case}.safetensors", tensors)
    adapter_file = load_adapter_file(path)
    sd = base_state_dict()
    merged, (coverage,) = merge_checked(sd, adapter_file)
    reports = list(adapter_file.problems) + [p for p in coverage.problems if p not in adapter_file.problems]
    assert len(reports) == 1, reports
    assert "lycoris_lin" in reports[0] and path.name in reports[0], reports[0]
    assert torch.equal(merged["lin.weight"], sd["lin.weight"]) and torch.equal(merged["lin.bias"], sd["lin.bias"])
    for name in ("conv1", "lin_nobias"):
        assert torch.allclose(merged[f"{name}.weight"], expected_weight(sd, tensors, name), atol=1e-6), name


def test_rank_mismatch_names_the_key(tmp_path):
    tensors = lora_tensors()
    tensors["lycoris_conv3.lora_up.weight"] = torch.randn(32, RANK + 1, 1, 1)
    path = write(tmp_path / "rank.safetensors", tensors)
    adapter_file = load_adapter_file(path)
    assert "lycoris_conv3" not in adapter_file.adapters
    assert len(adapter_file.problems) == 1
    assert "lycoris_conv3.lora_up.weight" in adapter_file.problems[0]
    assert path.name in adapter_file.problems[0]
    assert set(adapter_file.adapters) == {"lycoris_lin", "lycoris_lin_nobias", "lycoris_conv1"}
    _, (coverage,) = merge_checked(base_state_dict(), adapter_file)
    assert any("lycoris_conv3.lora_up.weight" in p for p in coverage.problems)


def test_unknown_suffix_is_reported(tmp_path):
    tensors = lora_tensors()
    tensors["lycoris_lin.lora_sideways.weight"] = torch.zeros(3)
    tensors["lycoris_mystery.frobnicate"] = torch.zeros(2)
    path = write(tmp_path / "unknown.safetensors", tensors)
    adapter_file = load_adapter_file(path)
    assert adapter_file.unknown_keys == sorted(["lycoris_lin.lora_sideways.weight", "lycoris_mystery.frobnicate"])
    sd = base_state_dict()
    merged, (coverage,) = merge_checked(sd, adapter_file)
    assert sorted(coverage.unknown_keys) == adapter_file.unknown_keys
    assert not coverage.complete
    for name in SHAPES:
        assert torch.allclose(merged[f"{name}.weight"], expected_weight(sd, tensors, name), atol=1e-6), name


def test_adapter_for_a_missing_layer_is_unmatched(tmp_path):
    tensors = lora_tensors()
    g = torch.Generator().manual_seed(9)
    tensors["lycoris_not_in_model.lora_up.weight"] = torch.randn(8, RANK, generator=g)
    tensors["lycoris_not_in_model.lora_down.weight"] = torch.randn(RANK, 8, generator=g)
    path = write(tmp_path / "extra.safetensors", tensors)
    sd = base_state_dict()
    merged, (coverage,) = merge_checked(sd, load_adapter_file(path))
    assert coverage.unmatched == ["lycoris_not_in_model"]
    assert set(coverage.matched) == {f"lycoris_{n}" for n in SHAPES}
    assert coverage.problems == [] and not coverage.complete
    for name in SHAPES:
        assert torch.allclose(merged[f"{name}.weight"], expected_weight(sd, tensors, name), atol=1e-6), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_adapter_raises_naming_file_and_layer(tmp_path, bad):
    tensors = lora_tensors()
    tensors["lycoris_conv3.lora_down.weight"][0, 0, 0, 0] = bad
    path = write(tmp_path / "nan.safetensors", tensors)
    sd = base_state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(AdapterFormatError) as info:
        merge_into_state_dict(sd, [(load_adapter_file(path), 1.0)])
    assert "conv3" in str(info.value)
    assert_names(info.value, path)
    for k, v in before.items():
        assert torch.equal(sd[k], v), k


def test_nan_alpha_raises(tmp_path):
    tensors = lora_tensors()
    tensors["lycoris_lin.alpha"] = torch.tensor(float("nan"))
    path = write(tmp_path / "nan_alpha.safetensors", tensors)
    with pytest.raises(AdapterFormatError) as info:
        merge_into_state_dict(base_state_dict(), [(load_adapter_file(path), 1.0)])
    assert "lin" in str(info.value)
    assert_names(info.value, path)


def test_error_line_format():
    error = AdapterFormatError("expected\n  something", path="/x/y.safetensors", key="k.alpha")
    assert str(error) == "/x/y.safetensors: k.alpha: expected something"
    assert isinstance(error, ValueError)


def test_metadata_garbage_is_tolerated(tmp_path):
    """Malformed ss_network_args is ignored (decode falls back to the tensors), not an error."""
    path = write(tmp_path / "meta.safetensors", lora_tensors(),
                 {"ss_network_args": "{not json", "ss_network_dim": "banana",
                  "lora_adapter_metadata": json.dumps([1, 2])})
    adapter_file = load_adapter_file(path)
    assert adapter_file.adapters["lycoris_lin"].rank == RANK
