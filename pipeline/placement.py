"""Expert placement: routing statistics in, a per-layer expert map out.

Routing statistics: :mod:`mimo.routing` (``mimo-run OUT --record-routing FILE`` writes them);
the load of an expert is the number of tokens routed to it.

Expert map (``mimo-shard plan-experts`` writes it, ``mimo-shard --expert-map`` reads it)::

    {"format": "mimo-shard/expert-map", "version": 1, "devices": N, "experts": E,
     "layers": {"3": [[expert ids in rank 0's slots], ..., [rank N-1's]], ...}}

Every rank holds the same number of slots on a layer; every present expert sits in at least one
slot of every listed layer; an expert in several slots is *replicated* (the runtime gives each
replica a share of the expert's tokens). Listed layers must be MoE layers; a converted MoE layer
the file does not list gets the contiguous default.

Placement (:func:`place`): with ``R`` spare slots per rank the hottest experts get extra replicas
one at a time (always the expert with the largest load per replica, as EPLB does; at most one
replica per rank while another expert can take the slot), then the
replicas, each carrying ``load / replicas``, are placed by greedy longest-processing-time: the
heaviest first, on the least-loaded rank with a free slot that does not already hold the expert
(one that does when no other has room: a rank may hold two replicas of one expert).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mimo import routing
from mimo.config import MOE, MiMoConfig
from mimo.jsonfile import ConfigError, load_json_file
from mimo.layout import contiguous_expert_map
from mimo.routing import imbalance
from pipeline.errors import InputError

MAP_FORMAT = "mimo-shard/expert-map"
VERSION = 1
MAX_FILE_BYTES = 64 << 20


def read_stats(path: Path) -> dict[str, Any]:
    """A routing-statistics file (:mod:`mimo.routing`), or InputError naming it."""
    try:
        return routing.read(path)
    except routing.StatsError as e:
        raise InputError(str(e)) from None


# -------------------------------------------------------------------------------- placement
def place(load: list[float], devices: int, spare: int = 0) -> list[list[int]]:
    """Experts (ids ``0..len(load)-1``) in ``devices`` ranks of ``len(load)/devices + spare``
    slots each, balancing :func:`rank_loads` (module docstring). Each rank's ids are sorted."""
    experts = len(load)
    if devices < 1 or experts % devices:
        raise InputError(f"--devices {devices} does not divide the {experts} experts")
    if spare < 0:
        raise InputError(f"--replicas {spare}: must be >= 0")
    per = experts // devices + spare
    replicas = [1] * experts
    for _ in range(devices * spare):  # extra replicas: the largest load per replica first
        spread = [e for e in range(experts) if replicas[e] < devices] or range(experts)
        e = max(spread, key=lambda e: (load[e] / replicas[e], -e))  # at most one per rank
        replicas[e] += 1
    items = sorted(
        ((load[e] / replicas[e], e) for e in range(experts) for _ in range(replicas[e])),
        key=lambda x: (-x[0], x[1]),
    )
    slots: list[list[int]] = [[] for _ in range(devices)]
    totals = [0.0] * devices
    for w, e in items:
        free = [r for r in range(devices) if len(slots[r]) < per]
        fresh = [r for r in free if e not in slots[r]] or free
        r = min(fresh, key=lambda r: (totals[r], r))
        slots[r].append(e)
        totals[r] += w
    return [sorted(s) for s in slots]


def plan_experts(
    stats: dict[str, Any], devices: int, spare: int = 0
) -> tuple[dict[str, Any], list[tuple[int, float, float]]]:
    """(expert-map document, per layer (layer, max/mean before, after)) from statistics.

    The load of an expert is the number of tokens routed to it.
    """
    experts = stats["model"]["n_routed_experts"]
    layers: dict[str, list[list[int]]] = {}
    report = []
    for key in sorted(stats["layers"], key=int):
        load = [float(x) for x in stats["layers"][key]["tokens"]]
        blocks = place(load, devices, spare)
        before = contiguous_expert_map(list(range(experts)), devices)
        layers[key] = blocks
        report.append((int(key), imbalance(before, load), imbalance(blocks, load)))
    doc = {
        "format": MAP_FORMAT,
        "version": VERSION,
        "devices": devices,
        "experts": experts,
        "layers": layers,
    }
    return doc, report


