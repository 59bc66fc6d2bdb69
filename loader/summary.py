"""Summaries of an output: ``mimo-manifest show``'s document, and arrays by layout row."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loader.format import SHARED
from mimo.config import FULL, MOE, MiMoConfig
from mimo.layout import ARRAYS


def summary(out: Path, m: dict[str, Any]) -> dict[str, Any]:
    """The ``show --json`` document."""
    cfg = MiMoConfig.from_dict(m["model"]["config"])
    o, src = m["options"], m["source"]
    layers = o["layers"] if o["layers"] is not None else list(range(cfg.num_hidden_layers))
    devices = {k: v for k, v in m["stores"].items() if k != SHARED}
    emap = m["layout"]["expert_map"]
    per_device = sorted({len(v[0]) for v in emap.values()}) if emap else []
    full = [i for i in layers if cfg.layer_types[i] == FULL]
    q_per_device = {cfg.layer(i).q_heads // o["devices"] for i in layers}
    return {
        "out": str(out),
        "format_version": m["format_version"],
        "tool": m["tool"],
        "created": m["created"],
        "model": {
            "architecture": m["model"]["architecture"],
            "layers": cfg.num_hidden_layers,
            "full_attention_layers": [
                i for i in range(cfg.num_hidden_layers) if cfg.layer_types[i] == FULL
            ],
            "experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
        },
        "source": {
            "kind": src["kind"],
            "location": src.get("repo_id") or src.get("path"),
            "revision": src.get("revision"),
            "index_sha256": src["index_sha256"],
            "files": len(src["files"]),
            "mtp_layers_skipped": src["mtp_layers"],
        },
        "options": o,
        "subsets": {"layers": o["layers"], "experts": o["experts"]},
        "layout": {
            "devices": o["devices"],
            "query_heads_per_device": sorted(q_per_device),
            "kv_heads_replicated": any(cfg.layer(i).kv_heads < o["devices"] for i in layers),
            "experts_per_device_per_layer": per_device,
            "moe_layers": len(emap),
            "contiguous_expert_map": all(
                b == list(range(b[0], b[0] + len(b))) for v in emap.values() for b in v
            ),
            "vocab_per_device": m["layout"]["vocab"][0][1] - m["layout"]["vocab"][0][0],
            "converted_layers": len(layers),
            "converted_full_attention_layers": len(full),
            "converted_moe_layers": sum(cfg.mlp_types[i] == MOE for i in layers),
        },
        "stores": {
            "shared": m["stores"][SHARED],
            "device_bytes_min": min(v["bytes"] for v in devices.values()),
            "device_bytes_max": max(v["bytes"] for v in devices.values()),
            "device_arrays_max": max(v["arrays"] for v in devices.values()),
        },
        "totals": m["totals"],
        **({"hosts": m["hosts"]} if "hosts" in m else {}),
    }


def kind_summary(arrays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Arrays grouped by their layout row (``mimo.layout.ARRAYS``), table order: the row's path
    template, store, split, array count and bytes; rows the output lacks are left out."""
    by_path = {}
    for a in arrays:
        key = re.sub(r"^layers/\d+/", "layers/{layer}/", a["path"])
        by_path.setdefault(key, []).append(a)
    rows = []
    for k in ARRAYS:
        found = by_path.get(k.path, [])
        if found:
            rows.append(
                {
                    "kind": k.path,
                    "store": k.store,
                    "split": k.split,
                    "arrays": len(found),
                    "bytes": sum(a["bytes"] for a in found),
                    "dtypes": sorted({a["dtype"] for a in found}),
                }
            )
    return rows
