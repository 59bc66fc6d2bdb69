"""Reading and writing safetensors files with bounded memory.

The ``safetensors`` library cannot hand F8 tensors to NumPy and writes a file from tensors held
in memory, so this module parses headers itself (validating every field against the file size)
and reads byte ranges with ``preadv`` into NumPy buffers viewed with ``ml_dtypes``. Files it
writes are ordinary safetensors files: the library opens them.

Format: 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, offsets relative to the data start), data.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from pipeline.errors import InputError
from pipeline.strided import unit_rows

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
MAX_RANK = 8  # real checkpoints hold tensors of rank <= 4
MAX_DIM = 1 << 40  # far beyond any real dimension (vocab ~152k, hidden 4096)
FILE_KINDS = (  # what a path that is not a regular file is, for the error message
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileId(NamedTuple):
    """What identifies one version of a local file: a rewrite or replacement changes it.

    A rewrite that keeps the size and restores the mtime on the same inode is not detected
    (only hashing the contents would).
    """

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def open_regular(path: str | Path, name: str | Path) -> tuple[int, os.stat_result]:
    """An fd reading ``path`` and its ``fstat``, or an InputError naming ``name``.

    Only a regular file is opened: a FIFO, a device, a socket or a directory is refused before
    the open (and checked again on the opened fd, which is opened non-blocking so that a FIFO
    swapped in meanwhile cannot block).
    """
    try:
        _require_regular(os.stat(path), name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{name}: file is missing") from None
    except OSError as e:
        raise InputError(f"{name}: cannot open ({e.strerror or e})") from None
    st = os.fstat(fd)
    try:
        _require_regular(st, name)
    except InputError:
        os.close(fd)
        raise
    return fd, st


def _require_regular(st: os.stat_result, name: str | Path) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in FILE_KINDS if test(st.st_mode)), "not a plain file")
        raise InputError(f"{name}: is {kind}, not a regular file")


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
    file_id: FileId | None = None  # of the local file the header was read from


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

    At least as strict as the safetensors library: UTF-8 JSON object starting with ``{`` (no
    BOM, no other encoding, no duplicate keys, no NaN), known dtypes, shapes of at most
    ``MAX_RANK`` non-negative int dimensions whose bytes match ``data_offsets``, and offsets that
    tile the data section exactly: contiguous from 0, no overlap, no gap, no trailing bytes.
    Sources that fetch headers remotely (range requests) use this too.
    """
    obj = _header_json(name, raw)
    data_start = 8 + len(raw)
    data_size = size - data_start
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(
            f"{name}: malformed safetensors header (__metadata__ must map strings to strings)"
        )
    tensors: dict[str, TensorEntry] = {}
    for tname, e in obj.items():
        tensors[tname] = _entry(Path(name), tname, e, data_start, data_size)
    _check_tiling(name, tensors, data_start, data_size)
    return Header(Path(name), size, data_start, tensors, meta)


