"""Writing the manifest: the small ``manifest.json`` and one array table per store.

Schema: ``manifests/manifest.schema.json``; the format is described in ``docs/format.md``.
The manifest stays small (identity, config, options, layout, per-store totals and the sha256
of each store's table) so a device opens without parsing every other device's records.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from loader.format import FORMAT, FORMAT_VERSION, SHARED, TABLE_FORMAT, table_path
from pipeline.plan import Plan
from pipeline.source import ValidatedSource

RECORD_EXTRAS = ("checks", "encoding", "scale_of", "nonfinite")  # optional record fields
FUSED_KV_MIN = 0.9  # share of fused K/V blocks that must reach the FP8 maximum


def tool_version() -> str:
    try:
        return version("mimo-shard")
    except PackageNotFoundError:
        return "0.0.0"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_manifest(
    plan: Plan,
    checked: ValidatedSource,
    fp: str,
    records: dict[str, list[dict[str, Any]]],
    files: list[str],
    allow_nonfinite: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(manifest, array table per store) for a finished run; ``records[unit id]`` holds each
    output's ``bytes``/``checksum`` (and ``checks``) in the unit's output order.
    ``allow_nonfinite`` is recorded in ``options`` only when set."""
    tables: dict[str, dict[str, Any]] = {
        s: {"format": TABLE_FORMAT, "format_version": FORMAT_VERSION, "store": s, "arrays": []}
        for s in plan.stores
    }
    for u in plan.units:
        for a, r in zip(u.outputs, records[u.id], strict=True):
            tables[a.store]["arrays"].append(
                {
                    "store": a.store,
                    "path": a.path,
                    "shape": list(a.shape),
                    "dtype": a.dtype,
                    "bytes": a.nbytes,
                    "checksum": r["checksum"],
                    "sources": list(u.sources),
                    "transform": {"name": u.transform, "params": u.params},
                    "unit": u.id,
                    **{k: r[k] for k in RECORD_EXTRAS if k in r},
                }
            )
    options = plan.options.to_dict() | ({"allow_nonfinite": True} if allow_nonfinite else {})
    stores = {}
    for s, t in tables.items():
        stores[s] = {
            "path": f"{s}.zarr",
            "arrays": len(t["arrays"]),
            "bytes": sum(a["bytes"] for a in t["arrays"]),
            "table": table_path(s),
            "table_sha256": hashlib.sha256(table_bytes(t)).hexdigest(),
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "mimo-shard", "version": tool_version()},
        "created": now(),
        "fingerprint": fp,
        "model": {"architecture": "MiMoV2FlashForCausalLM", "config": plan.config.to_dict()},
        "source": {
            **checked.source.describe(),
            "config_sha256": hashlib.sha256(checked.raw_config).hexdigest(),
            "index_sha256": checked.index_sha256,
            "files": dict(sorted(checked.file_sizes.items())),
            "tensors": len(checked.weight_map),
            "mtp_layers": checked.mtp_layers,
        },
        "options": options,
        "layout": plan.layout,
        "stores": stores,
        "files": files,
        "totals": {
            "arrays": sum(v["arrays"] for v in stores.values()),
            "bytes": sum(v["bytes"] for v in stores.values()),
            "shared_bytes": stores[SHARED]["bytes"],
        },
    }
    tensor_sha = {
        t: h
        for recs in records.values()
        for r in recs
        for t, h in r.get("source_sha256", {}).items()
    }
    if tensor_sha:  # tensors fetched by byte ranges (the Hub hashes whole files only)
        manifest["source"]["tensor_sha256"] = dict(sorted(tensor_sha.items()))
    if plan.options.host_devices is not None:
        manifest["hosts"] = {
            **plan.options.hosts_dict(),
            "layout": layout_fingerprint(checked, plan),
        }
    return manifest, tables


def layout_fingerprint(checked: ValidatedSource, plan: Plan) -> str:
    """What every host's part of one multi-host output shares: the source's content and the
    options but for the host selection (not the files read, nor their local identity: both
    differ per host).
    """
    options = {k: v for k, v in plan.options.to_dict().items() if k != "hosts"}
    ident = {
        "format_version": FORMAT_VERSION,
        "config_sha256": hashlib.sha256(checked.raw_config).hexdigest(),
        "index_sha256": checked.index_sha256,
        "options": options,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def table_bytes(table: dict[str, Any]) -> bytes:
    """The serialised form of an array table (its sha256 is recorded in the manifest)."""
    return (json.dumps(table, separators=(",", ":")) + "\n").encode()


def fused_kv_warnings(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Warnings for layers whose K/V codes do not support the per-head fused scale reading."""
    per_layer: dict[str, list[int]] = {}
    for unit, recs in records.items():
        for r in recs:
            c = r.get("checks", {}).get("fused_kv")
            if c:
                layer = unit.split("/")[1]
                tot = per_layer.setdefault(layer, [0, 0])
                tot[0] += c["fused_saturated"]
                tot[1] += c["fused_blocks"]
    return [
        f"layer {layer}: only {ok}/{n} fused [K_h; V_h] scale blocks reach the FP8 maximum (448); "
        "the per-head fused K/V scale reading may not fit this checkpoint: check the layer's "
        "K/V outputs before relying on them"
        for layer, (ok, n) in sorted(per_layer.items(), key=lambda kv: int(kv[0]))
        if n and ok / n < FUSED_KV_MIN
    ]


def nonfinite_records(
    plan: Plan, records: dict[str, list[dict[str, Any]]], units: set[str] | None = None
) -> list[str]:
    """One line per output array recorded with non-finite values (of ``units``, default all):
    the array, the count, its unit's first source tensors (in plan order)."""
    lines = []
    for u in plan.units:
        if units is not None and u.id not in units:
            continue
        for a, r in zip(u.outputs, records.get(u.id, []), strict=False):
            if r.get("nonfinite"):
                shown = ", ".join(f"'{t}'" for t in u.sources[:3])
                more = f" and {len(u.sources) - 3} more" if len(u.sources) > 3 else ""
                lines.append(
                    f"array '{a.store}/{a.path}' holds {r['nonfinite']} non-finite value(s) "
                    f"(NaN or infinity) from tensor {shown}{more}"
                )
    return lines
