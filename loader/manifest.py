"""Reading a mimo-shard output's manifest and array tables (``docs/format.md``), without zarr.

:func:`read_manifest` refuses what is not a complete output of a supported format version, and
every manifest whose fields do not have the types and sizes a reader relies on; :func:`read_arrays`
returns a store's array records after checking its table against the sha256 the manifest recorded
and each record against the format (safe store and path names, bytes = shape x dtype);
:func:`store_metadata` reads a store's consolidated zarr metadata. Every refusal is a one-line
:class:`LoaderError` naming the file, field or record at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from loader.display import ranges
from loader.format import (
    FORMAT,
    FORMAT_VERSION,
    LOGICAL_DTYPES,
    MANIFEST,
    SHARED,
    STATE_DIR,
    TABLE_FORMAT,
    TABLES,
    device_store,
    store_dir,
    table_path,
)
from mimo.config import MiMoConfig


class LoaderError(Exception):
    """An output that cannot be used as it is; the message names the array or file at fault."""


STORE_NAME = re.compile(r"^(shared|device-[0-9]{3,})$")
ARRAY_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CRC32 = re.compile(r"^crc32:[0-9a-f]{8}$")
INDEX = "model.safetensors.index.json"
MAX_NDIM = 32

# What a reader relies on, as a type spec: a type, None (JSON null), a tuple of alternatives, a
# one-element list ``[spec]`` (a list of such items), or a dict of required key -> spec (an object
# holding at least those keys; readers ignore keys they do not know, docs/format.md §7).
_RANGE = [int]
MANIFEST_SPEC: dict[str, Any] = {
    "format": str,
    "format_version": int,
    "tool": {"name": str, "version": str},
    "created": str,
    "model": {"architecture": str, "config": dict},
    "source": {
        "kind": str,
        "revision": (str, None),
        "config_sha256": str,
        "index_sha256": str,
        "files": dict,
        "mtp_layers": int,
    },
    "options": {"devices": int, "dtype": str, "layers": ([int], None), "experts": ([int], None)},
    "layout": {"attention": dict, "expert_map": dict, "vocab": [_RANGE]},
    "stores": dict,
    "totals": {"arrays": int, "bytes": int},
}
HOSTS_SPEC: dict[str, Any] = {"count": int, "rank": int, "devices": [int], "layout": str}
STORE_SPEC: dict[str, Any] = {"arrays": int, "bytes": int, "table": str, "table_sha256": str}
HEADS_SPEC: list[Any] = [{"q_heads": _RANGE, "kv_heads": _RANGE}]
TABLE_SPEC: dict[str, Any] = {"format": str, "arrays": list}
RECORD_SPEC: dict[str, Any] = {
    "store": str,
    "path": str,
    "shape": [int],
    "dtype": str,
    "bytes": int,
    "checksum": str,
    "sources": [str],
    "transform": {"name": str},
}


def type_problem(value: Any, spec: Any, where: str) -> str | None:
    """Why ``value`` does not fit ``spec`` (see ``MANIFEST_SPEC``), naming the field; None: fits."""
    if isinstance(spec, tuple):
        whys = [type_problem(value, s, where) for s in spec]
        return None if None in whys else whys[0]
    if spec is None:
        return None if value is None else f"{where}: expected null"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {_kind(value)}"
        for key, sub in spec.items():
            if key not in value:
                return f"{where}.{key}: missing"
            why = type_problem(value[key], sub, f"{where}.{key}")
            if why:
                return why
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, got {_kind(value)}"
        for i, item in enumerate(value):
            why = type_problem(item, spec[0], f"{where}[{i}]")
            if why:
                return why
        return None
    if spec is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{where}: expected an integer, got {_kind(value)}"
    if not isinstance(value, spec):
        return f"{where}: expected {_KINDS.get(spec, spec.__name__)}, got {_kind(value)}"
    return None


_KINDS = {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "a boolean"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def read_regular(path: Path, what: str) -> bytes:
    """The bytes of ``path``, refusing what is not a regular file (a FIFO would block a read)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise LoaderError(f"{path}: is {kind}, not {what}")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise LoaderError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise LoaderError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _parse_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoaderError(f"{path}: not valid JSON ({why})") from None


