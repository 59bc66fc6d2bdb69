"""mimo-shard's engine: validate, plan, execute units in parallel, journal, commit the manifest.

Order of work:

1. read the source config, index and headers and check them against the plan (no output yet);
2. decide what OUT holds: nothing, a finished output, or a resumable run of the same source and
   options (anything else is refused unless ``force``);
3. lock OUT, copy the config and tokenizer files, execute the pending units on ``workers``
   threads in plan order (source files in order; a file is released once no pending unit needs
   it), journaling units after their bytes are durable;
4. consolidate each store's metadata, write ``manifest.json`` atomically, drop the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loader.format import (
    FORMAT,
    FORMAT_VERSION,
    SHARED,
    TABLE_FORMAT,
    chunk_path,
    store_dir,
    table_path,
)
from pipeline.buffers import POOL_BYTES
from pipeline.errors import InputError
from pipeline.journal import OutputDir, atomic_write, sync_filesystem
from pipeline.plan import Plan, Unit, build_plan, make_options
from pipeline.source import EXTRA_FILES, Checked, Source, load_config, open_checked
from pipeline.store import consolidate, create_store
from pipeline.transforms import UnitContext, run_unit, working_set

COMMIT_SECONDS = float(os.environ.get("MIMO_SHARD_COMMIT_SECONDS", "1.0"))  # journal this often
COMMIT_BYTES = 1 << 30  # ... or after this many output bytes
BASELINE_RSS = 160 << 20  # interpreter, numpy, zarr, tqdm
QUEUED_AHEAD = 2  # units submitted beyond the running ones (they hold no memory until they start)
SOURCE_POLL_SECONDS = 0.05  # how often to look for downloaded files (sources that download)


def tool_version() -> str:
    try:
        return version("mimo-shard")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass
class Summary:
    """What a run did (printed at the end, returned to callers and tests)."""

    out: Path
    units: int = 0
    resumed: int = 0
    arrays: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.already_complete:
            return f"{self.out}: already complete (manifest.json present, same source and options)"
        rate = self.bytes_out / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"converted {self.units} units ({self.resumed} resumed) into {self.arrays} arrays: "
            f"read {self.bytes_in / 1e9:.3f} GB, wrote {self.bytes_out / 1e9:.3f} GB in "
            f"{self.seconds:.1f} s ({rate:.0f} MB/s written)"
        )


def make_plan(
    source: Source,
    devices: int,
    dtype: str = "bfloat16",
    layers: str | None = None,
    experts: str | None = None,
) -> tuple[Plan, bytes]:
    """Read the source config and build the plan for these options (no headers read yet)."""
    raw, cfg = load_config(source)
    options = make_options(cfg, devices, dtype, layers, experts)
    return build_plan(cfg, options), raw


def needed_tensors(plan: Plan) -> list[str]:
    seen: dict[str, None] = {}
    for u in plan.units:
        for s in u.sources:
            seen.setdefault(s)
    return list(seen)


def fingerprint(checked: Checked, plan: Plan) -> str:
    ident = {
        "format_version": FORMAT_VERSION,
        "config_sha256": hashlib.sha256(checked.raw_config).hexdigest(),
        "index_sha256": checked.index_sha256,
        "files": checked.file_sizes,
        "options": plan.options.to_dict(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def peak_memory(plan: Plan, workers: int) -> int:
    """An upper estimate of peak RSS: a baseline plus, per worker, its bounded buffer pool or the
    largest unit's working set, whichever is larger."""
    shapes = {n: s.shape for n, s in plan.inventory.items()}
    largest = max(working_set(u, shapes) for u in plan.units)
    return BASELINE_RSS + workers * max(POOL_BYTES, largest)


def convert(
    source: Source,
    out: str | Path,
    devices: int,
    *,
    dtype: str = "bfloat16",
    layers: str | None = None,
    experts: str | None = None,
    workers: int = 2,
    force: bool = False,
    progress: bool = True,
) -> Summary:
    """Convert ``source`` into ``out`` for ``devices`` devices. Raises InputError on bad input."""
    t0 = time.perf_counter()
    out = Path(out)
    if workers < 1:
        raise InputError(f"--workers {workers}: must be >= 1")
    plan, _ = make_plan(source, devices, dtype, layers, experts)
    checked = open_checked(source, needed_tensors(plan), plan.inventory)
    fp = fingerprint(checked, plan)
    od = OutputDir(out)
    od.check_usable()
    summary = Summary(out)

    try:
        existing, complete = od.manifest() or od.run_info(), od.manifest() is not None
    except InputError:  # damaged state: only --force may start over
        if not force:
            raise
        existing, complete = {}, False
    if existing is not None and existing.get("fingerprint") != fp and not force:
        raise InputError(
            f"{out}: holds an output of another source or other options "
            f"({_describe(existing)}); use --force to replace it"
        )
    if complete and not force:
        summary.already_complete = True
        return summary
    small = _small_files(checked)  # read before OUT is touched (a Hub source may fail here)
    od.lock()
    try:
        if force and existing is not None:
            od.clean(existing.get("files", []))  # start clean, whatever the old run was
        return _run(plan, checked, od, fp, small, workers, progress, summary, t0)
    finally:
        od.unlock()


