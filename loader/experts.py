"""``mimo-manifest experts``: an output's expert placement, and its load under routing statistics.

The placement is the manifest's ``layout.expert_map`` (per MoE layer, each rank's slots); with
statistics (:mod:`mimo.routing`) each rank's expected load is the sum over its slots of the
expert's token count divided by the expert's replica count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loader.display import ranges
from mimo import routing

PLOT_EXTRA = "plot"


def placement_rows(
    manifest: dict[str, Any], stats: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Per MoE layer: ``layer``, ``ranks`` (expert ids per rank) and, with ``stats``, ``loads``
    (per rank) and ``max_over_mean``. Layers the statistics lack have no loads."""
    rows = []
    emap = manifest["layout"]["expert_map"]
    for key in sorted(emap, key=int):
        row: dict[str, Any] = {"layer": int(key), "ranks": emap[key]}
        if stats is not None and key in stats["layers"]:
            load = [float(x) for x in stats["layers"][key]["tokens"]]
            row["loads"] = routing.rank_loads(emap[key], load)
            row["max_over_mean"] = routing.imbalance(emap[key], load)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The text report: one line per layer and rank."""
    out = []
    for row in rows:
        head = f"layer {row['layer']}"
        if "max_over_mean" in row:
            head += f": load max/mean {row['max_over_mean']:.3f}"
        out.append(head)
        for r, ids in enumerate(row["ranks"]):
            line = f"  rank {r:>3}: {ranges(sorted(ids))}"
            if "loads" in row:
                line += f"  (load {row['loads'][r]:.0f})"
            out.append(line)
    return out


def heatmap(rows: list[dict[str, Any]], path: Path) -> None:
    """A PNG of per-rank load / mean load, one row per layer (needs matplotlib: extra ``plot``).

    Raises ImportError naming the extra when matplotlib is missing; ValueError without loads."""
    loaded = [r for r in rows if "loads" in r]
    if not loaded:
        raise ValueError("--png needs --stats covering the output's MoE layers")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            f"--png needs matplotlib: pip install 'mimo-shard[{PLOT_EXTRA}]'"
        ) from None
    grid = []
    for r in loaded:
        mean = sum(r["loads"]) / len(r["loads"]) or 1.0
        grid.append([x / mean for x in r["loads"]])
    fig, ax = plt.subplots(figsize=(max(4, len(grid[0]) * 0.4 + 2), max(3, len(grid) * 0.25 + 1)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("rank")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(loaded)), [str(r["layer"]) for r in loaded])
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
