"""Auditing an output against a checkpoint: which source tensor each array used, which were
skipped and why, and whether the checkpoint is the one the output was converted from."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from loader.manifest import INDEX, LoaderError, read_regular
from mimo import names


def audit_report(m: dict[str, Any], weight_map: dict[str, str]) -> dict[str, Any]:
    """Each tensor of the source index: used by which arrays, skipped, or unexpected."""
    used: dict[str, list[str]] = {}
    for a in m["arrays"]:
        for s in a["sources"]:
            used.setdefault(s, []).append(f"{a['store']}/{a['path']}")
    layers, experts = m["options"]["layers"], m["options"]["experts"]
    tensors, reasons = {}, Counter()
    for name in sorted(weight_map):
        if name in used:
            entry = {"status": "used", "arrays": used[name]}
        else:
            why = _skip_reason(name, layers, experts)
            entry = {"status": "skipped", "reason": why} if why else {"status": "unexpected"}
            reasons[why or "unexpected"] += 1
        tensors[name] = entry
    missing = sorted(set(used) - set(weight_map))
    return {
        "tensors": tensors,
        "counts": {
            "total": len(weight_map),
            "used": sum(t["status"] == "used" for t in tensors.values()),
            "skipped": sum(t["status"] == "skipped" for t in tensors.values()),
            "unexpected": sum(t["status"] == "unexpected" for t in tensors.values()),
        },
        "skipped_reasons": {k: v for k, v in sorted(reasons.items()) if k != "unexpected"},
        "sources_missing_from_index": missing,
    }


def _skip_reason(name: str, layers: list[int] | None, experts: list[int] | None) -> str | None:
    n = names.parse(name)
    if n is None:
        return None
    if n.is_mtp:
        return "MTP layer (multi-token prediction is not converted)"
    if n.layer is not None and layers is not None and n.layer not in layers:
        return "layer outside the --layers subset"
    if n.expert is not None and experts is not None and n.expert not in experts:
        return "expert outside the --experts subset"
    return None


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local Hugging Face cache snapshot of ``repo_id`` at ``revision`` (offline: no network).

    The cache is ``$HF_HUB_CACHE`` when set (read at call time), else huggingface_hub's default.
    """
    from huggingface_hub import snapshot_download

    rev = revision or "main"
    try:
        path = snapshot_download(
            repo_id,
            revision=rev,
            local_files_only=True,
            allow_patterns=["*.json"],
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, an invalid repo id
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoaderError(
            f"{repo_id}: not a folder, and revision {rev} is not in the local Hugging Face cache "
            f"(audit never downloads; {why})"
        ) from None
    return Path(path)


def source_files(m: dict[str, Any], source: str, revision: str | None) -> tuple[Path, Path | None]:
    """(index file, config.json or None) of SOURCE: a folder, an index file, or a cached repo id.

    A repo id's revision defaults to the commit the output was converted from when the output
    came from that repository, else ``main``.
    """
    p = Path(source)
    if p.is_dir():
        return p / INDEX, p / "config.json"
    if p.exists():
        return p, None
    if not _REPO_ID.match(source):
        raise LoaderError(f"{source}: no such folder or file, and not a Hub repo id (org/name)")
    src = m["source"]
    if revision is None and src.get("repo_id") == source:
        revision = src.get("revision")
    snap = cached_snapshot(source, revision)
    return snap / INDEX, snap / "config.json"


def file_sha256(path: Path, what: str) -> tuple[bytes, str]:
    data = read_regular(path, what)
    return data, hashlib.sha256(data).hexdigest()


def source_check(
    m: dict[str, Any], index_sha256: str, config_sha256: str | None
) -> dict[str, dict[str, Any]]:
    """SOURCE's index (and config) sha256 against those OUT recorded, each with ``match``.

    ``audit --json`` lists the mismatched ones under ``source_mismatch``.
    """
    src = m["source"]
    out = {"index_sha256": {"output": src["index_sha256"], "source": index_sha256}}
    if config_sha256 is not None:
        out["config_sha256"] = {"output": src["config_sha256"], "source": config_sha256}
    for v in out.values():
        v["match"] = v["output"] == v["source"]
    return out
