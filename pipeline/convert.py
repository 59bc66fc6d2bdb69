"""mimo-shard's engine: validate, plan, execute units in parallel, journal, commit the manifest.

Order of work:

1. read the source config, index and headers and check them against the plan (no output yet);
2. lock OUT, then decide what it holds: nothing, a finished output, or a resumable run of the
   same source and options (anything else is refused unless ``force``); deciding under the lock
   keeps the answer true while this run acts on it;
3. copy the config and tokenizer files, execute the pending units on ``workers`` threads in
   plan order (source files in order; a file is released once no pending unit needs it),
   journaling units after their bytes are durable;
4. consolidate each store's metadata, write ``manifest.json`` atomically, drop the journal.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loader.format import FORMAT, FORMAT_VERSION, chunk_path, store_dir
from mimo.config import MiMoConfig
from pipeline.errors import InputError
from pipeline.hosts import select_units, tensor_ranges, with_hosts
from pipeline.journal import OutputDir, atomic_write, sync_filesystem
from pipeline.manifest import (
    build_manifest,
    fused_kv_warnings,
    nonfinite_records,
    now,
    table_bytes,
)
from pipeline.memory import default_workers, worker_memory
from pipeline.plan import Options, Plan, Unit, build_plan, make_options
from pipeline.reading import UnitContext
from pipeline.scheduler import Records, run_units
from pipeline.source import EXTRA_FILES, Reader, Source, ValidatedSource, load_config, open_checked
from pipeline.store import consolidate, create_store, remove_partials
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
    expert_dtype: str = "bfloat16",
    expert_map: Path | None = None,
    hosts: tuple[int, int, tuple[int, ...] | None] | None = None,
) -> tuple[Plan, bytes]:
    """Read the source config and build the plan for these options (no headers read yet);
    ``expert_map``: an expert-map file (:mod:`pipeline.placement`); ``hosts``: (host count, host
    rank, held device ranks or None) from :func:`pipeline.hosts.host_selection`: the plan is
    then cut to the held stores' units."""
    raw, cfg = load_config(source)
    options = make_options(cfg, devices, dtype, layers, experts, expert_dtype)
    if expert_map is not None:
        options = with_expert_map(options, cfg, expert_map)
    if hosts is not None:
        options = with_hosts(options, *hosts)
    return select_units(build_plan(cfg, options)), raw


def with_expert_map(options: Options, cfg: MiMoConfig, expert_map: Path) -> Options:
    """``options`` placing experts as the expert-map file ``expert_map`` says (checked against
    the config, the device count and the experts converted: :func:`pipeline.placement.read_map`).
    """
    from pipeline.placement import read_map

    present = list(options.experts) if options.experts is not None else None
    emap = read_map(expert_map, cfg, options.devices, present)
    custom = make_options(cfg, options.devices, expert_map=emap).expert_map
    return replace(options, expert_map=custom)


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
    expert_dtype: str = "bfloat16",
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    expert_map: Path | None = None,
    hosts: tuple[int, int, tuple[int, ...] | None] | None = None,
    allow_nonfinite: bool = False,
) -> Summary:
    """Convert ``source`` into ``out`` for ``devices`` devices. Raises InputError on bad input.

    ``hosts`` (see :func:`make_plan`): write only the shared store and the held devices' stores,
    reading only the source tensors they are made from. ``allow_nonfinite``: arrays holding
    NaN or infinite values are recorded (``nonfinite``) with a warning instead of failing."""
    t0 = time.perf_counter()
    out = Path(out)
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: must be >= 1")
    plan, _ = make_plan(source, devices, dtype, layers, experts, expert_dtype, expert_map, hosts)
    workers = workers or default_workers(worker_memory(plan))
    checked = open_checked(source, needed_tensors(plan), plan.inventory)
    fp = fingerprint(checked, plan)
    summary = Summary(out)

    def start(od: OutputDir) -> _Run:
        small = _small_files(checked)  # before any clean: a Hub source may still fail here
        return _Run(plan, checked, od, fp, small, workers, progress, allow_nonfinite)

    return run_locked(out, fp, force, summary, t0, start, _changed_files_check(checked))


def run_locked(
    out: Path,
    fp: str,
    force: bool,
    summary: Summary,
    t0: float,
    start: Callable[[OutputDir], _Run],
    resumable: Callable[[dict[str, Any]], str | None] = lambda run: None,
) -> Summary:
    """Lock OUT, then decide what it holds, then run: the one place a conversion or a reshard
    decides between nothing, a finished output (returned as already complete), a resumable run
    of the same fingerprint, an interrupted ``--force`` (finished by the next ``--force``) and
    anything else (refused unless ``force``, then cleaned).

    ``start(od)`` prepares the run (reading what it copies into OUT) before anything is removed;
    ``resumable(run_info)`` names why an interrupted run of the same fingerprint cannot resume.
    """
    od = OutputDir(out)
    od.check_usable()  # early, before OUT is created; decided again under the lock
    od.lock()
    try:
        od.check_usable()
        try:
            replacing = od.replacing()
            existing, complete = od.inspect()
        except InputError:  # damaged state: only --force may start over
            if not force:
                raise
            replacing, existing, complete = {}, {}, False
        if replacing is not None and not force:
            raise InputError(
                f"{out}: an earlier --force was interrupted while removing the old output; "
                "rerun with --force to finish it"
            )
        if existing is not None and existing.get("fingerprint") != fp and not force:
            raise InputError(
                f"{out}: holds an output of another source or other options "
                f"({_describe(existing)}); use --force to replace it"
            )
        why = resumable(existing) if existing and not complete else None
        if why and not force:
            raise InputError(f"{out}: holds an output of another source: {why}")
        if complete and not force:
            summary.already_complete = True
            return summary
        run = start(od)
        if force and (existing is not None or replacing is not None):
            od.clean()  # start clean, whatever the old run was
        return run.execute(summary, t0)
    finally:
        od.unlock()