# ---------------------------------------------------------------------------- map files
def read_map(
    path: Path, cfg: MiMoConfig, devices: int, present: list[int] | None = None
) -> dict[int, list[list[int]]]:
    """The expert map in ``path``, validated against ``cfg``, ``devices`` and the converted
    experts ``present`` (default: all). InputError naming the file and the problem."""
    try:
        doc = load_json_file(path, MAX_FILE_BYTES)
    except ConfigError as e:
        raise InputError(str(e)) from None
    if doc.get("format") != MAP_FORMAT:
        raise InputError(f"{path}: not an expert map (format {MAP_FORMAT!r})")
    return validate_map(doc, cfg, devices, present, str(path))


def validate_map(
    doc: dict[str, Any],
    cfg: MiMoConfig,
    devices: int,
    present: list[int] | None,
    where: str,
) -> dict[int, list[list[int]]]:
    """The layers of the expert-map document ``doc`` as {layer: per-rank ids}, or InputError."""
    if doc.get("version") != VERSION:
        raise InputError(f"{where}: version {doc.get('version')!r}, this tool reads {VERSION}")
    e = cfg.n_routed_experts
    if doc.get("devices") != devices:
        have = doc.get("devices")
        raise InputError(f"{where}: a map for {have} devices, not --devices {devices}")
    if doc.get("experts") != e:
        raise InputError(f"{where}: a map of {doc.get('experts')} experts; the model has {e}")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise InputError(f"{where}: 'layers' must map layer numbers to per-rank expert ids")
    want = set(present if present is not None else range(e))
    out: dict[int, list[list[int]]] = {}
    for key, blocks in layers.items():
        if not key.isdigit() or int(key) >= cfg.num_hidden_layers:
            raise InputError(f"{where}: layer {key!r} is not a layer of the model")
        layer = int(key)
        if cfg.mlp_types[layer] != MOE:
            raise InputError(f"{where}: layer {layer} is not a MoE layer")
        if not (
            isinstance(blocks, list)
            and all(isinstance(b, list) and all(type(x) is int for x in b) for b in blocks)
        ):
            raise InputError(f"{where}: layer {layer}: not a list of expert-id lists")
        if len(blocks) != devices:
            raise InputError(f"{where}: layer {layer}: {len(blocks)} ranks, not {devices}")
        if len({len(b) for b in blocks}) != 1 or not blocks[0]:
            sizes = sorted({len(b) for b in blocks})
            raise InputError(f"{where}: layer {layer}: ranks hold {sizes} slots; must be equal")
        ids = [x for b in blocks for x in b]
        bad = sorted({x for x in ids if not 0 <= x < e})
        if bad:
            raise InputError(f"{where}: layer {layer}: expert id {bad[0]} out of range 0-{e - 1}")
        stray = sorted(set(ids) - want)
        if stray:
            raise InputError(f"{where}: layer {layer}: expert {stray[0]} is not converted")
        missing = sorted(want - set(ids))
        if missing:
            raise InputError(f"{where}: layer {layer}: expert {missing[0]} has no slot")
        out[layer] = [list(b) for b in blocks]
    return out


def map_digest(emap: dict[int, list[list[int]]]) -> str:
    """sha256 of an expert map's canonical form (part of the output's options)."""
    canon = json.dumps({str(k): v for k, v in sorted(emap.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def map_document(emap: dict[str, list[list[int]]], devices: int, experts: int) -> dict[str, Any]:
    """The expert-map file of a manifest's ``layout.expert_map``."""
    return {
        "format": MAP_FORMAT,
        "version": VERSION,
        "devices": devices,
        "experts": experts,
        "layers": emap,
    }
