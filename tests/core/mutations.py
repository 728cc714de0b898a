"""Mutation engine for fuzzing the adapter-file readers (shared by the hypothesis test and
`bench/fuzz_adapter_files.py`).

Randomness comes from a *source* with three methods, `integer(lo, hi)`, `choice(seq)` and
`blob(n)`: `RandomSource` wraps `random.Random` (plain, reproducible by seed); the hypothesis
test wraps `data.draw` so that hypothesis can shrink failing cases. Only the standard library is
used here, so the bench script runs without hypothesis.

`mutate(source, seed_bytes)` returns `(mutated_bytes, description)`; `check_loaded(...)` holds
the property the readers must satisfy.
"""

from __future__ import annotations

import json
import random
import struct

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
BAD_DTYPES = ["F128", "f16", "", "C64", "F8_E4M3FNUZ", 5, None, ["F16"], "F16 ", "BF16\u0000"]
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 9, 16, 24, 255, 256, 65535, 2**31 - 1, 2**31, 2**32,
                    2**53, 10**12, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -2, -(2**63)]
WEIRD_VALUES = [None, True, False, 1.5, -0.0, "4", "", [], {}, [[1]], {"a": 1}, 1e308]


class RandomSource:
    """Plain `random.Random` randomness."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def blob(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# parsing helpers (deliberately independent of lycoris_core)
# ---------------------------------------------------------------------------------------------

def split(data: bytes):
    """(header dict or None, declared header length, data section bytes) of a safetensors blob."""
    if len(data) < 8:
        return None, None, b""
    n = struct.unpack("<Q", data[:8])[0]
    if n > len(data) - 8:
        return None, n, b""
    try:
        header = json.loads(data[8: 8 + n].decode("utf-8"))
    except Exception:
        return None, n, data[8 + n:]
    return (header if isinstance(header, dict) else None), n, data[8 + n:]


def build(header_text: str, body: bytes, declared_len: int | None = None, pad: bool = True) -> bytes:
    raw = header_text.encode("utf-8")
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", n & (2**64 - 1)) + raw + body


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ---------------------------------------------------------------------------------------------
# byte-level mutations
# ---------------------------------------------------------------------------------------------

def _position(source, data: bytes) -> int:
    """A byte position, biased towards the header (where the interesting parsing happens)."""
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    header_end = min(len(data), 8 + n) if n <= len(data) else len(data)
    if source.integer(0, 2) and header_end > 0:
        return source.integer(0, max(0, header_end - 1))
    return source.integer(0, max(0, len(data) - 1))


def bit_flips(source, data: bytes):
    if not data:
        return data, "bit_flips(empty)"
    out = bytearray(data)
    count = source.integer(1, 8)
    spots = []
    for _ in range(count):
        pos = _position(source, data)
        bit = source.integer(0, 7)
        out[pos] ^= 1 << bit
        spots.append(f"{pos}.{bit}")
    return bytes(out), f"bit_flips({','.join(spots)})"


def byte_overwrite(source, data: bytes):
    if not data:
        return data, "byte_overwrite(empty)"
    out = bytearray(data)
    pos = _position(source, data)
    length = source.integer(1, 16)
    kind = source.integer(0, 2)
    if kind == 0:
        chunk = source.blob(length)
    elif kind == 1:
        chunk = bytes([source.choice(b'\x00\xff{}[]",:0123456789-.e ')]) * length
    else:
        chunk = source.choice([b"null", b"true", b"1e999", b"-1", b"99999999999999999999", b"\xc3\x28",
                               b"\\u0000", b'"__metadata__"', b"NaN", b"[[[[[[[[", b"}}}}", b'""'])
    out[pos: pos + len(chunk)] = chunk
    return bytes(out[: max(len(data), pos + len(chunk))]), f"byte_overwrite({pos},{chunk[:16]!r})"


def truncate(source, data: bytes):
    cut = source.integer(0, max(0, len(data) - 1))
    return data[:cut], f"truncate({cut})"


def header_length(source, data: bytes):
    body = data[8:] if len(data) >= 8 else b""
    real = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    value = source.choice([0, 1, 2, 7, 8, real - 1, real + 1, real - 8, real + 8, len(body), len(body) + 1,
                           100 * 1024 * 1024, 100 * 1024 * 1024 + 1, 2**32, 2**63, 2**64 - 1,
                           source.integer(0, 2**64 - 1), source.integer(0, len(body) + 16)])
    return struct.pack("<Q", value % 2**64) + body, f"header_length({value % 2**64})"


def append_garbage(source, data: bytes):
    kind = source.integer(0, 2)
    if kind == 0:
        extra = source.blob(source.integer(1, 64))
    elif kind == 1:
        extra = b"\x00" * source.integer(1, 4096)
    else:
        extra = data[: source.integer(1, max(1, min(len(data), 256)))]
    return data + extra, f"append_garbage({len(extra)})"


def insert_bytes(source, data: bytes):
    pos = source.integer(0, len(data))
    extra = source.blob(source.integer(1, 16))
    return data[:pos] + extra + data[pos:], f"insert_bytes({pos},{len(extra)})"


def pickle_prefix(source, data: bytes):
    """Make the file start like a zip or a pickle (the loader must refuse, not execute)."""
    prefix = source.choice([b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x80\x05"])
    return prefix + data[len(prefix):], f"pickle_prefix({prefix!r})"


# ---------------------------------------------------------------------------------------------
# structured JSON header edits
# ---------------------------------------------------------------------------------------------

def _edit_value(source):
    return source.choice(INTERESTING_INTS + WEIRD_VALUES)


def json_edit(source, data: bytes):
    header, n, body = split(data)
    if header is None:
        return bit_flips(source, data)
    header = json.loads(json.dumps(header))  # private copy
    names = tensor_names(header)
    op = source.choice([
        "shape_dim", "shape_add", "shape_drop", "shape_replace", "shape_reshape", "offset", "offset_other",
        "offsets_swap", "offsets_len", "dtype_known", "dtype_bad", "drop_field", "entry_weird", "extra_field",
        "new_entry", "duplicate_key", "metadata_value", "metadata_weird", "metadata_drop", "top_level",
        "rename", "deep_nesting", "big_rank",
    ])
    name = source.choice(names) if names else None
    entry = header.get(name) if name is not None else None
    described = f"json_edit({op}"
    if entry is None or not isinstance(entry, dict):
        op = source.choice(["new_entry", "metadata_value", "top_level", "duplicate_key"])
        described = f"json_edit({op}"
    text = None
    if op == "shape_dim":
        shape = entry.get("shape")
        if isinstance(shape, list) and shape:
            i = source.integer(0, len(shape) - 1)
            shape[i] = _edit_value(source)
            described += f",{name},dim{i}={shape[i]!r}"
    elif op == "shape_add":
        shape = entry.get("shape")
        if isinstance(shape, list):
            shape.insert(source.integer(0, len(shape)), source.choice([1, 1, 0, 2, 10**12]))
            described += f",{name},{shape}"
    elif op == "shape_drop":
        shape = entry.get("shape")
        if isinstance(shape, list) and shape:
            shape.pop(source.integer(0, len(shape) - 1))
            described += f",{name},{shape}"
    elif op == "shape_replace":
        entry["shape"] = source.choice([[10**12], [2**32, 2**32], [10**6] * 8, [-4], [], [0], "4", None,
                                        [1.0], [True], [4, 4], [2**64]])
        described += f",{name},{entry['shape']!r}"
    elif op == "shape_reshape":
        shape = entry.get("shape")
        count = 1
        for s in shape if isinstance(shape, list) else []:
            count *= s if isinstance(s, int) else 1
        entry["shape"] = source.choice([[count], [1, count], [count, 1], [count, 1, 1, 1]])
        described += f",{name},{entry['shape']!r}"
    elif op == "offset":
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2:
            i = source.integer(0, 1)
            base = offsets[i] if isinstance(offsets[i], int) else 0
            offsets[i] = source.choice([base + 1, base - 1, base + 2, base - 2, 0, len(body), len(body) + 1,
                                        _edit_value(source), source.integer(0, len(body) + 8)])
            described += f",{name},{offsets!r}"
    elif op == "offset_other":
        other = header.get(source.choice(names))
        if isinstance(other, dict):
            entry["data_offsets"] = other.get("data_offsets")
            described += f",{name},{entry['data_offsets']!r}"
    elif op == "offsets_swap":
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list):
            offsets.reverse()
            described += f",{name},{offsets!r}"
    elif op == "offsets_len":
        entry["data_offsets"] = source.choice([[0], [0, 0, 0], [], "0,2", None, {"0": 2}, [0.0, 2.0]])
        described += f",{name},{entry['data_offsets']!r}"
    elif op == "dtype_known":
        entry["dtype"] = source.choice(list(ITEMSIZE))
        described += f",{name},{entry['dtype']}"
    elif op == "dtype_bad":
        entry["dtype"] = source.choice(BAD_DTYPES)
        described += f",{name},{entry['dtype']!r}"
    elif op == "drop_field":
        field = source.choice(["dtype", "shape", "data_offsets"])
        entry.pop(field, None)
        described += f",{name},-{field}"
    elif op == "entry_weird":
        header[name] = _edit_value(source)
        described += f",{name}={header[name]!r}"
    elif op == "extra_field":
        entry[source.choice(["extra", "dtype2", ""])] = _edit_value(source)
        described += f",{name}"
    elif op == "new_entry":
        start = source.integer(0, len(body))
        dtype = source.choice(list(ITEMSIZE))
        count = source.integer(0, 8)
        end = start + count * ITEMSIZE[dtype]
        header[source.choice(["extra.weight", "lycoris_new.alpha", name or "x", ""])] = {
            "dtype": dtype, "shape": [count], "data_offsets": [start, end]}
        described += f",{dtype},[{start},{end}]"
    elif op == "duplicate_key":
        inner = json.dumps(header)
        key = source.choice(list(header) or ["x"])
        value = json.dumps(header.get(key, {}))
        text = "{" + json.dumps(key) + ":" + value + ("," + inner[1:] if len(inner) > 2 else "}")
        described += f",{key}"
    elif op == "metadata_value":
        meta = header.setdefault("__metadata__", {})
        if isinstance(meta, dict):
            meta[source.choice(["ss_network_dim", "ss_network_module", "new"])] = _edit_value(source)
        described += ""
    elif op == "metadata_weird":
        header["__metadata__"] = source.choice([None, [], "x", 5, {"a": {"b": "c"}}, {"a": ["b"]}])
        described += f",{header['__metadata__']!r}"
    elif op == "metadata_drop":
        header.pop("__metadata__", None)
    elif op == "top_level":
        text = json.dumps(source.choice([[header], "header", 5, None, [], [1, 2]]))
    elif op == "rename":
        new = source.choice(["__metadata__", "", "\u0000", "a" * 300, name + ".x", "lycoris_fc.alpha"])
        header[new] = header.pop(name)
        described += f",{name}->{new[:20]!r}"
    elif op == "deep_nesting":
        depth = source.choice([50, 500, 5000, 100000])
        entry["shape"] = json.loads("[" * 10 + "]" * 10)  # small; the deep text is spliced below
        text = json.dumps(header).replace("[[[[[[[[[[]]]]]]]]]]", "[" * depth + "]" * depth, 1)
        described += f",{depth}"
    elif op == "big_rank":
        entry["shape"] = [1] * source.choice([8, 9, 64, 10000])
        described += f",{name},rank{len(entry['shape'])}"
    if text is None:
        text = json.dumps(header, ensure_ascii=source.choice([True, False]))
    fix_length = source.integer(0, 5) != 0  # mostly keep the length field consistent
    mutated = build(text, body, None if fix_length else n, pad=bool(source.integer(0, 1)))
    return mutated, described + (")" if fix_length else ",stale_length)")


MUTATORS = [bit_flips, byte_overwrite, truncate, header_length, append_garbage, insert_bytes,
            pickle_prefix, json_edit, json_edit, json_edit]  # header edits weighted x3


def mutate(source, seed: bytes, max_steps: int = 3):
    """Apply 1..max_steps random mutations to `seed`; returns (bytes, description)."""
    data = seed
    steps = []
    for _ in range(source.integer(1, max_steps)):
        mutator = source.choice(MUTATORS)
        data, described = mutator(source, data)
        steps.append(described)
    return data, " + ".join(steps)


# ---------------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------------

def expected_entries(data: bytes) -> dict | None:
    """{name: (dtype code, shape)} from the header as a plain JSON parser sees it, or None."""
    header, _, _ = split(data)
    if header is None:
        return None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return None
        out[name] = (info.get("dtype"), info.get("shape"))
    return out


def check_loaded(data: bytes, tensors: dict, metadata: dict) -> str | None:
    """Why an accepted file contradicts its header (None when it agrees)."""
    expected = expected_entries(data)
    if expected is None:
        return "accepted a file whose header a plain JSON parser cannot read as an object of entries"
    if set(tensors) != set(expected):
        return f"tensor names {sorted(tensors)[:5]} differ from the header's {sorted(expected)[:5]}"
    for name, tensor in tensors.items():
        dtype, shape = expected[name]
        if list(tensor.shape) != shape:
            return f"{name}: shape {list(tensor.shape)} but the header says {shape}"
        if dtype not in ITEMSIZE or tensor.element_size() != ITEMSIZE[dtype]:
            return f"{name}: element size {tensor.element_size()} but the header says {dtype}"
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        return "metadata is not a dict of str -> str"
    return None


def classify(call, error_type, path: str, verify=None):
    """Run `call()`: ("ok" | "format_error" | "crash", detail).

    A format error must be `error_type` with a one-line message naming the file; any other
    exception, or an accepted result that `verify(result)` objects to, is a crash.
    """
    import os

    try:
        result = call()
    except error_type as error:
        message = str(error)
        if "\n" in message or os.path.basename(path) not in message:
            return "crash", f"format error message does not name the file on one line: {message!r}"
        return "format_error", message
    except Exception as error:  # noqa: BLE001 - that is the point
        return "crash", f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    problem = verify(result) if verify is not None else None
    return ("crash", problem) if problem else ("ok", "")


# ---------------------------------------------------------------------------------------------
# seed files: real adapters written by lycoris-lora, plus one file holding every dtype
# ---------------------------------------------------------------------------------------------

SEED_ALGOS = ("lora", "loha", "lokr")


def make_seed_files(folder) -> dict[str, bytes]:
    """Write the seed files into `folder`; returns {name: bytes}. Needs torch, safetensors and
    lycoris-lora (test dependencies)."""
    import logging
    import os

    import torch
    from safetensors.torch import save_file

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 24)
            self.conv = torch.nn.Conv2d(4, 8, 3)

    seeds = {}
    saved_targets = LycorisNetwork.TARGET_REPLACE_MODULE  # apply_preset changes class state: restore it
    try:
        for algo in SEED_ALGOS:
            torch.manual_seed(0)
            LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
            net = create_lycoris(Tiny(), 1.0, linear_dim=4, linear_alpha=2, algo=algo)
            net.apply_to()
            for param in net.parameters():  # lora_up starts at zero: make every byte meaningful
                with torch.no_grad():
                    param.add_(torch.randn_like(param) * 0.1)
            path = os.path.join(folder, f"seed_{algo}.safetensors")
            net.save_weights(path, torch.float16, {"ss_network_module": "lycoris.kohya"})
            with open(path, "rb") as handle:
                seeds[algo] = handle.read()
    finally:
        LycorisNetwork.TARGET_REPLACE_MODULE = saved_targets
    torch.manual_seed(1)
    every = {
        "f64": torch.randn(3, dtype=torch.float64), "f32": torch.randn(2, 3), "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 2).bfloat16(), "i64": torch.arange(3), "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(2, dtype=torch.int16), "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(6, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "f8e4m3": torch.randn(4).to(torch.float8_e4m3fn), "f8e5m2": torch.randn(4).to(torch.float8_e5m2),
        "scalar": torch.tensor(0.5), "empty": torch.zeros(0, 3),
    }
    path = os.path.join(folder, "seed_dtypes.safetensors")
    save_file(every, path, metadata={"format": "pt"})
    with open(path, "rb") as handle:
        seeds["dtypes"] = handle.read()
    return seeds
