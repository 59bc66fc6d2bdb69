"""Checking arrays against their manifest records (shape, dtype, layout, size, CRC32).

Used by :func:`loader.open_device` (which stops at the first problem) and by
``mimo-manifest verify`` (which lists them all). An array is sound when its store's consolidated
``zarr.json`` describes it exactly as the manifest does (shape, storage dtype, logical dtype, one
whole-array chunk, raw little-endian bytes) and its chunk file has the manifest's size — and, when
checksums are verified, the manifest's CRC32.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.format import CORE_DTYPES, chunk_path, chunk_shape, storage_dtype


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
    if tuple(meta.get("shape", ())) != shape:
        return f"zarr shape {meta.get('shape')} != manifest {list(shape)}"
    if meta.get("data_type") != want_dtype:
        return f"zarr data_type {meta.get('data_type')!r} != {want_dtype!r}"
    logical = (meta.get("attributes") or {}).get("logical_dtype")
    if rec["dtype"] not in CORE_DTYPES and logical != rec["dtype"]:
        return f"logical_dtype {logical!r} != manifest {rec['dtype']!r}"
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    if tuple(grid or ()) != chunk_shape(shape):
        return f"chunk shape {grid} is not the whole array"
    codecs = meta.get("codecs") or []
    if (
        len(codecs) != 1
        or codecs[0].get("name") != "bytes"
        or ((codecs[0].get("configuration") or {}).get("endian", "little") != "little")
    ):
        return f"codecs {codecs} are not raw little-endian bytes"
    key = meta.get("chunk_key_encoding", {})
    if (
        key.get("name") != "default"
        or (key.get("configuration") or {}).get("separator", "/") != "/"
    ):
        return f"chunk key encoding {key} is not the default '/'"
    return None


def crc32_file(path: Path, buf_bytes: int = 8 << 20) -> str:
    """``crc32:xxxxxxxx`` of a file's bytes (the manifest's checksum)."""
    crc = 0
    buf = bytearray(buf_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"


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
        size = chunk.stat().st_size
    except FileNotFoundError:
        return Problem(store, path, "missing", f"chunk file {chunk} does not exist")
    if size != rec["bytes"]:
        return Problem(
            store, path, "size", f"chunk file has {size} bytes, manifest says {rec['bytes']}"
        )
    if checksum:
        got = crc32_file(chunk)
        if got != rec["checksum"]:
            return Problem(store, path, "checksum", f"{got} != manifest {rec['checksum']}")
    return None
