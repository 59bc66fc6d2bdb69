"""Resharding: a new output for other ``--devices`` (or another expert map) from an output alone.

``mimo-shard OLD NEW --devices M [--expert-map MAP]`` where OLD holds ``manifest.json``. NEW is
planned exactly as a conversion of OLD's checkpoint with OLD's options (dtype, expert dtype,
layer and expert subsets) and the new device count and map, and every array of that plan is
assembled from OLD's arrays, never from the checkpoint:

=======================  ===================================================================
array                    made from OLD
=======================  ===================================================================
shared store arrays      the chunk file, hard-linked (copied across filesystems)
``attn/qkv``             column bands: q heads from the rank holding them, K/V heads (replicated
                         over ranks in OLD) from the first rank holding them
``attn/o``, ``sinks``    rows of the ranks holding the heads
``experts/*``            whole experts (codes and scales of FP8 experts alike) from the first
                         slot holding each
``mlp/gate_up``          column bands of gate and of up; ``mlp/down``: rows
``lm_head``              column bands of the vocabulary slices
=======================  ===================================================================

Every value is moved, never recomputed (no dequantisation, no rounding), so NEW is byte for byte
the output a direct conversion with the same options writes. Work is streamed per unit (row bands
of at most ``BAND_BYTES``, one expert at a time), journaled and resumable like a conversion; the
manifest's ``source`` is ``{"kind": "output", "path": OLD, "origin": OLD's source, ...}``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from loader.format import FORMAT_VERSION, LOGICAL_DTYPES, SHARED, chunk_path, device_store
from loader.manifest import LoaderError, read_arrays, read_manifest
from mimo.config import MiMoConfig
from mimo.layout import BY_KEY, EXPERTS, HEADS, INTERMEDIATE, VOCAB, WHOLE
from pipeline.convert import Summary, _Run, run_locked
from pipeline.errors import InputError
from pipeline.journal import OutputDir
from pipeline.memory import default_workers
from pipeline.plan import OutputArray, Plan, Unit, build_plan, make_options
from pipeline.reading import UnitContext
from pipeline.scheduler import Records, run_units
from pipeline.source import load_config
from pipeline.store import create_array_metadata

BAND_BYTES = 64 << 20  # output bytes assembled in memory at a time
WORKER_BYTES = 4 * BAND_BYTES  # a worker at once: a band and OLD's rows it is cut from (_cols)
Segment = tuple[int, int, int]  # (OLD rank, start, stop) along the split axis of OLD's array


class OutputSource:
    """OLD as the converter's source of small files (config, tokenizer) and identity."""

    def __init__(self, old: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(old).resolve()
        self.manifest = manifest

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "output",
            "path": str(self.root),
            "revision": None,
            "origin": self.manifest["source"],
        }

    def read_small(self, name: str) -> bytes | None:
        if name not in self.manifest["files"]:
            return None
        p = self.root / name
        if p.is_symlink() or not p.is_file():
            raise InputError(f"{p}: listed in OLD's manifest but not a regular file")
        return p.read_bytes()


@dataclass
class _Checked:
    """What the converter's manifest needs to know of its source, taken from OLD's manifest."""

    source: OutputSource
    raw_config: bytes
    config: MiMoConfig
    index_sha256: str
    file_sizes: dict[str, int]
    mtp_layers: int
    weight_map: dict[int, None]  # only its size is recorded (the checkpoint's tensor count)
    file_ids: dict = field(default_factory=dict)


def _spec_string(values: list[int] | None) -> str | None:
    return None if values is None else ",".join(map(str, values))