def _describe(info: dict[str, Any]) -> str:
    o = info.get("options", {})
    src = info.get("source", {})
    return (
        f"source {src.get('repo_id') or src.get('path')}, devices {o.get('devices')}, "
        f"dtype {o.get('dtype')}, layers {o.get('layers') or 'all'}, "
        f"experts {o.get('experts') or 'all'}"
    )


def _small_files(checked: Checked) -> dict[str, bytes]:
    """The config (verbatim) and the tokenizer files the source has, to copy into OUT."""
    files = {"config.json": checked.raw_config}
    for name in EXTRA_FILES:
        data = checked.source.read_small(name)
        if data is not None:
            files[name] = data
    return files


def _run(
    plan: Plan,
    checked: Checked,
    od: OutputDir,
    fp: str,
    small: dict[str, bytes],
    workers: int,
    progress: bool,
    summary: Summary,
    t0: float,
) -> Summary:
    from pipeline.source import Reader

    out = od.path
    files = list(small)
    od.begin(  # first: from now on OUT is recognisably mimo-shard's, whatever happens
        {
            "fingerprint": fp,
            "options": plan.options.to_dict(),
            "source": checked.source.describe(),
            "files": files,
            "started": _now(),
        }
    )
    for name, data in small.items():
        atomic_write(out / name, data)
    for store in plan.stores:
        create_store(
            out, store, {"format": FORMAT, "format_version": FORMAT_VERSION, "store": store}
        )
    for p in out.glob("*.zarr/**/*.partial"):  # orphans of a killed run
        p.unlink()

    done = od.journaled()
    records: dict[str, list[dict[str, Any]]] = {}
    pending: list[Unit] = []
    for u in plan.units:
        rec = done.get(u.id)
        if rec is not None and _intact(out, u, rec):
            records[u.id] = rec
        else:
            pending.append(u)
    summary.resumed = len(records)

    reader = Reader(checked)
    file_of = checked.weight_map
    remaining = Counter(f for u in pending for f in {file_of[s] for s in u.sources})
    schedule = getattr(checked.source, "schedule", None)
    if schedule is not None:
        schedule(list(dict.fromkeys(file_of[s] for u in pending for s in u.sources)))
    # A downloading source (pipeline.hub) says which files are on disk: a unit starts once its
    # files are there, so no worker waits for a download while holding the reader; and on error
    # it is closed, so a unit waiting for a download gives up and the pool can shut down.
    on_disk = getattr(checked.source, "ready", None)
    close_source = getattr(checked.source, "close", None)

    def startable(u: Unit) -> bool:
        return on_disk is None or all(on_disk(file_of[s]) for s in u.sources)

    total = sum(u.out_bytes for u in pending)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="convert",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    )
    bar_lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with bar_lock:
            bar.update(n)

    def work(u: Unit) -> list[dict[str, Any]]:
        return run_unit(UnitContext(reader, plan.config, out, on_bytes), u)

    finished: list[tuple[Unit, list[dict[str, Any]]]] = []
    last_commit, uncommitted_bytes = time.monotonic(), 0

    def commit() -> None:
        nonlocal last_commit, uncommitted_bytes
        od.commit([(u.id, rec) for u, rec in finished])
        for u, rec in finished:
            records[u.id] = rec
            for f in {file_of[s] for s in u.sources}:
                remaining[f] -= 1
                if remaining[f] == 0:
                    reader.close(f)
                    checked.source.release(f)
        finished.clear()
        last_commit, uncommitted_bytes = time.monotonic(), 0

    queue = list(reversed(pending))
    running: dict[Future, Unit] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unit") as pool:
        try:
            while queue or running:
                # a few units wait queued so workers stay busy while the main thread syncs
                while queue and len(running) < workers + QUEUED_AHEAD and error is None:
                    if not startable(queue[-1]):
                        if running:
                            break  # its files are downloading: look again shortly
                        commit()  # nothing runs: release finished files, then wait in the unit
                    u = queue.pop()
                    running[pool.submit(work, u)] = u
                if not running:
                    break
                ready, _ = wait(
                    running,
                    timeout=SOURCE_POLL_SECONDS if on_disk is not None else None,
                    return_when=FIRST_COMPLETED,
                )
                for fut in ready:
                    u = running.pop(fut)
                    try:
                        rec = fut.result()
                    except BaseException as e:  # noqa: BLE001 - re-raised after draining
                        error = error or e
                        continue
                    finished.append((u, _records(u, rec)))
                    uncommitted_bytes += u.out_bytes
                if error is None and (
                    time.monotonic() - last_commit >= COMMIT_SECONDS
                    or uncommitted_bytes >= COMMIT_BYTES
                ):
                    commit()
                if error is not None:
                    queue.clear()
                    if close_source is not None:
                        close_source()
        except BaseException as e:
            error = error or e
            queue.clear()
            for fut in running:
                fut.cancel()
        finally:
            if error is not None and close_source is not None:
                close_source()
    commit()  # whatever finished is durable and journaled, error or not
    bar.close()
    reader.close()
    if error is not None:
        raise error

    for store in plan.stores:
        consolidate(out, store)
    sync_filesystem(out)
    manifest, tables = build_manifest(plan, checked, fp, records, files)
    od.finish(manifest, {name: table_bytes(t) for name, t in tables.items()})
    summary.warnings = fused_kv_warnings(records)
    summary.units = len(plan.units) - summary.resumed
    summary.arrays = manifest["totals"]["arrays"]
    summary.bytes_in = reader.bytes_read
    summary.bytes_out = sum(u.out_bytes for u in pending)
    summary.seconds = time.perf_counter() - t0
    return summary


