"""Reading and writing safetensors files with bounded memory.

The ``safetensors`` library cannot hand F8 tensors to NumPy and writes a file from tensors held
in memory, so this module parses headers itself (validating every field against the file size)
and reads byte ranges with ``os.pread`` into NumPy buffers viewed with ``ml_dtypes``. Files it
writes are ordinary safetensors files: the library opens them.

Format: 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, offsets relative to the data start), data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from pipeline.errors import InputError

NUMPY_DTYPE = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a file: its dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    size: int  # file size in bytes
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def header_length(name: str | Path, size: int, first8: bytes) -> int:
    """The JSON header length announced by a file's first 8 bytes, checked against its size."""
    if len(first8) < 8:
        raise InputError(f"{name}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > size - 8:
        raise InputError(
            f"{name}: header length {n} is larger than the file ({size} bytes): truncated "
            "or not a safetensors file"
        )
    if n > MAX_HEADER:
        raise InputError(f"{name}: header length {n} exceeds {MAX_HEADER} bytes")
    return n


def parse_header(name: str | Path, size: int, raw: bytes) -> Header:
    """Validate the JSON header ``raw`` of a ``size``-byte file called ``name``.

    Every field is checked: dtypes, shapes, offsets consistent with the dtype and shape, and data
    that ends inside the file. Sources that fetch headers remotely (range requests) use this too.
    """
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: malformed safetensors header (invalid JSON: {e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{name}: malformed safetensors header (not a JSON object)")
    data_start = 8 + len(raw)
    data_size = size - data_start
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InputError(f"{name}: malformed safetensors header (__metadata__ is not an object)")
    tensors: dict[str, TensorEntry] = {}
    for tname, e in obj.items():
        tensors[tname] = _entry(Path(name), tname, e, data_start, data_size)
    return Header(Path(name), size, data_start, tensors, {str(k): str(v) for k, v in meta.items()})


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of the local file ``path``; problems are InputErrors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(path, size, f.read(8))
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{path}: file listed in the index is missing") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a safetensors file") from None
    return parse_header(path, size, raw)


def _entry(path: Path, name: str, e: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise InputError(f"{where}: malformed header entry {e!r}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in NUMPY_DTYPE:
        raise InputError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InputError(f"{where}: malformed shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise InputError(f"{where}: malformed data_offsets {offs!r}")
    want = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPE[dtype].itemsize
    if offs[1] - offs[0] != want:
        raise InputError(
            f"{where}: data_offsets span {offs[1] - offs[0]} bytes but {dtype}{shape} needs {want}"
        )
    if offs[1] > data_size:
        raise InputError(
            f"{where}: data ends at byte {data_start + offs[1]} but the file has "
            f"{data_start + data_size} bytes (truncated file)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


IOV_MAX = 1024


def read_into(fd: int, offset: int, out: np.ndarray, where: str) -> np.ndarray:
    """Fill ``out`` with the bytes at ``offset`` of ``fd``.

    ``out`` is C-contiguous, or a 2-D array whose rows are contiguous but spaced further apart
    (a row-padded buffer); then each row is its own ``preadv`` segment.
    """
    if out.flags.c_contiguous:
        segments = [memoryview(out.reshape(-1).view(np.uint8))]
    else:
        segments = [memoryview(row.view(np.uint8)) for row in out]
    for i in range(0, len(segments), IOV_MAX):
        batch = segments[i : i + IOV_MAX]
        total = sum(len(b) for b in batch)
        done = 0
        while done < total:
            n = os.preadv(fd, _skip(batch, done), offset + done)
            if n == 0:
                raise InputError(f"{where}: unexpected end of file (truncated while reading)")
            done += n
        offset += total
    return out


def _skip(segments: list[memoryview], n: int) -> list[memoryview]:
    """``segments`` without their first ``n`` bytes (after a short read)."""
    out = []
    for s in segments:
        if n >= len(s):
            n -= len(s)
            continue
        out.append(s[n:])
        n = 0
    return out


def read_rows(
    fd: int,
    entry: TensorEntry,
    start: int = 0,
    stop: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``[start, stop)`` of ``entry`` (axis 0), as an array of its dtype."""
    dt = NUMPY_DTYPE[entry.dtype]
    rows = entry.shape[0] if entry.shape else 1
    stop = rows if stop is None else stop
    tail = entry.shape[1:]
    row_bytes = int(np.prod(tail, dtype=np.int64)) * dt.itemsize
    shape = (stop - start, *tail) if entry.shape else ()
    if out is None:
        out = np.empty(shape, dt)
    elif out.ndim == 2 and len(shape) == 2 and out.shape == shape:
        out = out.view(dt)  # a (row-padded) 2-D buffer of the right shape
    else:
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out = out.reshape(-1).view(np.uint8)[:n].view(dt).reshape(shape)
    return read_into(fd, entry.begin + start * row_bytes, out, f"tensor '{entry.name}'")


# ------------------------------------------------------------------------------------ writing
class StreamingWriter:
    """Writes one safetensors file whose tensors are known up front, piece by piece.

    The header is written at open; :meth:`write` places bytes at any offset inside a tensor, so
    a tensor larger than memory is written in row chunks. The file appears under its final name
    only after :meth:`close` has synced it.
    """

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, dtype, shape in entries:
            n = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPE[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[name] = (pos, n)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.size)

    def write(self, name: str, data: np.ndarray, byte_offset: int = 0) -> None:
        """Write ``data`` (raw bytes of the tensor's dtype) at ``byte_offset`` inside ``name``."""
        start, n = self.offsets[name]
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if byte_offset + len(buf) > n:
            raise ValueError(f"write past the end of tensor {name}")
        pos = self.data_start + start + byte_offset
        while len(buf):
            k = os.pwrite(self._fd, buf, pos)
            buf, pos = buf[k:], pos + k

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        os.close(self._fd)
        self._tmp.unlink(missing_ok=True)
