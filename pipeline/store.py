"""Writing zarr v3 stores whose chunk files can be memory-mapped (see ``loader.format``).

zarr writes each array's metadata (``zarr.json``, parent groups); the chunk file is written here,
piece by piece, so an array larger than memory streams to disk. Pieces go to a temporary file that
is renamed into place when complete. The checksum (CRC32 of the chunk file) is computed while
writing when pieces arrive in file order, else by reading the finished file back.

Pieces whose memory, offset and length are 4 KiB-aligned are written with ``O_DIRECT``: the disk
reads them straight from the converter's buffers, skipping the copy into the page cache (the
largest CPU cost of buffered writes) and leaving the cache to the source files. Other pieces, and
filesystems without direct I/O, use ordinary writes; durability comes from the converter's
``syncfs`` either way.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from loader.format import CORE_DTYPES, chunk_path, chunk_shape, storage_dtype, store_dir
from loader.verify import crc32_file
from pipeline.buffers import ALIGN
from pipeline.plan import OutputArray

_group_lock = threading.Lock()


def create_store(out: Path, store: str, attributes: dict) -> None:
    """Create (or reopen, on resume) the root group of ``store``."""
    root = store_dir(out, store)
    with _group_lock:
        if (root / "zarr.json").exists():
            return
        zarr.open_group(root, mode="a", zarr_format=3, attributes=attributes)


def create_array_metadata(out: Path, spec: OutputArray) -> None:
    """Write ``zarr.json`` of ``spec`` (whole-array chunk, raw little-endian bytes, no codecs)."""
    raw = storage_dtype(spec.dtype)
    attrs = {} if spec.dtype in CORE_DTYPES else {"logical_dtype": spec.dtype}
    with _group_lock:  # zarr's parent-group creation is not meant for concurrent writers
        zarr.create_array(
            store=store_dir(out, spec.store),
            name=spec.path,
            shape=spec.shape,
            chunks=chunk_shape(spec.shape),
            dtype=raw,
            compressors=None,
            filters=None,
            serializer=BytesCodec(endian="little") if raw.itemsize > 1 else BytesCodec(),
            fill_value=0,
            attributes=attrs,
            config={"write_empty_chunks": True},
            zarr_format=3,
            overwrite=True,
        )


def consolidate(out: Path, store: str) -> None:
    """Consolidate the store's metadata into its root ``zarr.json`` (once, after all arrays)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(store_dir(out, store))


class ArrayWriter:
    """The chunk file of one output array, written in pieces; :meth:`finish` puts it in place."""

    def __init__(self, out: Path, spec: OutputArray, on_bytes=None) -> None:
        self.spec = spec
        self.path = Path(chunk_path(out, spec.store, spec.path, spec.shape))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.partial")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = _open_direct(self.tmp)
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

    def _pwrite(self, data: memoryview, offset: int) -> None:
        if offset == self.next:
            self.crc = zlib.crc32(data, self.crc)
            self.next += len(data)
        else:
            self.next = -1  # out of order: checksum by reading back
        aligned = len(data) - len(data) % ALIGN
        if (
            self.direct is not None
            and aligned
            and offset % ALIGN == 0
            and _address(data) % ALIGN == 0
        ):
            try:
                _write_all(self.direct, data[:aligned], offset)
                data, offset = data[aligned:], offset + aligned
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)  # the filesystem opened O_DIRECT but refuses to write it
                self.direct = None
        _write_all(self.fd, data, offset)

    def rows(self, row0: int, block: np.ndarray) -> None:
        """Write ``block`` as rows ``[row0, row0 + len(block))`` of the array (axis 0)."""
        data = _bytes(block)
        if len(data) % self.row_bytes:
            raise ValueError(f"{self.spec.path}: block is not a whole number of rows")
        self._write(data, row0 * self.row_bytes)

    def tile(self, row0: int, col0: int, block: np.ndarray) -> None:
        """Write the 2-D ``block`` at ``[row0:, col0:]`` of a 2-D array, a row segment at a time."""
        rows, cols = block.shape
        if col0 == 0 and cols == self.spec.shape[1]:
            return self.rows(row0, block)
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
        checksum = f"crc32:{self.crc:08x}" if self.next == self.nbytes else crc32_file(self.tmp)
        os.replace(self.tmp, self.path)
        record = {"bytes": self.nbytes, "checksum": checksum}
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
        return os.open(path, os.O_WRONLY | flag)
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
