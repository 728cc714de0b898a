"""Reading untrusted tensor files and writing tensor files atomically.

Every adapter or checkpoint handed to this pack may come from the internet, so every byte is
treated as hostile:

* `.safetensors` files are parsed by `SafetensorsReader`, which validates the whole header
  (sizes, dtypes, shapes, offsets, overlaps, metadata) against the real file size *before* any
  tensor data is read or any buffer is allocated; every problem is an `AdapterFormatError`
  naming the file, the key and what was expected.
* pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`, or anything that starts like one) can run code
  when unpickled: they are refused unless the caller opts in with
  `allow_pickle_weights_only=True`, and even then only `torch.load(weights_only=True)` touches
  them (explicitly passed, so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot override it).
* writers (`save_tensors_atomic`, `write_tensors_streamed`) write a hidden temporary file in the
  target's folder, fsync it and `os.replace` it onto the target, so a crash, a kill or an
  exception never leaves a partial file under the target's name.
* `safe_output_path` turns a user-typed output name into a file name inside a given folder.

Only the standard library, numpy and torch are used here.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import stat
import sys
import unicodedata
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import AdapterFormatError

__all__ = [
    "SAFETENSORS_SUFFIXES", "PICKLE_SUFFIXES", "MAX_HEADER_BYTES", "MAX_RANK",
    "SafetensorsReader", "load_tensors", "save_tensors_atomic", "write_tensors_streamed",
    "safe_output_path", "dtype_name",
]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the official safetensors library (100 MB)
MAX_RANK = 8
# A JSON header of 100 MiB made of `{}` or `[0,0,...]` would cost gigabytes of Python objects;
# real headers need ~8 of these tokens per tensor (a 100,000-tensor model: ~800,000).
MAX_HEADER_TOKENS = 4_000_000

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# unsigned wide integers: written by the official library too; torch has them since 2.3
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
_ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}

_BIG_ENDIAN = sys.byteorder == "big"
_PICKLE_HINT = (
    "pickle files can run arbitrary code when loaded, so this pack refuses them; convert the file "
    "to .safetensors with a tool you trust (or, if you trust this file, enable loading pickle "
    "files in weights-only mode)"
)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.float16` -> `"F16"`)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise AdapterFormatError(
            f"dtype {dtype} cannot be stored in a .safetensors file (supported: {', '.join(_DTYPES)})"
        ) from None


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Entry:
    __slots__ = ("name", "dtype_name", "shape", "start", "end")

    def __init__(self, name: str, dtype_name: str, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype_name, self.shape, self.start, self.end = name, dtype_name, shape, start, end


class SafetensorsReader:
    """Context manager over one .safetensors file; validates the whole header before any data is read.

    `keys()` lists tensors in file order (by data offset; header order breaks ties between empty
    tensors). Gaps between tensors or bytes after the last one are tolerated (the official
    library refuses them) and listed in `gaps` as `(start, end)` ranges of the data section.
    """

    def __init__(self, path):
        self.path = str(path)
        self.metadata: dict[str, str] = {}
        self.gaps: list[tuple[int, int]] = []
        self._entries: dict[str, _Entry] = {}
        self._order: list[str] = []
        self._file = _open_regular(self.path)
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    # -- header ---------------------------------------------------------------------------

    def _error(self, message: str, key: str | None = None) -> AdapterFormatError:
        return AdapterFormatError(message, path=self.path, key=key)

    def _parse(self) -> None:
        handle = self._file
        file_size = os.fstat(handle.fileno()).st_size
        self._file_size = file_size
        if file_size < 8:
            raise self._error(
                f"the file is {file_size} bytes long, too short for a safetensors file (8-byte header length "
                "expected); it is empty, truncated or not a safetensors file")
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise self._error(
                f"header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; "
                "not a safetensors file or corrupt")
        if header_len > file_size - 8:
            raise self._error(
                f"header length {header_len} bytes is more than the {file_size - 8} bytes after the length "
                "field; the file is truncated or not a safetensors file")
        if header_len < 2:
            raise self._error(f"header length {header_len} bytes is too short for a JSON object")
        raw = handle.read(header_len)
        if len(raw) != header_len:
            raise self._error(f"could read only {len(raw)} of the {header_len} header bytes; the file is truncated")
        self._data_start = 8 + header_len
        self._data_size = file_size - self._data_start
        tokens = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
        if tokens > MAX_HEADER_TOKENS:
            raise self._error(
                f"header has {tokens} JSON separators, more than the {MAX_HEADER_TOKENS} a real file needs; "
                "refusing to parse it")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self._error(f"header is not UTF-8 text (invalid byte at position {error.start}); "
                              "not a safetensors file or corrupt") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        except _DuplicateKey as duplicate:
            raise self._error("key appears twice in the header; the file is corrupt", key=duplicate.key) from None
        except RecursionError:
            raise self._error("header JSON is nested too deeply; not a safetensors file") from None
        except ValueError as error:  # JSONDecodeError, int digit limit, NaN/Infinity
            raise self._error(f"header is not valid JSON ({_one_line(error)}); "
                              "not a safetensors file or corrupt") from None
        if not isinstance(header, dict):
            raise self._error(f"header is a JSON {type(header).__name__}, expected an object")

        entries: list[_Entry] = []
        for name, info in header.items():
            if name == "__metadata__":
                self.metadata = self._parse_metadata(info)
                continue
            entries.append(self._parse_entry(name, info))

        # overlaps and gaps, in data order (stable sort keeps header order for equal offsets);
        # an empty tensor holds no bytes, so it overlaps nothing
        entries.sort(key=lambda e: (e.start, e.end))
        position, previous = 0, None
        for entry in entries:
            if entry.start == entry.end:
                continue
            if entry.start < position:
                raise self._error(
                    f"data_offsets [{entry.start}, {entry.end}] overlap the bytes of '{previous.name}' "
                    f"(which end at {position}); the file is corrupt", key=entry.name)
            if entry.start > position:
                self.gaps.append((position, entry.start))
            position, previous = entry.end, entry
        if position < self._data_size:
            self.gaps.append((position, self._data_size))
        self._entries = {entry.name: entry for entry in entries}
        self._order = [entry.name for entry in entries]

    def _parse_metadata(self, info) -> dict[str, str]:
        if not isinstance(info, dict):
            raise self._error(f"expected an object of text values, got a JSON {type(info).__name__}",
                              key="__metadata__")
        for name, value in info.items():
            if not isinstance(value, str):
                raise self._error(f"metadata value of '{name}' is {_short(value)}, expected a string "
                                  "(safetensors metadata is text only)", key="__metadata__")
        return dict(info)

    def _parse_entry(self, name: str, info) -> _Entry:
        if not isinstance(info, dict):
            raise self._error(f"expected an object with dtype, shape and data_offsets, got {_short(info)}", key=name)
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise self._error(f"'{field}' is missing (expected dtype, shape and data_offsets)", key=name)
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._error(f"unknown dtype {_short(dtype)} (supported: {', '.join(_DTYPES)})", key=name)
        shape = info["shape"]
        if not isinstance(shape, list):
            raise self._error(f"shape {_short(shape)} is not a list of sizes", key=name)
        if len(shape) > MAX_RANK:
            raise self._error(f"shape has {len(shape)} dimensions, at most {MAX_RANK} are supported", key=name)
        if not all(_is_int(size) and size >= 0 for size in shape):
            raise self._error(f"shape {_short(shape)} must hold non-negative integers", key=name)
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
            raise self._error(f"data_offsets {_short(offsets)} must be two integers [start, end]", key=name)
        start, end = offsets
        if start < 0 or end < start:
            raise self._error(f"data_offsets [{start}, {end}] must satisfy 0 <= start <= end", key=name)
        if end > self._data_size:
            raise self._error(
                f"data_offsets [{start}, {end}] end past the data section ({self._data_size} bytes); "
                "the file is truncated or corrupt", key=name)
        count = 1
        for size in shape:  # Python ints: no overflow; end <= file size bounds the comparison below
            count *= size
        expected = count * _ITEMSIZE[dtype]
        if end - start != expected:
            raise self._error(
                f"data_offsets [{start}, {end}] hold {end - start} bytes but {dtype} shape {shape} needs "
                f"{expected}; the file is corrupt", key=name)
        return _Entry(name, dtype, tuple(shape), start, end)

    # -- queries --------------------------------------------------------------------------

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(key) from None

    def keys(self) -> list[str]:
        return list(self._order)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._order)

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entry(key).dtype_name]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def nbytes(self, key: str) -> int:
        entry = self._entry(key)
        return entry.end - entry.start

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` as a CPU tensor in its stored dtype, owning its memory."""
        entry = self._entry(key)
        dtype = _DTYPES[entry.dtype_name]
        size = entry.end - entry.start
        if size == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if self._file is None:
            raise ValueError(f"{self.path}: the reader is closed")
        buffer = bytearray(size)
        self._file.seek(self._data_start + entry.start)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self._file.readinto(view[got:])
            if not n:
                raise self._error(f"could read only {got} of {size} bytes; the file shrank while it was read",
                                  key=key)
            got += n
        view.release()
        itemsize = _ITEMSIZE[entry.dtype_name]
        if _BIG_ENDIAN and itemsize > 1:
            np.frombuffer(buffer, dtype=f"u{itemsize}").byteswap(inplace=True)
        if dtype == torch.bool and buffer.translate(None, b"\x00\x01"):
            raise self._error("BOOL tensor holds bytes other than 0 and 1; the file is corrupt", key=key)
        # the tensor keeps `buffer` alive; nothing refers to the file afterwards
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def _open_regular(path: str):
    """Open a regular file for reading (a FIFO or device could block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise AdapterFormatError("not a regular file", path=path)
        return open(path, "rb")
    except OSError as error:
        raise AdapterFormatError(f"cannot open the file ({error.strerror or error})", path=path) from None


def _head(path: str, n: int = 4) -> bytes:
    with _open_regular(path) as handle:
        return handle.read(n)


def _starts_like_pickle(head: bytes) -> bool:
    # zip (torch.save since 1.6) or a pickle protocol 2-5 stream (legacy torch.save, raw pickles)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_tensors(path, keys: Iterable[str] | None = None, *,
                 allow_pickle_weights_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a file (or those in `keys`, in file order) and its metadata.

    The content decides, not the name: a valid safetensors file is read as one whatever its
    suffix. Anything else named like a pickle (`PICKLE_SUFFIXES`) or starting like a zip or a
    pickle is refused unless `allow_pickle_weights_only`; then only the zip format that
    `torch.save` has written since torch 1.6 is read, with `torch.load(weights_only=True)`.
    """
    path = str(path)
    wanted = None if keys is None else list(keys)
    try:
        reader = SafetensorsReader(path)
    except AdapterFormatError as error:
        if path.lower().endswith(PICKLE_SUFFIXES) or _starts_like_pickle(_head(path)):
            return _load_pickle(path, wanted, allow_pickle_weights_only, error)
        raise
    with reader:
        if wanted is None:
            names = reader.keys()
        else:
            missing = [k for k in wanted if k not in reader]
            if missing:
                raise AdapterFormatError("tensor not found in the file", path=path, key=missing[0])
            chosen = set(wanted)
            names = [k for k in reader.keys() if k in chosen]
        tensors = {name: reader.tensor(name) for name in names}
        return tensors, dict(reader.metadata)