def reshard_plan(
    old: Path,
    manifest: dict[str, Any],
    devices: int,
    expert_map: Path | None,
    given: dict[str, Any],
) -> tuple[Plan, bytes]:
    """NEW's plan: OLD's options with ``devices`` and the map (``expert_map``; else OLD's map
    when the device count is unchanged; else contiguous). ``given``: options the user set
    explicitly, which must agree with OLD's."""
    from pipeline.placement import read_map

    src = OutputSource(old, manifest)
    raw, cfg = load_config(src)
    o = manifest["options"]
    have = {
        "dtype": o["dtype"],
        "expert_dtype": o.get("expert_dtype", "bfloat16"),
        "layers": o["layers"],
        "experts": o["experts"],
    }
    for key, value in given.items():
        want = have[key]
        if key in ("layers", "experts") and value is not None:
            from pipeline.plan import parse_indices

            limit = cfg.num_hidden_layers if key == "layers" else cfg.n_routed_experts
            parsed = parse_indices(value, limit, f"--{key}")
            value = list(parsed) if parsed is not None else None
        if value != want:
            raise InputError(
                f"--{key.replace('_', '-')} {value}: resharding {old} keeps its {key} ({want})"
            )
    options = make_options(
        cfg, devices, have["dtype"], _spec_string(have["layers"]),
        _spec_string(have["experts"]), have["expert_dtype"],
    )
    present = list(options.experts) if options.experts is not None else None
    if expert_map is not None:
        emap = read_map(expert_map, cfg, devices, present)
    elif "expert_map_sha256" in o and devices == o["devices"]:
        emap = {int(k): v for k, v in manifest["layout"]["expert_map"].items()}
    else:
        emap = None
    if emap:
        custom = make_options(cfg, devices, expert_map=emap).expert_map
        options = replace(options, expert_map=custom)
    return build_plan(cfg, options), raw


