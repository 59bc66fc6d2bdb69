"""Reading a mimo-shard output's manifest and array tables (``docs/format.md``), without zarr.

:func:`read_manifest` refuses what is not a complete output of a supported format version;
:func:`read_arrays` returns a store's array records after checking its table against the sha256
the manifest recorded; :func:`store_metadata` reads a store's consolidated zarr metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loader.format import FORMAT, FORMAT_VERSION, MANIFEST, TABLE_FORMAT, store_dir


class LoaderError(Exception):
    """An output that cannot be used as it is; the message names the array or file at fault."""


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