def _load_pickle(path: str, wanted: list[str] | None, allowed: bool, not_safetensors: AdapterFormatError):
    head = _head(path)
    if not _starts_like_pickle(head):
        # named like a pickle but neither a pickle nor a zip: say why it is not a safetensors file either
        raise AdapterFormatError(
            f"neither a safetensors file ({not_safetensors.message}) nor a torch.save/pickle file", path=path)
    if not allowed:
        raise AdapterFormatError(f"this is a pickle file (.ckpt/.pt/.pth/.bin); {_PICKLE_HINT}", path=path)
    if not head.startswith(b"PK\x03\x04"):
        # the legacy format sizes its storages from the pickle itself before reading them
        raise AdapterFormatError(
            "not a zip-format torch.save file (legacy pickle formats are not read, even weights-only); "
            "convert it to .safetensors", path=path)
    try:
        # a file object, not the path: torch.load hands paths ending in .safetensors to another loader
        with open(path, "rb") as handle:
            loaded = torch.load(handle, weights_only=True, map_location="cpu", mmap=False)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, zip errors, ...
        raise AdapterFormatError(
            f"weights-only loading refused or failed ({type(error).__name__}: {_one_line(error)}); "
            f"the file holds more than plain tensors or is corrupt; {_PICKLE_HINT}", path=path) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise AdapterFormatError(f"expected a dict of tensors, the file holds a {type(loaded).__name__}", path=path)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise AdapterFormatError(f"expected text keys, found {_short(repr(name))}", path=path)
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise AdapterFormatError(f"expected a dense tensor, found a {type(value).__name__} "
                                     "(only flat dicts of tensors are read)", path=path, key=name)
        if value.dtype not in _NAMES:
            raise AdapterFormatError(f"unsupported dtype {value.dtype}", path=path, key=name)
        tensors[name] = value
    if wanted is not None:
        missing = [k for k in wanted if k not in tensors]
        if missing:
            raise AdapterFormatError("tensor not found in the file", path=path, key=missing[0])
        chosen = set(wanted)
        tensors = {k: v for k, v in tensors.items() if k in chosen}
    return tensors, {}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def save_tensors_atomic(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a .safetensors file, atomically.

    Data is laid out by element size, largest first (stable), so that every tensor starts on a
    multiple of its element size; the header lists tensors in that order.
    """
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterFormatError(f"expected a tensor, got a {type(value).__name__}", key=str(name))
    names = sorted(tensors, key=lambda n: -tensors[n].element_size())
    specs = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names]
    write_tensors_streamed(path, specs, tensors.__getitem__, metadata)


def write_tensors_streamed(path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                           produce: Callable[[str], torch.Tensor],
                           metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file whose tensors are produced one at a time, atomically.

    The header comes from `specs` ([(name, dtype, shape)], data in that order, no padding); then
    `produce(name)` is called for each spec in order and its bytes are written at once, so only
    one produced tensor needs to be in memory. A produced tensor whose dtype or shape differs
    from its spec raises AdapterFormatError naming the key; on any exception nothing is left
    behind and an existing file at `path` is untouched.
    """
    path = os.fspath(path)
    header_bytes, sizes = _build_header(path, specs, metadata)
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            _write_all(handle, len(header_bytes).to_bytes(8, "little"))
            _write_all(handle, header_bytes)
            for (name, dtype, shape), size in zip(specs, sizes):
                value = produce(name)
                _check_produced(path, name, value, dtype, shape)
                if size:
                    _write_all(handle, _tensor_bytes(value))
                del value
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _build_header(path: str, specs, metadata) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        if not isinstance(metadata, dict):
            raise AdapterFormatError("metadata must be a dict of text values", path=path, key="__metadata__")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise AdapterFormatError(
                    f"metadata {_short(repr(key))} -> {_short(repr(value))} is not text; safetensors metadata "
                    "values must be strings (json.dumps them first)", path=path, key="__metadata__")
        header["__metadata__"] = dict(metadata)
    sizes: list[int] = []
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        if not isinstance(name, str) or name == "__metadata__":
            raise AdapterFormatError("tensor names must be text other than '__metadata__'", path=path, key=str(name))
        if name in header:
            raise AdapterFormatError("tensor name given twice", path=path, key=name)
        shape = tuple(shape)
        if len(shape) > MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
            raise AdapterFormatError(f"shape {shape} must be at most {MAX_RANK} non-negative integers",
                                     path=path, key=name)
        try:
            code = dtype_name(dtype)
        except AdapterFormatError as error:
            raise AdapterFormatError(error.message, path=path, key=name) from None
        count = 1
        for s in shape:
            count *= s
        size = count * _ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, like the official writer's
    if len(raw) > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit",
                                 path=path)
    return raw, sizes


