"""Writing zarr v3 stores whose chunk files can be memory-mapped (see ``loader.format``).

Metadata is written here directly, without a zarr call per array (zarr-python costs milliseconds
per array, most of a minute for the real model's thousands of arrays): each array's ``zarr.json``
is the document zarr-python 3 writes for it (:func:`array_metadata`: one chunk holding the whole
array, the ``bytes`` codec and no other, ``fill_value`` 0, attributes ``logical_dtype`` for raw-bit
dtypes), each parent folder gets a group ``zarr.json`` (:func:`group_metadata`), both serialised
as zarr does (``json.dumps(indent=2)``) and put in place by a rename; so is the consolidated root
metadata, once per store (:func:`consolidated_metadata`). The chunk file is written here,
piece by piece, so an array larger than memory streams to disk. Pieces go to a temporary file that
is renamed into place when complete. The checksum (CRC32 of the chunk file) is computed while
writing when pieces arrive in file order, else by reading the finished file back.

Non-finite values (NaN, infinity) are counted per array: a writer counts the floating-point
pieces it is given (:func:`pipeline.nonfinite.count_nonfinite`, on the bits) unless the caller
passes the count it already has (the FP8 kernel's, or the NaN codes of an FP8 code array);
:meth:`ArrayWriter.finish` records a count above zero as ``nonfinite``.

A piece whose memory and file offset are 4 KiB-aligned has its 4 KiB-aligned head written with
``O_DIRECT`` when that head is at least ``DIRECT_MIN`` bytes (the rest, under 4 KiB, is
buffered): the disk reads it straight from the converter's buffers, skipping
the copy into the page cache (the largest CPU cost of buffered writes) and leaving the cache to
the source files. Other pieces (a small direct write would wait behind the disk's whole queue),
and filesystems without direct I/O, use ordinary writes; durability comes from the converter's
``syncfs`` either way.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import unicodedata
import uuid
from pathlib import Path

import numpy as np

from loader.format import CORE_DTYPES, chunk_path, chunk_shape, storage_dtype, store_dir
from loader.verify import crc32_file
from mimo.checksum import crc32, format_crc32
from pipeline.buffers import ALIGN
from pipeline.journal import refuse_link
from pipeline.nonfinite import count_nonfinite
from pipeline.plan import OutputArray

DIRECT_MIN = 1 << 20  # smaller pieces are buffered: a small direct write waits behind the queue
_FLOATS = {"bfloat16", "float32"}  # logical dtypes a writer counts itself; FP8 codes come counted
# a chunk piece: a new file of an unpredictable name, never created through a link
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_store(out: Path, store: str, attributes: dict) -> None:
    """Create (or reopen, on resume) the root group of ``store``.

    The store and everything in it must be real files and folders: a symbolic link anywhere in
    it is an InputError naming it (zarr and the chunk writers would follow it)."""
    root = store_dir(out, store)
    check_no_links(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").exists():
        _write_metadata(root, group_metadata(attributes))


def check_no_links(root: Path) -> None:
    """Raise InputError naming the first symbolic link at or under ``root`` (never followed)."""
    refuse_link(root, "store")
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            refuse_link(Path(parent) / name, "store entry")


def remove_partials(root: Path) -> None:
    """Delete the ``*.partial`` chunk pieces a killed run left under ``root`` (no link followed)."""
    refuse_link(root, "store")
    for parent, _, files in os.walk(root):
        for name in files:
            if name.endswith(".partial"):
                p = Path(parent) / name
                if not p.is_symlink():
                    p.unlink()


def array_metadata(shape: tuple[int, ...], dtype: str) -> dict:
    """The zarr v3 ``zarr.json`` of an array of logical ``dtype``, as zarr-python 3 writes it.

    ``data_type`` is :func:`loader.format.storage_dtype` (raw ``uint16``/``uint8`` bits for
    bfloat16 and FP8, with ``attributes.logical_dtype`` naming the logical dtype); one regular
    chunk of :func:`loader.format.chunk_shape`; ``/``-separated default chunk keys; ``fill_value``
    0 (``0.0`` for floats); the ``bytes`` codec alone (little-endian when wider than a byte).
    """
    raw = np.dtype(storage_dtype(dtype))
    bytes_codec: dict = {"name": "bytes"}
    if raw.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "shape": list(shape),
        "data_type": raw.name,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": list(chunk_shape(tuple(shape)))},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if raw.kind == "f" else 0,
        "codecs": [bytes_codec],
        "attributes": {} if dtype in CORE_DTYPES else {"logical_dtype": dtype},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def group_metadata(attributes: dict | None = None) -> dict:
    """The zarr v3 ``zarr.json`` of a group (the store's root, or a parent folder of arrays)."""
    return {"attributes": dict(attributes or {}), "zarr_format": 3, "node_type": "group"}


def create_array_metadata(out: Path, spec: OutputArray) -> None:
    """Write ``zarr.json`` of ``spec`` (whole-array chunk, raw little-endian bytes, no codecs) and
    a group ``zarr.json`` in each parent folder below the store's root that has none."""
    root = store_dir(out, spec.store)
    parts = spec.path.split("/")
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    parent = root
    for part in parts[:-1]:
        parent = parent / part
        if not (parent / "zarr.json").exists():  # concurrent writers write the same bytes
            _write_metadata(parent, _GROUP_JSON)
    _write_metadata(folder, _array_json(tuple(spec.shape), spec.dtype))


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, indent=2).encode()  # as zarr serialises (its pure-Python encoder)


