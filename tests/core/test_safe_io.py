"""lycoris_core.safe_io: hostile-file reading, pickle refusal, atomic writing, output names."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file as official_load
from safetensors.torch import save_file as official_save

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lycoris_core.errors import AdapterFormatError  # noqa: E402
from lycoris_core.safe_io import (  # noqa: E402
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    SafetensorsReader,
    load_tensors,
    safe_output_path,
    save_tensors_atomic,
    write_tensors_streamed,
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (5,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), dtype=torch.int32, generator=g),
        "i16": torch.randint(-2**15, 2**15 - 1, (3,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),  # odd length: misaligns what follows
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "f8_e4m3": (torch.randn(6, generator=g) * 10).to(torch.float8_e4m3fn),
        "f8_e5m2": (torch.randn(2, 3, generator=g) * 10).to(torch.float8_e5m2),
        "scalar_f32": torch.tensor(1.25),
        "scalar_bf16": torch.tensor(-3.5, dtype=torch.bfloat16),
        "scalar_bool": torch.tensor(True),
        "empty_f16": torch.zeros(0, dtype=torch.float16),
        "empty_2d": torch.zeros(4, 0, 3),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 7, 2**31], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 2**62], dtype=torch.int64).to(torch.uint64),
    }
    tensors["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor (bit-identical comparison for every dtype, NaN payloads included)."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(got: dict, expected: dict):
    assert list(sorted(got)) == list(sorted(expected))
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype, name
        assert tuple(got[name].shape) == tuple(ref.shape), name
        assert raw_bytes(got[name]) == raw_bytes(ref), name


def write_raw(path, header, body: bytes = b"", *, declared_len=None, text=None) -> str:
    if isinstance(text, bytes):
        raw = text
    else:
        raw = (json.dumps(header) if text is None else text).encode("utf-8")
    n = len(raw) if declared_len is None else declared_len
    pathlib.Path(path).write_bytes(struct.pack("<Q", n) + raw + body)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---------------------------------------------------------------------------------------------
# round trips against the official library
# ---------------------------------------------------------------------------------------------

def test_reads_official_files_bit_identically(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "official.safetensors"
    official_save(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ü": "✓"})
    got, metadata = load_tensors(path)
    assert_identical(got, official_load(str(path)))
    assert_identical(got, tensors)
    assert metadata == {"ss_network_module": "lycoris.kohya", "ü": "✓"}


def test_save_tensors_atomic_is_read_by_official_library(tmp_path):
    tensors = every_dtype()
    tensors["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    path = tmp_path / "ours.safetensors"
    save_tensors_atomic(path, tensors, {"a": "b", "json": json.dumps({"x": [1, 2]})})
    assert_identical(official_load(str(path)), tensors)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"a": "b", "json": json.dumps({"x": [1, 2]})}
    got, metadata = load_tensors(path)
    assert_identical(got, tensors)
    assert metadata["a"] == "b"
    assert os.listdir(tmp_path) == ["ours.safetensors"]
    data = path.read_bytes()
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0  # data section 8-byte aligned


def test_write_tensors_streamed_round_trip_in_spec_order(tmp_path):
    tensors = every_dtype()
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    calls = []

    def produce(name):
        calls.append(name)
        return tensors[name].clone()

    path = tmp_path / "streamed.safetensors"
    write_tensors_streamed(path, specs, produce, metadata={"k": "v"})
    assert calls == list(tensors)
    assert_identical(official_load(str(path)), tensors)
    with SafetensorsReader(path) as reader:
        assert reader.keys() == list(tensors)  # file order
        assert reader.metadata == {"k": "v"}
        assert reader.gaps == []


def test_empty_file_and_no_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_tensors_atomic(path, {})
    assert official_load(str(path)) == {}
    assert load_tensors(path) == ({}, {})


def test_reader_api(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "x.safetensors"
    official_save(tensors, str(path), metadata={"m": "1"})
    with SafetensorsReader(path) as reader:
        assert reader.path == str(path)
        assert reader.metadata == {"m": "1"}
        assert sorted(reader.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert reader.dtype(name) == t.dtype
            assert reader.shape(name) == tuple(t.shape)
            assert reader.nbytes(name) == t.numel() * t.element_size()
        kept = reader.tensor("f32")
        with pytest.raises(KeyError):
            reader.tensor("nope")
    # the tensor owns its memory: usable after close, writable, and writing does not touch the file
    assert torch.equal(kept, tensors["f32"])
    kept.add_(1)
    assert torch.equal(official_load(str(path))["f32"], tensors["f32"])


def test_load_tensors_selected_keys(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "x.safetensors"
    official_save(tensors, str(path))
    got, _ = load_tensors(path, keys=["bf16", "bool"])
    assert_identical(got, {"bf16": tensors["bf16"], "bool": tensors["bool"]})
    with pytest.raises(AdapterFormatError, match="missing_key"):
        load_tensors(path, keys=["bf16", "missing_key"])


def test_gaps_and_trailing_bytes_are_tolerated_and_noted(tmp_path):
    body = struct.pack("<2f", 1.0, 2.0) + b"\xee" * 4 + struct.pack("<f", 3.0) + b"junk"
    header = {"a": entry(offsets=(0, 8)), "b": entry(shape=(1,), offsets=(12, 16))}
    path = write_raw(tmp_path / "gappy.safetensors", header, body)
    with SafetensorsReader(path) as reader:
        assert reader.gaps == [(8, 12), (16, 20)]
        assert reader.tensor("b").tolist() == [3.0]


def test_empty_tensors_may_share_offsets(tmp_path):
    header = {"e1": entry(shape=(0,), offsets=(4, 4)), "a": entry(offsets=(0, 8)), "e2": entry(shape=(0, 5), offsets=(8, 8))}
    path = write_raw(tmp_path / "e.safetensors", header, struct.pack("<2f", 1.0, 2.0))
    got, _ = load_tensors(path)
    assert got["a"].tolist() == [1.0, 2.0] and got["e1"].shape == (0,) and got["e2"].shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# malformed headers: AdapterFormatError naming the file and key, instantly
# ---------------------------------------------------------------------------------------------

F32x2 = struct.pack("<2f", 1.0, 2.0)

MALFORMED = {
    # name: (header or None, body, extra write_raw kwargs, expected key or None, expected text)
    "not_utf8": (None, F32x2, {"text": b'{"a\xff\xfe": 1}'}, None, "UTF-8"),
    "not_json": (None, F32x2, {"text": "{'a': 1}"}, None, "not valid JSON"),
    "json_array": ([1, 2], F32x2, {}, None, "expected an object"),
    "json_string": ("hello", F32x2, {}, None, "expected an object"),
    "length_past_file": ({"a": entry()}, F32x2, {"declared_len": 10_000}, None, "truncated"),
    "length_over_cap": ({"a": entry()}, F32x2, {"declared_len": MAX_HEADER_BYTES + 1}, None, "limit"),
    "length_huge": ({"a": entry()}, F32x2, {"declared_len": 2**64 - 1}, None, "limit"),
    "length_zero": ({"a": entry()}, F32x2, {"declared_len": 0}, None, "too short"),
    "entry_not_object": ({"lora_unet_a.alpha": [1, 2]}, F32x2, {}, "lora_unet_a.alpha", "expected an object"),
    "missing_dtype": ({"k.weight": {"shape": [2], "data_offsets": [0, 8]}}, F32x2, {}, "k.weight", "'dtype' is missing"),
    "missing_shape": ({"k.weight": {"dtype": "F32", "data_offsets": [0, 8]}}, F32x2, {}, "k.weight", "'shape' is missing"),
    "missing_offsets": ({"k.weight": {"dtype": "F32", "shape": [2]}}, F32x2, {}, "k.weight", "'data_offsets' is missing"),
    "unknown_dtype": ({"k.weight": entry(dtype="F128")}, F32x2, {}, "k.weight", "F128"),
    "dtype_not_string": ({"k.weight": entry(dtype=4)}, F32x2, {}, "k.weight", "unknown dtype 4"),
    "shape_not_list": ({"k.weight": {**entry(), "shape": 2}}, F32x2, {}, "k.weight", "shape"),
    "shape_negative": ({"k.weight": entry(shape=(-2,))}, F32x2, {}, "k.weight", "non-negative"),
    "shape_float": ({"k.weight": entry(shape=(2.0,))}, F32x2, {}, "k.weight", "non-negative integers"),
    "shape_bool": ({"k.weight": entry(shape=(True, 2))}, F32x2, {}, "k.weight", "non-negative integers"),
    "shape_rank_9": ({"k.weight": entry(shape=(1,) * 8 + (2,))}, F32x2, {}, "k.weight", "9 dimensions"),
    "shape_huge": ({"lora_unet_a.lora_up.weight": entry(shape=(10**12,))}, F32x2, {},
                   "lora_unet_a.lora_up.weight", "needs 4000000000000"),
    "shape_huge_product": ({"k.weight": entry(shape=(2**40, 2**40, 2**40))}, F32x2, {}, "k.weight", "needs"),
    "offsets_not_pair": ({"k.weight": entry(offsets=(0, 4, 8))}, F32x2, {}, "k.weight", "two integers"),
    "offsets_not_int": ({"k.weight": {**entry(), "data_offsets": [0, "8"]}}, F32x2, {}, "k.weight", "two integers"),
    "offsets_negative": ({"k.weight": entry(offsets=(-8, 0))}, F32x2, {}, "k.weight", "0 <= start <= end"),
    "offsets_reversed": ({"k.weight": entry(offsets=(8, 0))}, F32x2, {}, "k.weight", "0 <= start <= end"),
    "offsets_past_end": ({"lora_unet_a.lora_up.weight": entry(shape=(1024,), offsets=(0, 4096))}, F32x2 * 256, {},
                         "lora_unet_a.lora_up.weight", "end past the data section (2048 bytes)"),
    "size_mismatch": ({"k.weight": entry(shape=(3,), offsets=(0, 8))}, F32x2, {}, "k.weight", "needs 12"),
    "overlap": ({"a": entry(offsets=(0, 8)), "b": entry(shape=(1,), offsets=(4, 8))}, F32x2, {}, "b", "overlap"),
    "same_range": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}, F32x2, {}, "b", "overlap"),
    "metadata_not_object": ({"__metadata__": ["x"], "a": entry()}, F32x2, {}, "__metadata__", "object"),
    "metadata_int_value": ({"__metadata__": {"ss_network_dim": 4}, "a": entry()}, F32x2, {}, "__metadata__",
                           "ss_network_dim"),
    "metadata_null_value": ({"__metadata__": {"x": None}, "a": entry()}, F32x2, {}, "__metadata__", "expected a string"),
    "duplicate_key": (None, F32x2, {"text": json.dumps({"a": entry()})[:-1] + ', "a": ' + json.dumps(entry()) + "}"},
                      "a", "twice"),
    "duplicate_metadata": (None, F32x2, {"text": '{"__metadata__": {}, "__metadata__": {}}'}, "__metadata__", "twice"),
    "nested_deep": (None, F32x2, {"text": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"}, None, "nested"),
    "int_digits": (None, F32x2, {"text": '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}'},
                   None, "JSON"),
    "nan_shape": (None, F32x2, {"text": '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}'}, None, "JSON"),
    "token_bomb": (None, b"", {"text": "[" + "0," * 4_100_000 + "0]"}, None, "separators"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_a_format_error(tmp_path, case):
    header, body, kwargs, key, text = MALFORMED[case]
    path = write_raw(tmp_path / f"bad_{case}.safetensors", header, body, **kwargs)
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError) as info:
        load_tensors(path)
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path + ": "), message
    assert info.value.path == path
    if key is not None:
        assert info.value.key == key, message
        assert f": {key}: " in message
    assert text in message, message
    assert elapsed < 2.0, f"{case} took {elapsed:.2f} s"
    with pytest.raises(AdapterFormatError):  # the reader itself refuses too
        SafetensorsReader(path)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_8_bytes(tmp_path, size):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(AdapterFormatError, match=r"tiny\.safetensors: .*too short"):
        load_tensors(path)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(AdapterFormatError, match="cannot open"):
        load_tensors(tmp_path / "nope.safetensors")


def test_not_a_regular_file(tmp_path):
    with pytest.raises(AdapterFormatError, match="cannot open|not a regular file"):
        load_tensors(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.safetensors"
        os.mkfifo(fifo)  # opening it for reading would block forever
        with pytest.raises(AdapterFormatError, match="not a regular file"):
            load_tensors(fifo)


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_content_decides_not_the_name(tmp_path, suffix):
    """A real safetensors file named like a pickle is read (safely) as safetensors; garbage with a
    pickle name says it is neither."""
    path = tmp_path / f"renamed{suffix}"
    official_save({"w": torch.ones(3)}, str(path))
    assert load_tensors(path)[0]["w"].tolist() == [1.0, 1.0, 1.0]
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"hello world, not a model")
    for allow in (False, True):
        with pytest.raises(AdapterFormatError, match="neither a safetensors file"):
            load_tensors(garbage, allow_pickle_weights_only=allow)


def test_huge_claimed_shape_does_not_allocate(tmp_path):
    import tracemalloc

    header = {"big": entry(dtype="F64", shape=(10**6, 10**6, 10**6), offsets=(0, 8 * 10**18))}
    path = write_raw(tmp_path / "big.safetensors", header, F32x2)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFormatError, match="big"):
            load_tensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bool_bytes_other_than_0_1(tmp_path):
    path = write_raw(tmp_path / "b.safetensors", {"flags": entry(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x01\x07")
    with pytest.raises(AdapterFormatError, match="flags"):
        load_tensors(path)


# ---------------------------------------------------------------------------------------------
# pickle files are refused; weights-only loading never runs a payload
# ---------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker` (what a malicious checkpoint would do with os.system)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _malicious(path: pathlib.Path, marker: pathlib.Path, *, zipped: bool = True) -> pathlib.Path:
    state = {"lora_unet_a.lora_up.weight": torch.ones(2, 2), "evil": _Payload(str(marker))}
    torch.save(state, str(path), _use_new_zipfile_serialization=zipped)
    return path


def test_payload_is_real(tmp_path):
    """The malicious files below do run code when loaded unsafely (so the refusals mean something)."""
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "evil.pt", marker)
    torch.load(str(path), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", list(PICKLE_SUFFIXES) + [".safetensors", ""])
@pytest.mark.parametrize("allow", [False, True])
def test_malicious_pickle_never_runs(tmp_path, suffix, allow):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(AdapterFormatError) as info:
        load_tensors(path, allow_pickle_weights_only=allow)
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(str(path))
    assert "pickle" in message and ".safetensors" in message, message
    if allow:
        assert "weights-only" in message


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_and_raw_pickles_never_run(tmp_path, allow):
    marker = tmp_path / "pwned"
    legacy = _malicious(tmp_path / "legacy.ckpt", marker, zipped=False)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=4))
    sneaky = tmp_path / "raw_named.safetensors"
    sneaky.write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=2))
    for path in (legacy, raw, sneaky):
        with pytest.raises(AdapterFormatError, match="pickle|torch.save"):
            load_tensors(path, allow_pickle_weights_only=allow)
    assert not marker.exists()


def test_plain_state_dict_pickle_loads_only_when_allowed(tmp_path):
    tensors = {"lora_unet_a.lora_up.weight": torch.randn(4, 2), "lora_unet_a.alpha": torch.tensor(2.0),
               "bf16": torch.randn(3).bfloat16()}
    path = tmp_path / "plain.pt"
    torch.save(tensors, str(path))
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_tensors(path)
    got, metadata = load_tensors(path, allow_pickle_weights_only=True)
    assert_identical(got, tensors) and metadata == {}
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": tensors, "epoch": 3}, str(nested))
    got, _ = load_tensors(nested, allow_pickle_weights_only=True)
    assert_identical(got, tensors)
    got, _ = load_tensors(nested, keys=["lora_unet_a.alpha"], allow_pickle_weights_only=True)
    assert list(got) == ["lora_unet_a.alpha"]
    mislabelled = tmp_path / "actually_a_pickle.safetensors"  # torch.load would hand this name to safetensors
    torch.save(tensors, str(mislabelled))
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_tensors(mislabelled)
    got, _ = load_tensors(mislabelled, allow_pickle_weights_only=True)
    assert_identical(got, tensors)


@pytest.mark.parametrize("content", [
    [torch.ones(2)], {"a": {"b": torch.ones(2)}}, {"a": 3}, {1: torch.ones(2)}, torch.ones(3),
    {"a": torch.ones(2, dtype=torch.complex64)},
])
def test_pickle_that_is_not_a_flat_tensor_dict(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, str(path))
    with pytest.raises(AdapterFormatError, match=r"odd\.pth"):
        load_tensors(path, allow_pickle_weights_only=True)


# ---------------------------------------------------------------------------------------------
# atomic writing
# ---------------------------------------------------------------------------------------------

def _specs(n=6, size=1000):
    return [(f"t{i}", torch.float32, (size,)) for i in range(n)]


def test_exception_mid_stream_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    save_tensors_atomic(target, {"old": torch.arange(10.0)}, {"v": "1"})
    before = target.read_bytes()

    def produce(name):
        if name == "t3":
            raise RuntimeError("boom")
        return torch.zeros(1000)

    with pytest.raises(RuntimeError, match="boom"):
        write_tensors_streamed(target, _specs(), produce)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("bad", ["dtype", "shape", "type"])
def test_produced_tensor_must_match_its_spec(tmp_path, bad):
    target = tmp_path / "model.safetensors"
    save_tensors_atomic(target, {"old": torch.arange(10.0)})
    before = target.read_bytes()

    def produce(name):
        if name == "t2":
            return {"dtype": torch.zeros(1000, dtype=torch.float16), "shape": torch.zeros(10, 100),
                    "type": [0.0] * 1000}[bad]
        return torch.zeros(1000)

    with pytest.raises(AdapterFormatError) as info:
        write_tensors_streamed(target, _specs(), produce)
    assert info.value.key == "t2"
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_writer_refuses_bad_input(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(AdapterFormatError, match="__metadata__"):
        save_tensors_atomic(target, {"a": torch.ones(1)}, {"rank": 4})
    with pytest.raises(AdapterFormatError, match="complex"):
        save_tensors_atomic(target, {"a": torch.ones(1, dtype=torch.complex64)})
    with pytest.raises(AdapterFormatError, match="twice"):
        write_tensors_streamed(target, [("a", torch.float32, (1,))] * 2, lambda n: torch.ones(1))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and open-file replacement")
def test_permissions_follow_umask_and_reader_of_old_file_survives(tmp_path):
    target = tmp_path / "m.safetensors"
    save_tensors_atomic(target, {"w": torch.arange(4.0)})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # streaming a file onto itself (merge with out == base): the reader keeps the old inode
    with SafetensorsReader(target) as reader:
        write_tensors_streamed(target, [("w", torch.float32, (4,))], lambda name: reader.tensor(name) * 2)
    assert load_tensors(target)[0]["w"].tolist() == [0.0, 2.0, 4.0, 6.0]


_KILL_CHILD = textwrap.dedent("""
    import sys, time, torch
    from lycoris_core.safe_io import write_tensors_streamed
    target, count = sys.argv[1], int(sys.argv[2])
    specs = [(f"t{i}", torch.float32, (65536,)) for i in range(count)]
    def produce(name):
        time.sleep(0.02)
        return torch.full((65536,), float(int(name[1:])))
    print("start", flush=True)
    write_tensors_streamed(target, specs, produce, {"complete": "no"})
    print("done", flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("previous", [True, False])
def test_sigkill_mid_write_never_leaves_a_partial_target(tmp_path, previous):
    target = tmp_path / "big.safetensors"
    if previous:
        save_tensors_atomic(target, {"old": torch.arange(100.0)}, {"complete": "yes"})
    before = target.read_bytes() if previous else None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(target), "400"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        grown = None
        while time.monotonic() < deadline and child.poll() is None:
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".big.safetensors.") and p.name.endswith(".tmp")]
            if temps and temps[0].stat().st_size > 2 * 4 * 65536:  # header plus a few tensors written
                grown = temps[0]
                break
            time.sleep(0.01)
        assert grown is not None, f"the child never grew its temp file: {child.communicate(timeout=5)}"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    if previous:
        assert target.read_bytes() == before
        tensors, metadata = load_tensors(target)
        assert metadata == {"complete": "yes"} and tensors["old"].shape == (100,)
    else:
        assert not target.exists()
    # the killed writer's temp file stays behind (nothing can remove it), hidden and never a target
    assert grown.exists() and grown.name.startswith(".")


