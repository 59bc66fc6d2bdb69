"""The dry-run plan as data (``--dry-run --json``) and as aligned text."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from loader.display import ranges, size
from loader.format import SHARED
from mimo import hbm
from pipeline.plan import Plan, build_plan

METADATA_BYTES_PER_ARRAY = 1024  # zarr.json of an array and its share of group metadata


def plan_summary(
    plan: Plan,
    workers: int,
    peak: int,
    origin: dict[str, Any],
    max_seq_len: int = 4096,
    lnc: int = 2,
) -> dict[str, Any]:
    """Everything ``--dry-run`` reports, JSON-ready and stable; ``hbm`` is the Trainium2 memory
    plan of a rank serving ``max_seq_len`` tokens at ``lnc`` (:mod:`mimo.hbm`)."""
    cfg, opts = plan.config, plan.options
    per_store = plan.store_bytes()
    devices = [b for s, b in per_store.items() if s != SHARED]
    kinds: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    counts: dict[str, int] = {}
    for _, a in plan.arrays():
        counts[a.store] = counts.get(a.store, 0) + 1
        m = re.match(r"layers/(\d+)/(.*)", a.path)
        pattern = f"layers/L/{m.group(2)}" if m else a.path
        store = "shared" if a.store == SHARED else "device"
        key = (store, pattern, a.shape, a.dtype)
        k = kinds.setdefault(
            key,
            {
                "store": store,
                "path": pattern,
                "shape": list(a.shape),
                "dtype": a.dtype,
                "bytes": a.nbytes,
                "layers": [],
                "arrays": 0,
            },
        )
        k["arrays"] += 1
        if m and int(m.group(1)) not in k["layers"]:
            k["layers"].append(int(m.group(1)))
    for k in kinds.values():
        k["layer_count"] = len(k["layers"])
        k["layers"] = ranges(k["layers"]) if k["layers"] else None
    total = sum(per_store.values())
    n_arrays = sum(counts.values())
    out = {
        "model": "MiMoV2FlashForCausalLM",
        "origin": origin,
        "config": {
            "layers": cfg.num_hidden_layers,
            "experts": cfg.n_routed_experts,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
        },
        "options": opts.to_dict(),
        "layers_converted": len(plan.layers),
        "units": len(plan.units),
        "arrays": n_arrays,
        "arrays_per_device": max(v for k, v in counts.items() if k != SHARED),
        "bytes": {
            "total": total,
            "shared": per_store[SHARED],
            "per_device_max": max(devices),
            "per_device_min": min(devices),
            "metadata_estimate": n_arrays * METADATA_BYTES_PER_ARRAY,
        },
        "disk_total": total + n_arrays * METADATA_BYTES_PER_ARRAY,
        "source_bytes": plan.source_bytes(),
        "workers": workers,
        "expected_peak_memory": peak,
        "by_expert_dtype": by_expert_dtype(plan),
        "kinds": list(kinds.values()),
    }
    out["hbm"] = hbm.plan_from_manifest(out, cfg, max_seq_len, lnc)
    out["hbm_fits_by_lnc"] = {
        str(n): hbm.plan_from_manifest(out, cfg, max_seq_len, n)["fits"] for n in (1, 2)
    }
    return out


def by_expert_dtype(plan: Plan) -> dict[str, dict[str, int]]:
    """Bytes per device (largest), shared and in total with each ``--expert-dtype`` (the two FP8
    encodings take the same bytes)."""
    out = {}
    for dtype in ("bfloat16", "float8"):
        opts = replace(plan.options, expert_dtype="float8_e4m3fn" if dtype == "float8" else dtype)
        if dtype == plan.options.expert_dtype[: len(dtype)] or plan.config.quant is None:
            other = plan
        else:
            other = build_plan(plan.config, opts)
        per_store = other.store_bytes()
        out[dtype] = {
            "per_device_max": max(b for s, b in per_store.items() if s != SHARED),
            "shared": per_store[SHARED],
            "total": sum(per_store.values()),
        }
    return out


def plan_report(s: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`plan_summary`."""
    o, b = s["options"], s["bytes"]
    origin = s["origin"]
    src = origin.get("repo_id") or origin.get("path") or origin.get("config")
    lines = [
        f"mimo-shard plan: {s['model']} from {src}",
        f"  model        {s['config']['layers']} layers, {s['config']['experts']} experts, "
        f"hidden {s['config']['hidden_size']}, vocab {s['config']['vocab_size']}",
        f"  options      devices {o['devices']}, dtype {o['dtype']}, "
        f"layers {ranges(o['layers'])}, experts {ranges(o['experts'])}"
        + (f", expert dtype {o['expert_dtype']}" if "expert_dtype" in o else ""),
        f"  per device   {size(b['per_device_max'])} in {s['arrays_per_device']} arrays",
        f"  shared       {size(b['shared'])}",
        f"  total disk   {size(s['disk_total'])} ({s['arrays']} arrays, {s['units']} units)",
        f"  source data  {size(s['source_bytes'])} (replicated KV heads are read by each device)",
        f"  peak memory  {s['expected_peak_memory'] / 1e9:.2f} GB expected "
        f"with {s['workers']} workers",
        "  experts as   "
        + "; ".join(
            f"{d}: {size(v['per_device_max'])} per device, {size(v['total'])} in all"
            for d, v in s["by_expert_dtype"].items()
        ),
        "",
        *("  " + line for line in hbm.render(s["hbm"]).splitlines()),
        "  fits at     "
        + ", ".join(f"lnc {n}: {'yes' if ok else 'no'}" for n, ok in s["hbm_fits_by_lnc"].items()),
        "",
        f"  {'store':7} {'array':28} {'shape':>22} {'dtype':>9} {'layers':>14} {'bytes each':>12}",
    ]
    for k in s["kinds"]:
        shape = "x".join(str(d) for d in k["shape"])
        layers = k["layers"] or "-"
        if len(layers) > 14:
            layers = f"{k['layer_count']} layers"
        lines.append(
            f"  {k['store']:7} {k['path']:28} {shape:>22} {k['dtype']:>9} "
            f"{layers:>14} {k['bytes']:>12,}"
        )
    lines += host_lines(s.get("hosts"))
    return "\n".join(lines)


def host_lines(hosts: list[dict[str, Any]] | None) -> list[str]:
    """The per-host table of a multi-host dry run (``--hosts``); none without it."""
    if not hosts:
        return []
    download = all("download_bytes" in h for h in hosts)
    head = f"  {'host':>4} {'devices':>12} {'source read':>12}"
    head += f" {'download':>12}" if download else ""
    lines = ["", head + f" {'written':>12} {'disk needed':>12}"]
    for h in hosts:
        row = f"  {h['rank']:>4} {ranges(h['devices']):>12} {size(h['read_bytes']):>12}"
        row += f" {size(h['download_bytes']):>12}" if download else ""
        lines.append(row + f" {size(h['write_bytes']):>12} {size(h['disk_bytes']):>12}")
    return lines