def _changed_files_check(checked: ValidatedSource) -> Callable[[dict[str, Any]], str | None]:
    def check(run: dict[str, Any]) -> str | None:
        changed = _changed_files(run, checked)
        if not changed:
            return None
        return (
            f"{changed[0]} changed since the interrupted run began (size, mtime or inode); "
            "use --force to start over"
        )

    return check


def source_files(checked: ValidatedSource) -> dict[str, list[int]]:
    """Each local source file's identity (size, mtime_ns, inode), recorded in the run info."""
    return {f: list(i) for f, i in sorted(checked.file_ids.items())}


def _changed_files(run: dict[str, Any], checked: ValidatedSource) -> list[str]:
    """Files whose identity differs from the one the interrupted ``run`` recorded."""
    before, now = run.get("source_files") or {}, source_files(checked)
    return sorted(f for f in before.keys() & now.keys() if before[f] != now[f])


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


def store_attributes(store: str) -> dict[str, Any]:
    """The attributes of ``store``'s root group."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "store": store}


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
    allow_nonfinite: bool = False  # not part of the fingerprint: it changes no array byte
    nonfinite: list[str] = field(default_factory=list)  # warnings under allow_nonfinite

    def execute(self, summary: Summary, t0: float) -> Summary:
        plan, od, out = self.plan, self.od, self.od.path
        files = list(self.small)
        od.begin(  # first: from now on OUT is recognisably mimo-shard's, whatever happens
            {
                "fingerprint": self.fingerprint,
                "options": plan.options.to_dict(),
                "source": self.checked.source.describe(),
                "stores": [store_dir(Path(), s).name for s in plan.stores],
                "files": files,
                "source_files": source_files(self.checked),
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
        by_store: dict[str, list] = {store: [] for store in plan.stores}
        for _, spec in plan.arrays():
            by_store[spec.store].append(spec)
        for store, arrays in by_store.items():
            consolidate(out, store, store_attributes(store), arrays)
        sync_filesystem(out)
        self.check_resumed_nonfinite(records, pending)
        manifest, tables = build_manifest(
            plan, self.checked, self.fingerprint, records, files, self.allow_nonfinite
        )
        od.finish(manifest, {name: table_bytes(t) for name, t in tables.items()})
        summary.warnings = fused_kv_warnings(records) + self.nonfinite
        summary.units = len(plan.units) - summary.resumed
        summary.arrays = manifest["totals"]["arrays"]
        summary.bytes_in = reader.bytes_read
        summary.bytes_out = sum(u.out_bytes for u in pending)
        summary.seconds = time.perf_counter() - t0
        return summary

    def check_resumed_nonfinite(
        self, records: dict[str, Records], pending: list[Unit]
    ) -> None:
        """Resumed units converted under ``--allow-nonfinite`` hold non-finite values: refused
        without the option, a warning with it."""
        resumed = set(records) - {u.id for u in pending}
        lines = nonfinite_records(self.plan, records, resumed)
        if lines and not self.allow_nonfinite:
            raise InputError(f"{lines[0]} (resumed); --allow-nonfinite converts it anyway")
        self.nonfinite.extend(lines)

    def prepare_out(self) -> None:
        """Small files, the stores' root groups, and no orphan pieces of a killed run."""
        out = self.od.path
        for name, data in self.small.items():
            atomic_write(out / name, data)
        for store in self.plan.stores:
            # refuses a store holding a symbolic link
            create_store(out, store, store_attributes(store))
            remove_partials(store_dir(out, store))

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
        want_ranges = getattr(source, "want_ranges", None)  # a source that can fetch ranges
        if want_ranges is not None:
            want_ranges(tensor_ranges(pending, self.checked.entry, file_of))
        tensor_sha256 = getattr(source, "tensor_sha256", None)
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
            ctx = UnitContext(
                reader, self.plan.config, self.od.path, on_bytes, self.allow_nonfinite
            )
            recs = run_unit(ctx, u)
            self.nonfinite.extend(ctx.warnings)
            out = _records(u, recs)
            if tensor_sha256 is not None:  # tensors fetched by ranges: sha256 of their bytes
                shas = {t: h for t in u.sources if (h := tensor_sha256(t)) is not None}
                if shas and out:
                    out[0]["source_sha256"] = shas
            return out

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