@functools.lru_cache(maxsize=4096)
def _array_json(shape: tuple[int, ...], dtype: str) -> bytes:
    """:func:`array_metadata` serialised; arrays of one shape and dtype share it."""
    return _dumps(array_metadata(shape, dtype))


_GROUP_JSON = _dumps(group_metadata())


def _write_metadata(folder: Path, doc: dict | bytes) -> None:
    """``folder/zarr.json`` = ``doc`` (a document, or its serialised bytes) via a ``*.partial``
    file and a rename (no fsync: the converter's ``syncfs`` makes it durable before the manifest
    is written)."""
    path = folder / "zarr.json"
    refuse_link(path, "metadata file")
    tmp = folder / f"zarr.json.{uuid.uuid4().hex}.partial"  # removed by remove_partials
    data = doc if isinstance(doc, bytes) else _dumps(doc)
    fd = os.open(tmp, _CREATE, 0o644)
    try:
        _write_all(fd, memoryview(data), 0)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def consolidated_metadata(attributes: dict, arrays: list[OutputArray]) -> dict:
    """The store's root ``zarr.json`` with every node's metadata inlined, as
    ``zarr.consolidate_metadata`` writes it (zarr-python 3.1).

    ``consolidated_metadata.metadata`` maps each node's path (every array of ``arrays``, every
    folder above one) to its document, sorted by depth then by NFKC-casefolded path; a group's
    document carries an empty ``consolidated_metadata`` of its own, between ``zarr_format`` and
    ``node_type``.
    """
    nodes: dict[str, dict] = {}
    for spec in arrays:
        parts = spec.path.split("/")
        for depth in range(1, len(parts)):
            nodes.setdefault("/".join(parts[:depth]), _with_consolidated(group_metadata(), {}))
        nodes[spec.path] = array_metadata(spec.shape, spec.dtype)

    def order(path: str) -> tuple[int, str]:
        return path.count("/"), unicodedata.normalize("NFKC", path).casefold()

    ordered = {path: nodes[path] for path in sorted(nodes, key=order)}
    return _with_consolidated(group_metadata(attributes), ordered)


def _with_consolidated(group: dict, metadata: dict) -> dict:
    return {
        "attributes": group["attributes"],
        "zarr_format": group["zarr_format"],
        "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": metadata},
        "node_type": group["node_type"],
    }


def consolidate(out: Path, store: str, attributes: dict, arrays: list[OutputArray]) -> None:
    """Write the store's consolidated root ``zarr.json`` (:func:`consolidated_metadata`) by a
    rename, once, after all of ``arrays`` (every array of the store) are in place."""
    _write_metadata(store_dir(out, store), consolidated_metadata(attributes, arrays))