def _not_an_output(out: Path) -> LoaderError:
    """Why a folder without a ``manifest.json`` cannot be read (one message per situation)."""
    if not out.exists():
        return LoaderError(f"{out}: does not exist")
    if not out.is_dir():
        return LoaderError(f"{out}: is a file, not a mimo-shard output folder")
    if (out / STATE_DIR).is_dir():
        return LoaderError(
            f"{out}: no {MANIFEST}: the output is incomplete (a conversion is running, crashed or "
            "was interrupted); rerun the same mimo-shard command to finish it"
        )
    if (out / "config.json").is_file() and (
        (out / INDEX).is_file() or any(out.glob("*.safetensors"))
    ):
        return LoaderError(
            f"{out}: is a checkpoint, not a mimo-shard output: did you mean `mimo-shard {out} OUT`?"
        )
    if (out / TABLES).exists() or any(out.glob("*.zarr")):
        return LoaderError(
            f"{out}: no {MANIFEST}: the output is incomplete or damaged (its stores are there but "
            "no conversion state is left); convert again"
        )
    return LoaderError(
        f"{out}: not a mimo-shard output (no {MANIFEST} and no {STATE_DIR} conversion state)"
    )


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of ``out``; refuses incomplete outputs, unknown formats and malformed fields.

    The one place that decides what a folder without a usable manifest is (missing, a file, a
    checkpoint, not an output, an incomplete output), so every command says the same.
    """
    out = Path(out)
    p = out / MANIFEST
    if not os.path.lexists(p):
        raise _not_an_output(out)
    m = _parse_json(read_regular(p, "a mimo-shard manifest"), p)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise LoaderError(f"{p}: not a mimo-shard manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise LoaderError(
            f"{p}: format version {m.get('format_version')!r} is not supported "
            f"(this loader reads version {FORMAT_VERSION})"
        )
    why = type_problem(m, MANIFEST_SPEC, "manifest") or _consistency_problem(m)
    if why:
        raise LoaderError(f"{p}: {why}")
    return m


def _consistency_problem(m: dict[str, Any]) -> str | None:
    """Why the well-typed manifest ``m`` contradicts itself (stores, layout, subsets)."""
    n = m["options"]["devices"]
    if n < 1:
        return f"options.devices: {n} is not a device count"
    why = _hosts_problem(m.get("hosts"), n)
    if why:
        return why
    want = {SHARED, *(device_store(r) for r in held_devices(m))}
    names = set(m["stores"])
    bad = sorted(s for s in names if not isinstance(s, str) or not STORE_NAME.match(s))
    if bad:
        return f"stores: {bad[0]!r} is not a store name (shared or device-NNN)"
    if names != want:
        held = "hosts.devices" if "hosts" in m else f"options.devices {n}"
        return f"stores: {sorted(names ^ want)[:3]} do not match {held}"
    for s, entry in m["stores"].items():
        why = type_problem(entry, STORE_SPEC, f"stores.{s}")
        if why:
            return why
        if entry["table"] != table_path(s):
            return f"stores.{s}.table: {entry['table']!r} is not {table_path(s)!r}"
        if not SHA256.match(entry["table_sha256"]):
            return f"stores.{s}.table_sha256: not a sha256"
        if entry["arrays"] < 0 or entry["bytes"] < 0:
            return f"stores.{s}: negative count"
    try:
        cfg = MiMoConfig.from_dict(m["model"]["config"])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        return f"model.config: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    for key, count in (("layers", cfg.num_hidden_layers), ("experts", cfg.n_routed_experts)):
        sub = m["options"][key]
        if sub is not None and not all(0 <= i < count for i in sub):
            return f"options.{key}: {sub} is not a subset of 0..{count - 1}"
    layout = m["layout"]
    for key, spec in (("attention", HEADS_SPEC), ("expert_map", [[int]])):
        for layer, per_device in layout[key].items():
            if not layer.isdigit() or int(layer) >= cfg.num_hidden_layers:
                return f"layout.{key}: {layer!r} is not a layer"
            why = type_problem(per_device, spec, f"layout.{key}.{layer}")
            if why:
                return why
            if len(per_device) != n:
                return f"layout.{key}.{layer}: {len(per_device)} entries for {n} devices"
    if len(layout["vocab"]) != n or any(len(r) != 2 for r in layout["vocab"]):
        return f"layout.vocab: not one [start, stop) range for each of {n} devices"
    heads = [d[k] for a in layout["attention"].values() for d in a for k in ("q_heads", "kv_heads")]
    if any(len(r) != 2 for r in heads):
        return "layout.attention: a head range is not [start, stop)"
    return None


def held_devices(m: dict[str, Any]) -> list[int]:
    """The device ranks whose stores the output ``m`` holds: all of them, or for one host's part
    of a multi-host output its ``hosts.devices`` (docs/format.md)."""
    hosts = m.get("hosts")
    return list(hosts["devices"]) if hosts is not None else list(range(m["options"]["devices"]))


def held_elsewhere(m: dict[str, Any], rank: int) -> str | None:
    """Why device ``rank`` (a rank of the layout) cannot be opened from this output: the
    message names the devices it holds; None when it holds ``rank``."""
    held = held_devices(m)
    if rank in held:
        return None
    h = m["hosts"]
    return (
        f"device {rank} is held by another host: this output (host {h['rank']} of {h['count']}) "
        f"holds devices {ranges(held)}"
    )


def _hosts_problem(hosts: Any, n: int) -> str | None:
    """Why a manifest's ``hosts`` (one host's part of a multi-host output) is unusable."""
    if hosts is None:
        return None
    why = type_problem(hosts, HOSTS_SPEC, "hosts")
    if why:
        return why
    if not 0 <= hosts["rank"] < hosts["count"]:
        return f"hosts.rank: {hosts['rank']} is outside 0..{hosts['count'] - 1}"
    devs = hosts["devices"]
    if not devs or devs != sorted(set(devs)) or not all(0 <= d < n for d in devs):
        return f"hosts.devices: not increasing device ranks within 0..{n - 1}"
    return None


def record_problem(rec: Any, store: str) -> str | None:
    """Why the array record ``rec`` of ``store``'s table is unusable; None: it is well formed.

    Store and path must stay inside the output (no absolute path, ``..``, backslash or NUL), the
    dtype must be known and ``bytes`` must equal shape x itemsize.
    """
    why = type_problem(rec, RECORD_SPEC, "record")
    if why:
        return why
    if rec["store"] != store:
        return f"store {rec['store']!r} is not the table's store {store!r}"
    path = rec["path"]
    if not ARRAY_PATH.match(path) or any(seg in (".", "..") for seg in path.split("/")):
        return f"path {path!r} is not a relative array path of [A-Za-z0-9_.-] segments"
    if rec["dtype"] not in LOGICAL_DTYPES:
        return f"dtype {rec['dtype']!r} is not one of {sorted(LOGICAL_DTYPES)}"
    if len(rec["shape"]) > MAX_NDIM or any(d < 0 for d in rec["shape"]):
        return f"shape {rec['shape']} is not a shape (at most {MAX_NDIM} dimensions, none < 0)"
    want = math.prod(rec["shape"]) * LOGICAL_DTYPES[rec["dtype"]].itemsize
    if rec["bytes"] != want:
        return f"bytes {rec['bytes']} != shape {rec['shape']} x {rec['dtype']} ({want})"
    if not CRC32.match(rec["checksum"]):
        return f"checksum {rec['checksum']!r} is not crc32:xxxxxxxx"
    return None


def read_arrays(
    out: Path, manifest: dict[str, Any], stores: list[str] | None = None
) -> list[dict[str, Any]]:
    """The array records of ``stores`` (default: all), from their tables in ``manifest.d/``.

    Each table must hash to the sha256 the manifest records for it and hold the counted arrays,
    each well formed (:func:`record_problem`) and listed once.
    """
    out = Path(out)
    names = stores if stores is not None else list(manifest["stores"])
    records: list[dict[str, Any]] = []
    for store in names:
        if not isinstance(store, str) or not STORE_NAME.match(store):
            raise LoaderError(f"{out}: {store!r} is not a store name (shared or device-NNN)")
        entry = manifest["stores"].get(store)
        if entry is None:
            raise LoaderError(f"{out}: the manifest has no store {store!r}")
        if entry.get("table") != table_path(store):
            raise LoaderError(
                f"{out}: {MANIFEST} names no array table for store {store}: "
                "not an output this version can read; convert again"
            )
        path = out / table_path(store)
        data = read_regular(path, f"the array table of store {store}")
        if hashlib.sha256(data).hexdigest() != entry.get("table_sha256"):
            raise LoaderError(f"{path}: does not match the sha256 recorded in {MANIFEST}")
        table = _parse_json(data, path)
        why = type_problem(table, TABLE_SPEC, "table")
        if why or table["format"] != TABLE_FORMAT or len(table["arrays"]) != entry["arrays"]:
            raise LoaderError(f"{path}: not the array table the manifest describes")
        seen: set[str] = set()
        for i, rec in enumerate(table["arrays"]):
            why = record_problem(rec, store)
            if why is None and rec["path"] in seen:
                why = f"path {rec['path']!r} is listed twice"
            if why:
                name = rec.get("path") if isinstance(rec, dict) else None
                label = f"{store}/{name}" if isinstance(name, str) else store
                raise LoaderError(f"{path}: array {i} ({label!r}): {why}")
            seen.add(rec["path"])
        records.extend(table["arrays"])
    return records


def store_metadata(out: Path, store: str) -> dict[str, dict[str, Any]]:
    """Array path -> zarr.json contents, from the store's consolidated root metadata."""
    root = store_dir(out, store) / "zarr.json"
    try:
        data = read_regular(root, f"the root metadata of store {store}")
    except LoaderError as e:
        if not os.path.lexists(root):
            raise LoaderError(f"{root}: missing (store {store} was not written)") from None
        raise e from None
    meta = _parse_json(data, root)
    consolidated = meta.get("consolidated_metadata") if isinstance(meta, dict) else None
    arrays = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(arrays, dict):
        raise LoaderError(f"{root}: no consolidated metadata (the store was not finished)")
    return {
        k: v for k, v in arrays.items() if isinstance(v, dict) and v.get("node_type") == "array"
    }