FUSED_KV_MIN = 0.9  # share of fused K/V blocks that must reach the FP8 maximum


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


def _records(u: Unit, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"store": a.store, "path": a.path, **r} for a, r in zip(u.outputs, recs, strict=True)]


def _intact(out: Path, u: Unit, recs: list[dict[str, Any]]) -> bool:
    """A journaled unit still on disk: every chunk file there with its recorded size."""
    if len(recs) != len(u.outputs):
        return False
    for a, r in zip(u.outputs, recs, strict=True):
        p = Path(chunk_path(out, a.store, a.path, a.shape))
        if r.get("bytes") != a.nbytes or not p.is_file() or p.stat().st_size != a.nbytes:
            return False
        if not (store_dir(out, a.store) / a.path / "zarr.json").is_file():
            return False
    return True


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_manifest(
    plan: Plan,
    checked: Checked,
    fp: str,
    records: dict[str, list[dict[str, Any]]],
    files: list[str],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(manifest, array table per store). Schema: ``manifests/manifest.schema.json``.

    The manifest stays small (identity, config, options, layout, per-store totals and the sha256
    of each store's table) so a device opens without parsing every other device's records.
    """
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
                    **({"checks": r["checks"]} if "checks" in r else {}),
                }
            )
    stores = {}
    for s, t in tables.items():
        stores[s] = {
            "path": f"{s}.zarr",
            "arrays": len(t["arrays"]),
            "bytes": sum(a["bytes"] for a in t["arrays"]),
            "table": table_path(s),
            "table_sha256": hashlib.sha256(table_bytes(t)).hexdigest(),
        }
    src = checked.source.describe()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "mimo-shard", "version": tool_version()},
        "created": _now(),
        "fingerprint": fp,
        "model": {
            "architecture": "MiMoV2FlashForCausalLM",
            "config": plan.config.to_dict(),
        },
        "source": {
            **src,
            "config_sha256": hashlib.sha256(checked.raw_config).hexdigest(),
            "index_sha256": checked.index_sha256,
            "files": dict(sorted(checked.file_sizes.items())),
            "tensors": len(checked.weight_map),
            "mtp_layers": checked.mtp_layers,
        },
        "options": plan.options.to_dict(),
        "layout": plan.layout,
        "stores": stores,
        "files": files,
        "totals": {
            "arrays": sum(v["arrays"] for v in stores.values()),
            "bytes": sum(v["bytes"] for v in stores.values()),
            "shared_bytes": stores[SHARED]["bytes"],
        },
    }
    return manifest, tables


def table_bytes(table: dict[str, Any]) -> bytes:
    """The serialised form of an array table (its sha256 is recorded in the manifest)."""
    return (json.dumps(table, separators=(",", ":")) + "\n").encode()
