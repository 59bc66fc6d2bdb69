"""Checking a mimo-shard output against its manifest, without importing zarr.

Used by :func:`loader.open_device` (which stops at the first problem) and by
``mimo-manifest verify`` (which lists them all). An array is sound when its store's consolidated
``zarr.json`` describes it exactly as the manifest does (shape, storage dtype, logical dtype, one
whole-array chunk, raw little-endian bytes) and its chunk file has the manifest's size — and, when
checksums are verified, the manifest's CRC32.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.format import (
    CORE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TABLE_FORMAT,
    chunk_path,
    chunk_shape,
    storage_dtype,
    store_dir,
)


class LoaderError(Exception):
    """An output that cannot be used as it is; the message names the array or file at fault."""


@dataclass(frozen=True)
class Problem:
    store: str
    path: str
    kind: str  # "missing" | "size" | "metadata" | "checksum"
    detail: str

    def __str__(self) -> str:
        return f"{self.store}/{self.path}: {self.kind}: {self.detail}"


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of ``out``; refuses incomplete outputs and unknown formats."""
    p = Path(out) / MANIFEST
    if not p.is_file():
        raise LoaderError(
            f"{out}: no {MANIFEST}: the output is incomplete (a conversion is running, crashed or "
            "was interrupted); rerun the same mimo-shard command to finish it"
        )
    try:
        m = json.loads(p.read_bytes())
    except json.JSONDecodeError as e:
        raise LoaderError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise LoaderError(f"{p}: not a mimo-shard manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise LoaderError(
            f"{p}: format version {m.get('format_version')!r} is not supported "
            f"(this loader reads version {FORMAT_VERSION})"
        )
    return m


def read_arrays(
    out: Path, manifest: dict[str, Any], stores: list[str] | None = None
) -> list[dict[str, Any]]:
    """The array records of ``stores`` (default: all), from their tables in ``manifest.d/``.

    Each table must hash to the sha256 the manifest records for it and hold the counted arrays.
    """
    out = Path(out)
    names = stores if stores is not None else list(manifest["stores"])
    records: list[dict[str, Any]] = []
    for store in names:
        entry = manifest["stores"].get(store)
        if entry is None:
            raise LoaderError(f"{out}: the manifest has no store {store!r}")
        if "table" not in entry:
            raise LoaderError(
                f"{out}: {MANIFEST} names no array table for store {store}: "
                "not an output this version can read; convert again"
            )
        path = out / entry["table"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LoaderError(f"{path}: missing (the array table of store {store})") from None
        if hashlib.sha256(data).hexdigest() != entry["table_sha256"]:
            raise LoaderError(f"{path}: does not match the sha256 recorded in {MANIFEST}")
        table = json.loads(data)
        if table.get("format") != TABLE_FORMAT or len(table["arrays"]) != entry["arrays"]:
            raise LoaderError(f"{path}: not the array table the manifest describes")
        records.extend(table["arrays"])
    return records


def store_metadata(out: Path, store: str) -> dict[str, dict[str, Any]]:
    """Array path -> zarr.json contents, from the store's consolidated root metadata."""
    root = store_dir(out, store) / "zarr.json"
    try:
        meta = json.loads(root.read_bytes())
    except FileNotFoundError:
        raise LoaderError(f"{root}: missing (store {store} was not written)") from None
    except json.JSONDecodeError as e:
        raise LoaderError(f"{root}: not valid JSON ({e})") from None
    consolidated = (meta.get("consolidated_metadata") or {}).get("metadata")
    if consolidated is None:
        raise LoaderError(f"{root}: no consolidated metadata (the store was not finished)")
    return {k: v for k, v in consolidated.items() if v.get("node_type") == "array"}


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