# ---------------------------------------------------------------------------------------------
# output names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("my_lora", "my_lora.safetensors"),
    ("my_lora.safetensors", "my_lora.safetensors"),
    ("my_lora.SAFETENSORS", "my_lora.safetensors"),
    ("model.ckpt", "model.ckpt.safetensors"),
    ("../x", "x.safetensors"),
    ("../../../../etc/passwd", "etc_passwd.safetensors"),
    ("/etc/passwd", "etc_passwd.safetensors"),
    ("a/../../b", "a_b.safetensors"),
    ("sub/name", "sub_name.safetensors"),
    ("..\\..\\windows\\system32\\x", "windows_system32_x.safetensors"),
    ("C:\\Users\\x\\evil", "Users_x_evil.safetensors"),
    ("C:evil", "evil.safetensors"),
    ("\\\\server\\share\\f", "server_share_f.safetensors"),
    ("CON", "_CON.safetensors"),
    ("nul.txt", "_nul.txt.safetensors"),
    ("com1", "_com1.safetensors"),
    ("LPT9 ", "_LPT9.safetensors"),
    ("a<b>c:d\"e|f?g*h", "a_b_c_d_e_f_g_h.safetensors"),
    ("bad\x00name\x1f\x7f", "badname.safetensors"),
    ("rtl\u202egnp.exe", "rtlgnp.exe.safetensors"),
    ("trailing. . ", "trailing.safetensors"),
    ("...hidden", "hidden.safetensors"),
    ("  spaced  ", "spaced.safetensors"),
    ("lora_ünïcødé", "lora_ünïcødé.safetensors"),
])
def test_safe_output_path_names(tmp_path, name, expected):
    result = safe_output_path(tmp_path, name)
    assert result.name == expected
    assert result.parent == tmp_path.resolve()


