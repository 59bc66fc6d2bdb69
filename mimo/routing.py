"""Routing statistics: how many tokens chose each expert, per MoE layer, and rank loads.

A statistics file (``mimo-run OUT --record-routing FILE``)::

    {"format": "mimo-shard/routing-stats", "version": 1,
     "model": {"num_hidden_layers": L, "hidden_size": H, "n_routed_experts": E},
     "prompts": P, "tokens": T,
     "layers": {"3": {"tokens": [E ints], "weight": [E floats]}, ...}}

``tokens[e]``: how many tokens chose expert ``e`` on that layer (the expert's *load*);
``weight[e]``: the routing weight they gave it, summed. Files of the same model and layer set
add up (:func:`merge`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mimo.config import MOE, MiMoConfig
from mimo.jsonfile import ConfigError, load_json_file

FORMAT = "mimo-shard/routing-stats"
VERSION = 1
MAX_BYTES = 64 << 20


class StatsError(ValueError):
    """A statistics file that cannot be used; the message names the file."""


def model_identity(cfg: MiMoConfig) -> dict[str, int]:
    """What statistics files must share to be added together."""
    return {
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "n_routed_experts": cfg.n_routed_experts,
    }


def empty(cfg: MiMoConfig, layers: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Statistics with nothing counted, for the MoE layers among ``layers``."""
    e = cfg.n_routed_experts
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(cfg),
        "prompts": 0,
        "tokens": 0,
        "layers": {
            str(i): {"tokens": [0] * e, "weight": [0.0] * e}
            for i in layers
            if cfg.mlp_types[i] == MOE
        },
    }


def add(stats: dict[str, Any], layer: int, weights: np.ndarray, idx: np.ndarray) -> None:
    """Count one call of the router: weights (T, k) float32, idx (T, k) expert ids."""
    row = stats["layers"][str(layer)]
    e = len(row["tokens"])
    ids = np.asarray(idx, np.int64).ravel()
    counts = np.bincount(ids, minlength=e)
    sums = np.bincount(ids, weights=np.asarray(weights, np.float64).ravel(), minlength=e)
    row["tokens"] = [a + int(b) for a, b in zip(row["tokens"], counts, strict=True)]
    row["weight"] = [a + float(b) for a, b in zip(row["weight"], sums, strict=True)]


def read(path: Path) -> dict[str, Any]:
    """A statistics file, checked for form: ``tokens`` and ``weight`` of E numbers per layer."""
    try:
        s = load_json_file(path, MAX_BYTES)
    except ConfigError as e:
        raise StatsError(str(e)) from None
    if s.get("format") != FORMAT:
        raise StatsError(f"{path}: not a routing-statistics file (format {FORMAT!r})")
    if s.get("version") != VERSION:
        raise StatsError(f"{path}: version {s.get('version')!r}; this tool reads {VERSION}")
    model, layers = s.get("model"), s.get("layers")
    if not isinstance(model, dict) or not isinstance(layers, dict):
        raise StatsError(f"{path}: 'model' and 'layers' must be objects")
    e = model.get("n_routed_experts")
    for key, row in layers.items():
        ok = (
            key.isdigit()
            and isinstance(row, dict)
            and all(isinstance(row.get(f), list) and len(row[f]) == e for f in ("tokens", "weight"))
            and all(type(x) is int and x >= 0 for x in row["tokens"])
            and all(type(x) in (int, float) for x in row["weight"])
        )
        if not ok:
            raise StatsError(f"{path}: layer {key!r}: needs 'tokens' and 'weight' of {e} numbers")
    return s


def merge(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` added to the statistics in ``path`` when it exists (same model and layers)."""
    if not Path(path).exists():
        return new
    old = read(path)
    if old["model"] != new["model"] or set(old["layers"]) != set(new["layers"]):
        raise StatsError(
            f"{path}: statistics of another model or layer set ({old['model']}, layers "
            f"{','.join(sorted(old['layers'], key=int))}); give another file"
        )
    return {
        **old,
        "prompts": old.get("prompts", 0) + new["prompts"],
        "tokens": old.get("tokens", 0) + new["tokens"],
        "layers": {
            k: {
                f: [a + b for a, b in zip(old["layers"][k][f], new["layers"][k][f], strict=True)]
                for f in ("tokens", "weight")
            }
            for k in new["layers"]
        },
    }


def rank_loads(blocks: list[list[int]], load: list[float]) -> list[float]:
    """Expected load of each rank: each slot carries its expert's load / the expert's replicas."""
    replicas: dict[int, int] = {}
    for slots in blocks:
        for e in slots:
            replicas[e] = replicas.get(e, 0) + 1
    return [sum(load[e] / replicas[e] for e in slots) for slots in blocks]


def imbalance(blocks: list[list[int]], load: list[float]) -> float:
    """max / mean of :func:`rank_loads` (1.0: balanced, or nothing loaded)."""
    loads = rank_loads(blocks, load)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
