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
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loader.format import FORMAT, FORMAT_VERSION, chunk_path, store_dir
from pipeline.errors import InputError
from pipeline.journal import OutputDir, atomic_write, sync_filesystem
from pipeline.manifest import build_manifest, fused_kv_warnings, now, table_bytes
from pipeline.plan import Plan, Unit, build_plan, make_options
from pipeline.reading import UnitContext
from pipeline.scheduler import Records, run_units
from pipeline.source import EXTRA_FILES, Reader, Source, ValidatedSource, load_config, open_checked
from pipeline.store import consolidate, create_store
from pipeline.transforms import run_unit


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


def fingerprint(checked: ValidatedSource, plan: Plan) -> str:
    ident = {
        "format_version": FORMAT_VERSION,
        "config_sha256": hashlib.sha256(checked.raw_config).hexdigest(),
        "index_sha256": checked.index_sha256,
        "files": checked.file_sizes,
        "options": plan.options.to_dict(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


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
        return _Run(plan, checked, od, fp, small, workers, progress).execute(summary, t0)
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


def _small_files(checked: ValidatedSource) -> dict[str, bytes]:
    """The config (verbatim) and the tokenizer files the source has, to copy into OUT."""
    files = {"config.json": checked.raw_config}
    for name in EXTRA_FILES:
        data = checked.source.read_small(name)
        if data is not None:
            files[name] = data
    return files


@dataclass
class _Run:
    """One locked run over OUT: what to convert, from what, into what."""

    plan: Plan
    checked: ValidatedSource
    od: OutputDir
    fingerprint: str
    small: dict[str, bytes]
    workers: int
    progress: bool

    def execute(self, summary: Summary, t0: float) -> Summary:
        plan, od, out = self.plan, self.od, self.od.path
        files = list(self.small)
        od.begin(  # first: from now on OUT is recognisably mimo-shard's, whatever happens
            {
                "fingerprint": self.fingerprint,
                "options": plan.options.to_dict(),
                "source": self.checked.source.describe(),
                "files": files,
                "started": now(),
            }
        )
        self.prepare_out()
        records, pending = self.resumable()
        summary.resumed = len(records)
        reader = Reader(self.checked)
        try:
            self.convert_units(pending, records, reader)
        finally:
            reader.close()
        for store in plan.stores:
            consolidate(out, store)
        sync_filesystem(out)
        manifest, tables = build_manifest(plan, self.checked, self.fingerprint, records, files)
        od.finish(manifest, {name: table_bytes(t) for name, t in tables.items()})
        summary.warnings = fused_kv_warnings(records)
        summary.units = len(plan.units) - summary.resumed
        summary.arrays = manifest["totals"]["arrays"]
        summary.bytes_in = reader.bytes_read
        summary.bytes_out = sum(u.out_bytes for u in pending)
        summary.seconds = time.perf_counter() - t0
        return summary

    def prepare_out(self) -> None:
        """Small files, the stores' root groups, and no orphan pieces of a killed run."""
        out = self.od.path
        for name, data in self.small.items():
            atomic_write(out / name, data)
        for store in self.plan.stores:
            attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "store": store}
            create_store(out, store, attrs)
        for p in out.glob("*.zarr/**/*.partial"):
            p.unlink()

    def resumable(self) -> tuple[dict[str, Records], list[Unit]]:
        """(records of journaled units still intact on disk, units left to run)."""
        done = self.od.journaled()
        records: dict[str, Records] = {}
        pending: list[Unit] = []
        for u in self.plan.units:
            rec = done.get(u.id)
            if rec is not None and _intact(self.od.path, u, rec):
                records[u.id] = rec
            else:
                pending.append(u)
        return records, pending

    def convert_units(
        self, pending: list[Unit], records: dict[str, Records], reader: Reader
    ) -> None:
        """Run ``pending``; journal each batch and release source files nobody needs any more."""
        source, file_of = self.checked.source, self.checked.weight_map
        remaining = Counter(f for u in pending for f in {file_of[s] for s in u.sources})
        source.schedule(list(dict.fromkeys(file_of[s] for u in pending for s in u.sources)))
        bar = tqdm(
            total=sum(u.out_bytes for u in pending),
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="convert",
            disable=not self.progress,
            file=sys.stderr,
            smoothing=0.1,
        )
        bar_lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with bar_lock:
                bar.update(n)

        def work(u: Unit) -> Records:
            recs = run_unit(UnitContext(reader, self.plan.config, self.od.path, on_bytes), u)
            return _records(u, recs)

        def commit(finished: list[tuple[Unit, Records]]) -> None:
            self.od.commit([(u.id, rec) for u, rec in finished])
            for u, rec in finished:
                records[u.id] = rec
                for f in {file_of[s] for s in u.sources}:
                    remaining[f] -= 1
                    if remaining[f] == 0:
                        reader.close(f)
                        source.release(f)

        try:
            run_units(pending, work, commit, source, file_of, self.workers)
        finally:
            bar.close()


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