def _header_json(name: str | Path, raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as one JSON object, refusing anything the safetensors library refuses."""
    bad = f"{name}: malformed safetensors header"
    if raw[:1] != b"{":
        raise InputError(f"{bad} (does not start with '{{': not UTF-8 JSON)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{bad} (not UTF-8 at byte {8 + e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{bad} (invalid JSON: {e})") from None
    except RecursionError:
        raise InputError(f"{bad} (nested too deeply)") from None
    except ValueError as e:  # from the hooks
        raise InputError(f"{bad} ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{bad} (not a JSON object)")
    return obj


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if any(k == j for j, _ in pairs[:i]))
        raise ValueError(f"key {dup!r} appears twice")
    return obj


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


class SizeMismatch(InputError):
    """The header's tensors do not end where the file (as sized by its source) ends."""


def _check_tiling(
    name: str | Path, tensors: dict[str, TensorEntry], data_start: int, data_size: int
) -> None:
    """The tensors' byte ranges cover the data section exactly, in offset order."""
    pos = data_start
    for e in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else "leaves a gap before it"
            raise InputError(
                f"{name}: tensor {e.name!r}: data_offsets [{e.begin - data_start}, "
                f"{e.end - data_start}] {what} (data must be contiguous)"
            )
        pos = e.end
    if pos != data_start + data_size:
        raise SizeMismatch(
            f"{name}: {data_start + data_size - pos} trailing bytes after the last tensor "
            f"(the data section ends at byte {pos}, the file has {data_start + data_size})"
        )


def read_header(path: str | Path, name: str | Path | None = None) -> Header:
    """Parse and validate the header of the local regular file ``path``; problems are
    InputErrors naming ``name`` (default: ``path``). The header records the file's identity."""
    path = Path(path)
    name = path if name is None else name
    if not os.path.lexists(path):
        raise InputError(f"{name}: file listed in the index is missing")
    fd, st = open_regular(path, name)
    with os.fdopen(fd, "rb") as f:
        size = st.st_size
        n = header_length(name, size, f.read(8))
        raw = f.read(n)
    if len(raw) < n:
        raise InputError(f"{name}: truncated safetensors header ({len(raw)} of {n} bytes)")
    h = parse_header(name, size, raw)
    return Header(h.path, h.size, h.data_start, h.tensors, h.metadata, FileId.of(st))


def _entry(path: Path, name: str, e: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise InputError(f"{where}: malformed header entry {_short(e)}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPE:
        raise InputError(f"{where}: unknown dtype {_short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise InputError(
            f"{where}: malformed shape {_short(shape)} (at most {MAX_RANK} dimensions, "
            f"each an int in [0, {MAX_DIM}])"
        )
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(_is_int(o) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise InputError(f"{where}: malformed data_offsets {_short(offs)}")
    want = math.prod(shape) * NUMPY_DTYPE[dtype].itemsize  # Python ints: no overflow
    if offs[1] - offs[0] != want:
        raise InputError(
            f"{where}: data_offsets span {offs[1] - offs[0]} bytes but {dtype}{shape} needs {want}"
        )
    if offs[1] > data_size:
        raise SizeMismatch(
            f"{where}: data ends at byte {data_start + offs[1]} but the file has "
            f"{data_start + data_size} bytes (truncated file)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to one short line (a hostile header may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


IOV_MAX = 1024  # segments per preadv call (the kernel's limit)

_LIBC = ctypes.CDLL(None, use_errno=True)
_preadv = _LIBC.preadv  # called through ctypes, which releases the GIL for the call
_preadv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong)
_preadv.restype = ctypes.c_ssize_t


def read_into(fd: int, offset: int, out: np.ndarray, where: str) -> np.ndarray:
    """Fill ``out`` with the bytes at ``offset`` of ``fd``; ``where`` names the tensor in errors.

    ``out`` is C-contiguous, or a 2-D array whose rows are contiguous but spaced further apart
    (a row-padded buffer), each row then its own ``preadv`` segment. The segments are an array of
    ``(address, length)`` pairs handed to the C library's ``preadv`` whole, so a read costs no
    Python object per row (a memoryview per row cost more than the copy itself). A short read
    resumes at the byte it stopped at; end of file first is an InputError.
    """
    if out.size == 0:
        return out
    if not out.flags.writeable:
        raise ValueError(f"{where}: read buffer is read-only")
    iov = _segments(out, where)
    total, done = out.size * out.itemsize, 0
    ends = None  # segment end offsets, computed only when a call stops short of the end
    while done < total:
        if done == 0 and len(iov) <= IOV_MAX:
            batch = iov  # the usual case: one call reads everything
        else:
            if ends is None:
                ends = np.cumsum(iov[:, 1])
            k = int(np.searchsorted(ends, done, side="right"))  # the first segment not yet full
            batch = iov[k : k + IOV_MAX].copy()
            skip = done - (int(ends[k - 1]) if k else 0)
            batch[0, 0] += skip
            batch[0, 1] -= skip
        n = _preadv(fd, batch.ctypes.data, len(batch), offset + done)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, f"{where}: {os.strerror(err)}")
        if n == 0:
            raise InputError(f"{where}: unexpected end of file (truncated while reading)")
        done += n
    return out


def _segments(out: np.ndarray, where: str) -> np.ndarray:
    """``[n, 2]`` uint64 ``(address, length)`` of the memory ``out`` covers, in file order."""
    if out.flags.c_contiguous:
        return np.array([[out.ctypes.data, out.nbytes]], np.uint64)
    if out.ndim != 2 or not unit_rows(out):
        raise ValueError(f"{where}: read buffer {out.shape} has no unit-stride rows")
    rows = out.shape[0]
    iov = np.empty((rows, 2), np.uint64)
    iov[:, 0] = out.ctypes.data + out.strides[0] * np.arange(rows, dtype=np.uint64)
    iov[:, 1] = out.shape[1] * out.itemsize
    return iov


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
    row_bytes = math.prod(tail) * dt.itemsize
    shape = (stop - start, *tail) if entry.shape else ()
    if out is None:
        out = np.empty(shape, dt)
    elif out.ndim == 2 and len(shape) == 2 and out.shape == shape:
        out = out.view(dt)  # a (row-padded) 2-D buffer of the right shape
    else:
        n = math.prod(shape) * dt.itemsize
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
            n = math.prod(shape) * NUMPY_DTYPE[dtype].itemsize
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
