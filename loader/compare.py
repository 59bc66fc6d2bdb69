"""Comparing two outputs: options, config, arrays by manifest record, and chunk bytes."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loader.verify import chunk_crc32
from mimo.config import MiMoConfig


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Config fields that differ (manifests of either normalised form compare by meaning)."""
    ca, cb = MiMoConfig.from_dict(a).to_dict(), MiMoConfig.from_dict(b).to_dict()
    return sorted(k for k in ca if k != "format" and ca[k] != cb.get(k))


def differences(
    a: dict[str, Any],
    b: dict[str, Any],
    chunks: dict[tuple[str, str], tuple[str | None, str | None]] | None = None,
) -> dict[str, Any]:
    """The ``diff --json`` document: what differs in content between two manifests.

    ``chunks`` (``diff --verify``): (store, path) -> the CRC32 recomputed from each side's chunk
    file (None: unreadable) for the common arrays; a pair that differs is a ``chunk`` change.
    Without it only the manifests are compared; with it the document adds
    ``"compared": "chunks"``.
    """
    opts = {
        k: {"a": a["options"].get(k), "b": b["options"].get(k)}
        for k in {**a["options"], **b["options"]}
        if a["options"].get(k) != b["options"].get(k)
    }
    cfg = config_differences(a["model"]["config"], b["model"]["config"])
    ia = {(x["store"], x["path"]): x for x in a["arrays"]}
    ib = {(x["store"], x["path"]): x for x in b["arrays"]}
    changed = []
    for key in sorted(ia.keys() & ib.keys()):
        fields = [f for f in ("shape", "dtype", "checksum") if ia[key][f] != ib[key][f]]
        va, vb = {f: ia[key][f] for f in fields}, {f: ib[key][f] for f in fields}
        if chunks is not None and chunks[key][0] != chunks[key][1]:
            fields.append("chunk")
            va["chunk"], vb["chunk"] = (c or "unreadable" for c in chunks[key])
        if fields:
            changed.append({"store": key[0], "path": key[1], "fields": fields, "a": va, "b": vb})
    only_a = [{"store": s, "path": p} for s, p in sorted(ia.keys() - ib.keys())]
    only_b = [{"store": s, "path": p} for s, p in sorted(ib.keys() - ia.keys())]
    same_source = a["source"]["index_sha256"] == b["source"]["index_sha256"]
    return {
        "identical": not (opts or cfg or changed or only_a or only_b),
        "options": opts,
        "config": cfg,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "changed": changed,
        "same_source_index": same_source,
        "arrays": {"a": len(ia), "b": len(ib), "common": len(ia.keys() & ib.keys())},
        **({} if chunks is None else {"compared": "chunks"}),
    }


def chunk_checksums(
    a_out: Path, a: dict[str, Any], b_out: Path, b: dict[str, Any], quiet: bool = True
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(store, path) -> CRC32 recomputed from A's and B's chunk files, for the common arrays."""
    ia = {(x["store"], x["path"]): x for x in a["arrays"]}
    ib = {(x["store"], x["path"]): x for x in b["arrays"]}
    common = sorted(ia.keys() & ib.keys())
    jobs = [(a_out, ia[k]) for k in common] + [(b_out, ib[k]) for k in common]
    bar = tqdm(
        total=sum(r["bytes"] for _, r in jobs),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="diff",
        disable=quiet,
        file=sys.stderr,
    )

    def one(job: tuple[Path, dict[str, Any]]) -> str | None:
        crc = chunk_crc32(*job)
        bar.update(job[1]["bytes"])
        return crc

    with ThreadPoolExecutor(max_workers=2) as pool:
        crcs = list(pool.map(one, jobs))
    bar.close()
    n = len(common)
    return {k: (crcs[i], crcs[n + i]) for i, k in enumerate(common)}