def reshard(
    old: Path,
    out: Path,
    devices: int,
    *,
    expert_map: Path | None = None,
    given: dict[str, Any] | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Summary:
    """Write NEW (``out``) from the output ``old`` (module docstring). InputError on bad input."""
    t0 = time.perf_counter()
    old, out = Path(old), Path(out)
    try:
        manifest = read_manifest(old)
        records = {
            (r["store"], r["path"]): r for r in read_arrays(old, manifest)  # type: ignore[index]
        }
    except LoaderError as e:
        raise InputError(str(e)) from None
    if old.resolve() == out.resolve():
        raise InputError(f"{out}: NEW must be another folder than OLD")
    plan, raw = reshard_plan(old, manifest, devices, expert_map, given or {})
    workers = workers or default_workers(WORKER_BYTES)
    src = manifest["source"]
    checked = _Checked(
        OutputSource(old, manifest), raw, plan.config, src["index_sha256"], src["files"],
        src["mtp_layers"], dict.fromkeys(range(src.get("tensors", 0))),
    )
    ident = {
        "format_version": FORMAT_VERSION,
        "reshard_of": manifest["fingerprint"],
        "options": plan.options.to_dict(),
    }
    fp = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def start(od: OutputDir) -> _ReshardRun:
        small = {"config.json": raw}
        for name in manifest["files"]:
            if name != "config.json":
                data = checked.source.read_small(name)
                if data is not None:
                    small[name] = data
        run = _ReshardRun(plan, checked, od, fp, small, workers, progress)  # type: ignore
        run.old, run.old_manifest, run.old_records = old, manifest, records
        return run

    return run_locked(out, fp, force, Summary(out), t0, start)


class _ReshardRun(_Run):
    """A conversion run whose units are assembled from OLD's arrays."""

    old: Path
    old_manifest: dict[str, Any]
    old_records: dict[tuple[str, str], dict[str, Any]]
    bytes_read: int = 0

    def execute(self, summary: Summary, t0: float) -> Summary:
        summary = super().execute(summary, t0)
        summary.bytes_in = self.bytes_read  # OLD's chunk bytes, not a checkpoint's
        return summary

    def convert_units(self, pending: list[Unit], records: dict[str, Records], reader) -> None:
        gather = _Gather(self.old, self.old_manifest, self.old_records, self.plan, self.od.path)

        def work(u: Unit) -> Records:
            ctx = UnitContext(None, self.plan.config, self.od.path, None)  # type: ignore[arg-type]
            try:
                recs = [gather.array(ctx, spec) for spec in u.outputs]
            except BaseException:
                for w in ctx.writers:
                    w.abort()
                raise
            pairs = zip(u.outputs, recs, strict=True)
            return [{"store": a.store, "path": a.path, **r} for a, r in pairs]

        def commit(finished: list[tuple[Unit, Records]]) -> None:
            self.od.commit([(u.id, rec) for u, rec in finished])
            for u, rec in finished:
                records[u.id] = rec

        class _Ready:  # OLD's arrays are all on local disk
            def ready(self, file: str) -> bool:
                return True

            def close(self) -> None:
                pass

        run_units(pending, work, commit, _Ready(), defaultdict(str), self.workers)  # type: ignore
        self.bytes_read = gather.bytes_read


# ------------------------------------------------------------------------------- gathering
def _segments(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[Segment]:
    """``[lo, hi)`` as (rank, start, stop) offsets into the first rank whose ``ranges[rank]``
    holds each index (ranges may overlap: replicated KV heads)."""
    out: list[Segment] = []
    i = lo
    while i < hi:
        for r, (a, b) in enumerate(ranges):
            if a <= i < b:
                stop = min(b, hi)
                out.append((r, i - a, stop - a))
                i = stop
                break
        else:
            raise InputError(f"OLD's layout holds no rank with index {i}")
    return out


def _scaled(segs: list[Segment], unit: int, base: int = 0) -> list[Segment]:
    return [(r, base + a * unit, base + b * unit) for r, a, b in segs]


class _Gather:
    """Assembles NEW's arrays from OLD's chunk files with bounded reads (``os.pread``)."""

    def __init__(
        self,
        old: Path,
        manifest: dict[str, Any],
        records: dict[tuple[str, str], dict[str, Any]],
        plan: Plan,
        out: Path,
    ) -> None:
        self.old, self.records, self.plan, self.cfg = old, records, plan, plan.config
        self.plan_out = out
        self.old_layout = manifest["layout"]
        self.new_layout = plan.layout
        self.bytes_read = 0
        self._fds: dict[tuple[str, str], int] = {}

    # -------------------------------------------------------------------------- reads
    def _record(self, store: str, path: str) -> dict[str, Any]:
        rec = self.records.get((store, path))
        if rec is None:
            raise InputError(f"{self.old}: OLD has no array {store}/{path}")
        return rec

    def _fd(self, store: str, path: str) -> tuple[int, dict[str, Any]]:
        rec = self._record(store, path)
        key = (store, path)
        if key not in self._fds:
            p = chunk_path(self.old, store, path, tuple(rec["shape"]))
            fd = os.open(p, os.O_RDONLY)
            if os.fstat(fd).st_size != rec["bytes"]:
                os.close(fd)
                raise InputError(f"{p}: not the {rec['bytes']} bytes OLD's manifest records")
            self._fds[key] = fd
        return self._fds[key], rec

    def rows(self, store: str, path: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` (axis 0) of OLD's array, in its logical dtype."""
        fd, rec = self._fd(store, path)
        shape = tuple(rec["shape"])
        dt = LOGICAL_DTYPES[rec["dtype"]]
        row = math.prod(shape[1:]) * dt.itemsize
        n = (r1 - r0) * row
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(fd, [view[got:]], r0 * row + got)
            if k == 0:
                raise InputError(f"{self.old}: {store}/{path} ends early")
            got += k
        self.bytes_read += n
        return np.frombuffer(buf, dt).reshape((r1 - r0, *shape[1:]))

    # ------------------------------------------------------------------------- writes
    def array(self, ctx: UnitContext, spec: OutputArray) -> dict[str, Any]:
        """Write NEW's array ``spec``; its manifest record fields."""
        key = spec.path.split("/", 2)[2] if spec.path.startswith("layers/") else spec.path
        kind = BY_KEY[key]
        layer = int(spec.path.split("/")[1]) if spec.path.startswith("layers/") else None
        if kind.split == WHOLE:
            return self._link(spec)
        rank = int(spec.store.removeprefix("device-"))
        w = ctx.writer(spec)
        if kind.split == EXPERTS:
            self._experts(w, spec, layer, rank)
        elif kind.split == HEADS and key == "attn/qkv":
            self._cols(w, spec, self._qkv_segments(layer, rank))
        elif kind.split == HEADS:
            unit = self.cfg.layer(layer).v_head_dim if key == "attn/o" else 1
            segs = self._segs("attention", layer, rank, "q_heads")
            self._rows(w, spec, _scaled(segs, unit))
        elif kind.split == INTERMEDIATE and key == "mlp/gate_up":
            segs = self._segs("mlp_intermediate", None, rank)
            old_w = [b - a for a, b in self.old_layout["mlp_intermediate"]]
            gate = [(r, a, b) for r, a, b in segs]
            up = [(r, old_w[r] + a, old_w[r] + b) for r, a, b in segs]
            self._cols(w, spec, gate + up)
        elif kind.split == INTERMEDIATE:
            self._rows(w, spec, self._segs("mlp_intermediate", None, rank))
        elif kind.split == VOCAB:
            self._cols(w, spec, self._segs("vocab", None, rank))
        else:
            raise ValueError(f"{spec.path}: no reshard rule")
        return self._finish(w, spec)

    def _segs(self, what: str, layer: int | None, rank: int, field: str = "") -> list[Segment]:
        def ranges(layout: dict[str, Any]) -> list[tuple[int, int]]:
            v = layout[what] if layer is None else layout[what][str(layer)]
            return [tuple(x[field]) if field else tuple(x) for x in v]

        lo, hi = ranges(self.new_layout)[rank]
        return _segments(ranges(self.old_layout), lo, hi)

    def _qkv_segments(self, layer: int, rank: int) -> list[Segment]:
        spec = self.cfg.layer(layer)
        d, dv = spec.head_dim, spec.v_head_dim
        old = self.old_layout["attention"][str(layer)]
        q = _scaled(self._segs("attention", layer, rank, "q_heads"), d)
        kv = self._segs("attention", layer, rank, "kv_heads")
        k0 = [(a["q_heads"][1] - a["q_heads"][0]) * d for a in old]  # k's first column
        v0 = [k0[r] + (a["kv_heads"][1] - a["kv_heads"][0]) * d for r, a in enumerate(old)]
        k = [(r, k0[r] + a * d, k0[r] + b * d) for r, a, b in kv]
        v = [(r, v0[r] + a * dv, v0[r] + b * dv) for r, a, b in kv]
        return q + k + v

    def _rows(self, w, spec: OutputArray, segs: list[Segment]) -> None:
        row = max(spec.nbytes // max(spec.shape[0], 1), 1)
        step = max(1, BAND_BYTES // row)
        r = 0
        for rank, a, b in segs:
            for c in range(a, b, step):
                block = self.rows(device_store(rank), spec.path, c, min(c + step, b))
                w.rows(r, block)
                r += len(block)

    def _cols(self, w, spec: OutputArray, segs: list[Segment]) -> None:
        """A 2-D array made of column bands of OLD's arrays, written in row bands. A band's rows
        are read whole from each OLD array it takes columns from, so it has as many rows as
        ``BAND_BYTES`` holds of the widest of those arrays and of NEW's: splitting one wide OLD
        array into narrow ones never reads more than a band of it at once."""
        rows, cols = spec.shape
        dt = LOGICAL_DTYPES[spec.dtype]
        widths = [self._record(device_store(r), spec.path)["shape"][1] for r, _, _ in segs]
        widest = max([cols, *widths])
        step = max(1, BAND_BYTES // max(widest * dt.itemsize, 1))
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            band = np.empty((r1 - r0, cols), dt)
            col = 0
            by_rank: dict[int, np.ndarray] = {}
            for rank, a, b in segs:
                if rank not in by_rank:
                    by_rank[rank] = self.rows(device_store(rank), spec.path, r0, r1)
                band[:, col : col + b - a] = by_rank[rank][:, a:b]
                col += b - a
            w.rows(r0, band)

    def _experts(self, w, spec: OutputArray, layer: int, rank: int) -> None:
        old_map = self.old_layout["expert_map"][str(layer)]
        where = {}
        for r, slots in enumerate(old_map):
            for j, e in enumerate(slots):
                where.setdefault(e, (r, j))
        for j, e in enumerate(self.new_layout["expert_map"][str(layer)][rank]):
            if e not in where:
                raise InputError(f"{self.old}: OLD holds no expert {e} on layer {layer}")
            r, k = where[e]
            w.rows(j, self.rows(device_store(r), spec.path, k, k + 1))

    def _finish(self, w, spec: OutputArray) -> dict[str, Any]:
        rec = w.finish()
        if spec.path.endswith("_scale"):
            rec["scale_of"] = spec.path.removesuffix("_scale")
        elif spec.dtype.startswith("float8"):
            rec["encoding"] = {
                "format": spec.dtype,
                "block": list(self.cfg.quant.block),
                "scale": f"{spec.path}_scale",
            }
        return rec

    def _link(self, spec: OutputArray) -> dict[str, Any]:
        """A shared array: OLD's chunk file hard-linked (copied across filesystems)."""
        rec = self._record(SHARED, spec.path)
        if tuple(rec["shape"]) != spec.shape or rec["dtype"] != spec.dtype:
            raise InputError(f"{self.old}: {spec.path} is {rec['shape']} {rec['dtype']} in OLD")
        create_array_metadata(self.plan_out, spec)
        src = Path(chunk_path(self.old, SHARED, spec.path, spec.shape))
        dst = Path(chunk_path(self.plan_out, SHARED, spec.path, spec.shape))
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.link.partial")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        self.bytes_read += rec["bytes"]
        return {k: v for k, v in rec.items() if k in ("bytes", "checksum", "nonfinite", "checks")}