@pytest.mark.parametrize("name", ["", "..", "/", "\\..\\", " . ", "\x00\x01", "C:", "...."])
def test_safe_output_path_nothing_usable(tmp_path, name):
    with pytest.raises(AdapterFormatError):
        safe_output_path(tmp_path, name)


def test_safe_output_path_long_names(tmp_path):
    for name in ["x" * 10_000, "é" * 5000, "a/" * 3000 + "b"]:
        result = safe_output_path(tmp_path, name)
        assert len(result.name.encode("utf-8")) <= 200
        assert result.name.endswith(".safetensors") and result.parent == tmp_path.resolve()
        result.write_bytes(b"")  # a real, creatable name
        temp = result.with_name(f".{result.name}.0123456789ab.tmp")
        temp.write_bytes(b"")  # and so is the writer's temp name


def test_safe_output_path_suffix_and_symlink(tmp_path):
    assert safe_output_path(tmp_path, "x", suffix=".json").name == "x.json"
    assert safe_output_path(tmp_path, "x.json", suffix=".json").name == "x.json"
    if hasattr(os, "symlink"):
        outside = tmp_path.parent / f"{tmp_path.name}_outside.safetensors"
        try:
            (tmp_path / "link.safetensors").symlink_to(outside)
        except OSError:
            pytest.skip("cannot create symlinks here")
        with pytest.raises(AdapterFormatError, match="outside"):
            safe_output_path(tmp_path, "link")


def test_output_path_is_writable_atomically(tmp_path):
    path = safe_output_path(tmp_path, "../../out/merged model")
    save_tensors_atomic(path, {"w": torch.ones(2)})
    assert os.listdir(tmp_path) == ["out_merged model.safetensors"]