class ArrayWriter:
    """The chunk file of one output array, written in pieces; :meth:`finish` puts it in place."""

    def __init__(self, out: Path, spec: OutputArray, on_bytes=None) -> None:
        self.spec = spec
        self.path = Path(chunk_path(out, spec.store, spec.path, spec.shape))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.partial")
        self.fd = os.open(self.tmp, _CREATE, 0o644)
        self.direct: int | None = None  # the O_DIRECT descriptor, opened for the first large piece
        self._try_direct = True
        self.nbytes = spec.nbytes
        self.itemsize = np.dtype(storage_dtype(spec.dtype)).itemsize
        self.row_bytes = (
            self.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else self.nbytes
        )
        self.written = 0
        self.next = 0  # file offset up to which the CRC has been computed in order
        self.crc = 0
        self.on_bytes = on_bytes
        self.checks: dict = {}  # evidence gathered while writing, recorded in the manifest
        self.nonfinite = 0  # NaN or infinite values written
        self._counts = spec.dtype in _FLOATS

    def _pwrite(self, data: memoryview, offset: int) -> None:
        if offset == self.next:
            self.crc = crc32(data, self.crc)
            self.next += len(data)
        else:
            self.next = -1  # out of order: checksum by reading back
        aligned = len(data) - len(data) % ALIGN
        if (
            aligned >= DIRECT_MIN
            and offset % ALIGN == 0
            and _address(data) % ALIGN == 0
            and self._direct_fd() is not None
        ):
            try:
                _write_all(self.direct, data[:aligned], offset)
                data, offset = data[aligned:], offset + aligned
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)  # the filesystem opened O_DIRECT but refuses to write it
                self.direct, self._try_direct = None, False
        _write_all(self.fd, data, offset)

    def _direct_fd(self) -> int | None:
        """The O_DIRECT descriptor of the partial file, opened on first use; None without one."""
        if self.direct is None and self._try_direct:
            self.direct = _open_direct(self.tmp)
            self._try_direct = self.direct is not None
        return self.direct

    def _count(self, block: np.ndarray, nonfinite: int | None) -> None:
        if nonfinite is None:
            nonfinite = count_nonfinite(block) if self._counts else 0
        self.nonfinite += nonfinite

    def rows(self, row0: int, block: np.ndarray, nonfinite: int | None = None) -> None:
        """Write ``block`` as rows ``[row0, row0 + len(block))`` of the array (axis 0).

        ``nonfinite``: how many values of ``block`` are NaN or infinite, when the caller knows;
        None: the writer counts them (floating-point arrays)."""
        self._count(block, nonfinite)
        data = _bytes(block)
        if len(data) % self.row_bytes:
            raise ValueError(f"{self.spec.path}: block is not a whole number of rows")
        self._write(data, row0 * self.row_bytes)

    def tile(self, row0: int, col0: int, block: np.ndarray, nonfinite: int | None = None) -> None:
        """Write the 2-D ``block`` at ``[row0:, col0:]`` of a 2-D array, a row segment at a time
        (``nonfinite`` as in :meth:`rows`)."""
        rows, cols = block.shape
        if col0 == 0 and cols == self.spec.shape[1]:
            return self.rows(row0, block, nonfinite)
        self._count(block, nonfinite)
        data = _bytes(block)
        seg = cols * self.itemsize
        for i in range(rows):
            self._write(
                data[i * seg : (i + 1) * seg], (row0 + i) * self.row_bytes + col0 * self.itemsize
            )

    def _write(self, data: memoryview, offset: int) -> None:
        if offset + len(data) > self.nbytes:
            raise ValueError(f"{self.spec.path}: write past the end of the array")
        self._pwrite(data, offset)
        self.written += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))

    def finish(self) -> dict:
        """Close, checksum and rename into place; return the manifest record fields."""
        self._close()
        if self.written != self.nbytes:
            raise RuntimeError(f"{self.spec.path}: wrote {self.written} of {self.nbytes} bytes")
        checksum = format_crc32(self.crc) if self.next == self.nbytes else crc32_file(self.tmp)
        os.replace(self.tmp, self.path)
        record = {"bytes": self.nbytes, "checksum": checksum}
        if self.nonfinite:
            record["nonfinite"] = self.nonfinite
        return record | ({"checks": self.checks} if self.checks else {})

    def _close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.direct = None

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)


def _open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` for direct I/O, or None where the filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("MIMO_SHARD_DIRECT_IO", "1") == "0":
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flag)
    except OSError:  # EINVAL: tmpfs and other filesystems without O_DIRECT
        return None


def _address(data: memoryview) -> int:
    return np.frombuffer(data, np.uint8).ctypes.data if len(data) else 0


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _bytes(a: np.ndarray) -> memoryview:
    a = np.ascontiguousarray(a)
    return memoryview(a.reshape(-1).view(np.uint8))