def _check_produced(path: str, name: str, value, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise AdapterFormatError(f"expected a tensor, got a {type(value).__name__}", path=path, key=name)
    if value.dtype != dtype or tuple(value.shape) != tuple(shape):
        raise AdapterFormatError(
            f"produced {value.dtype} {list(value.shape)} but the header declares {dtype} {list(shape)}",
            path=path, key=name)
    if value.layout != torch.strided:
        raise AdapterFormatError(f"expected a dense tensor, got layout {value.layout}", path=path, key=name)


def _tensor_bytes(value: torch.Tensor) -> memoryview:
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    array = flat.view(torch.uint8).numpy()
    if _BIG_ENDIAN and value.element_size() > 1:
        array = array.view(f"u{value.element_size()}").byteswap().view(np.uint8)
    return memoryview(array)


def _write_all(handle, data) -> None:
    view = memoryview(data).cast("B")
    chunk = 64 * 1024 * 1024
    written = 0
    while written < len(view):
        n = handle.write(view[written: written + chunk])
        if not n:
            raise OSError("write returned 0 bytes")
        written += n


def _fsync_folder(folder: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# output names
# ---------------------------------------------------------------------------------------------

_INVALID_CHARS = set('<>:"/\\|?*')
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{prefix}{n}" for prefix in ("COM", "LPT") for n in list("123456789") + ["\u00b9", "\u00b2", "\u00b3"]
}
MAX_NAME_BYTES = 200  # file name incl. suffix, UTF-8; leaves room for the ".<name>.<hex>.tmp" temp file


def safe_output_path(folder, name: str, suffix: str = ".safetensors") -> pathlib.Path:
    """A file path inside `folder` for a user-typed output `name`.

    Directories are flattened, never created or followed: '/', '\\\\' separate parts; empty, '.'
    and '..' parts and drive letters are dropped and the rest joined with '_' ("sub/x" ->
    "sub_x", "../x" -> "x", "/etc/passwd" -> "etc_passwd"). Control/format characters are removed,
    `<>:"|?*` become '_', leading dots and spaces and trailing dots and spaces are stripped,
    Windows device names (CON, NUL, COM1, ...) get a '_' prefix, the name is cut to 200 UTF-8 bytes
    with `suffix`, and `suffix` is appended unless already there (case-insensitive). The result,
    resolved (symlinks followed), must lie inside `folder`, else AdapterFormatError; an empty
    result is an AdapterFormatError too.
    """
    if not isinstance(name, str):
        raise AdapterFormatError(f"output name must be text, got {type(name).__name__}")
    raw = name
    text = unicodedata.normalize("NFC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))
    text = text.replace("\\", "/")
    parts = []
    for part in text.split("/"):
        part = part.strip()
        if len(part) >= 2 and part[1] == ":" and part[0].isascii() and part[0].isalpha():
            part = part[2:]  # drive letter ("C:foo")
        if part in ("", ".", "..") or set(part) == {"."}:
            continue
        parts.append(part)
    stem = "_".join(parts)
    stem = "".join("_" if ch in _INVALID_CHARS else ch for ch in stem)
    suffix = suffix or ""
    has_suffix = bool(suffix) and stem.lower().endswith(suffix.lower())
    if has_suffix:
        stem = stem[: len(stem) - len(suffix)]
    stem = stem.lstrip(". ").rstrip(". ")
    if stem.split(".")[0].rstrip(" ").upper() in _RESERVED:
        stem = "_" + stem
    budget = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    while len(stem.encode("utf-8")) > budget:
        stem = stem[:-1]
    stem = stem.rstrip(". ")
    if not stem:
        raise AdapterFormatError(f"output name {raw!r} has no usable characters; type a file name")
    file_name = stem + suffix
    base = pathlib.Path(folder).resolve()
    candidate = base / file_name
    resolved = candidate.resolve()  # follows a symlink already sitting at that name
    if not _inside(candidate, base) or not _inside(resolved, base):
        raise AdapterFormatError(f"output name {raw!r} leads outside the output folder", path=str(base))
    return candidate


def _inside(path: pathlib.Path, base: pathlib.Path) -> bool:
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return path != base
