"""Checking arrays against their manifest records (shape, dtype, layout, size, CRC32).

Used by :func:`loader.open_device` (which stops at the first problem) and by
``mimo-manifest verify`` (which lists them all). An array is sound when its store's consolidated
``zarr.json`` describes it exactly as the manifest does (shape, storage dtype, logical dtype, one
whole-array chunk, raw little-endian bytes) and its chunk file has the manifest's size — and, when
checksums are verified, the manifest's CRC32.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.format import CORE_DTYPES, chunk_path, chunk_shape, storage_dtype
from mimo.checksum import crc32, format_crc32


@dataclass(frozen=True)
class Problem:
    store: str
    path: str
    kind: str  # "missing" | "size" | "metadata" | "checksum"
    detail: str

    def __str__(self) -> str:
        return f"{self.store}/{self.path}: {self.kind}: {self.detail}"


def metadata_problem(rec: dict[str, Any], meta: dict[str, Any] | None) -> str | None:
    """Why the zarr metadata ``meta`` contradicts the manifest record ``rec`` (None: it agrees)."""
    if meta is None:
        return "not in the store's zarr metadata"
    shape = tuple(rec["shape"])
    want_dtype = storage_dtype(rec["dtype"]).name
    if not isinstance(meta.get("shape"), list) or tuple(meta["shape"]) != shape:
        return f"zarr shape {meta.get('shape')} != manifest {list(shape)}"
    if meta.get("data_type") != want_dtype:
        return f"zarr data_type {meta.get('data_type')!r} != {want_dtype!r}"
    logical = _field(meta, "attributes", "logical_dtype")
    if rec["dtype"] not in CORE_DTYPES and logical != rec["dtype"]:
        return f"logical_dtype {logical!r} != manifest {rec['dtype']!r}"
    grid = _field(meta, "chunk_grid", "configuration", "chunk_shape")
    if not isinstance(grid, list) or tuple(grid) != chunk_shape(shape):
        return f"chunk shape {grid} is not the whole array"
    codecs = meta.get("codecs")
    if (
        not isinstance(codecs, list)
        or len(codecs) != 1
        or _field(codecs[0], "name") != "bytes"
        or (_field(codecs[0], "configuration", "endian") or "little") != "little"
    ):
        return f"codecs {codecs} are not raw little-endian bytes"
    key = meta.get("chunk_key_encoding")
    if (
        _field(key, "name") != "default"
        or (_field(key, "configuration", "separator") or "/") != "/"
    ):
        return f"chunk key encoding {key} is not the default '/'"
    return None


def _field(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def crc32_file(path: Path, buf_bytes: int = 8 << 20) -> str:
    """``crc32:xxxxxxxx`` of a file's bytes (the manifest's checksum)."""
    crc = 0
    buf = bytearray(buf_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = crc32(view[:n], crc)
    return format_crc32(crc)


def chunk_crc32(out: Path, rec: dict[str, Any]) -> str | None:
    """``crc32:xxxxxxxx`` recomputed from the chunk file of ``rec``; None when it is unreadable."""
    chunk = Path(chunk_path(out, rec["store"], rec["path"], tuple(rec["shape"])))
    try:
        if not stat.S_ISREG(os.stat(chunk).st_mode):
            return None
        return crc32_file(chunk)
    except OSError:
        return None


def check_array(
    out: Path, rec: dict[str, Any], meta: dict[str, Any] | None, checksum: bool = False
) -> Problem | None:
    """The first problem of one manifest array, or None when it is sound."""
    store, path = rec["store"], rec["path"]
    why = metadata_problem(rec, meta)
    if why:
        return Problem(store, path, "metadata", why)
    chunk = Path(chunk_path(out, store, path, tuple(rec["shape"])))
    try:
        st = os.stat(chunk)
    except FileNotFoundError:
        return Problem(store, path, "missing", f"chunk file {chunk} does not exist")
    except OSError as e:
        return Problem(store, path, "missing", f"chunk file {chunk}: {e.strerror or e}")
    if not stat.S_ISREG(st.st_mode):
        return Problem(store, path, "missing", f"chunk file {chunk} is not a regular file")
    if st.st_size != rec["bytes"]:
        return Problem(
            store, path, "size", f"chunk file has {st.st_size} bytes, manifest says {rec['bytes']}"
        )
    if checksum:
        try:
            got = crc32_file(chunk)
        except OSError as e:
            return Problem(store, path, "missing", f"chunk file {chunk}: {e.strerror or e}")
        if got != rec["checksum"]:
            return Problem(store, path, "checksum", f"{got} != manifest {rec['checksum']}")
    return None
