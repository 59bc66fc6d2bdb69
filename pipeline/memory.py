"""The converter's memory model: an upper estimate of what a unit, and a run, hold at once.

A worker thread keeps one reusable buffer per role (:mod:`pipeline.buffers`): ``read`` for
source bytes, ``out`` for the output being built, ``grid`` for FP8 expert scale slabs. A buffer
grows to the largest request of its role and stays, so a worker holds at most, per role, the
largest request any unit makes of it, plus the unit's short-lived arrays (``other``: a cast, the
fused K/V evidence's slices, re-encoded codes). :func:`unit_buffers` sizes those requests from the
plan as the transforms do; a test runs every unit of a conversion and checks what it really asked
for against it.

``mimo-shard --dry-run`` prints :func:`peak_memory`; the benchmark compares it with the measured
peak RSS. :func:`default_workers` uses it to choose ``--workers`` when none is given.
"""

from __future__ import annotations

import math
import os

from loader.format import LOGICAL_DTYPES
from mimo.config import MiMoConfig
from mimo.names import scale_name
from pipeline import buffers, reading, transforms
from pipeline.inventory import F8, ITEMSIZE, HubTensor
from pipeline.plan import Plan, Unit

BASELINE_RSS = 192 << 20  # interpreter, NumPy, numba and its kernels, tqdm: 155-165 MB measured
ROLES = ("read", "out", "grid", "other")
MAX_WORKERS = 16  # the default's ceiling: at the benchmark's rates ~6 cores keep up with 8 GB/s
MEMORY_BUDGET = 2 * 10**9  # the default keeps the estimated peak within this (or half the RAM)
_STORED = {"bfloat16": "BF16", "float32": "F32"}  # reading this stored dtype needs no cast


def unit_buffers(unit: Unit, tensors: dict[str, HubTensor], cfg: MiMoConfig) -> dict[str, int]:
    """The largest request ``unit`` makes of each role in ``ROLES``, in bytes."""
    spec = unit.outputs[0]
    size = LOGICAL_DTYPES[spec.dtype].itemsize
    need = dict.fromkeys(ROLES, 0)
    pieces = _pieces(unit, tensors, cfg)
    if unit.transform == "copy":
        t = tensors[pieces[0][0]]
        row = math.prod(spec.shape[1:])
        step = min(spec.shape[0], reading.rows_per_step(t.shape, size, transforms.COPY_BYTES))
        need["out"] = step * row * size
        if _casts(t, spec.dtype):  # raw rows are read first
            need["read"] = step * row * _widest(t)
    elif unit.transform == "split_rows":
        t = tensors[pieces[0][0]]
        values = max(b - a for a, b in unit.params["source_rows"]) * math.prod(t.shape[1:])
        need["read"], need["other"] = values * _widest(t), values * size  # raw rows, their cast
    elif unit.transform.startswith("experts_") and spec.dtype in transforms.FP8_ENCODINGS:
        codes, scales = unit.outputs
        need["out"] = codes.nbytes // codes.shape[0]  # one expert's codes slab
        need["grid"] = scales.nbytes // scales.shape[0]
        rows, cols = max((tensors[n].shape for n, _, _ in pieces), key=math.prod)
        need["read"] = rows * (cols + reading.ROW_PAD)  # a whole tensor's codes
        if spec.dtype == "float8_e4m3":  # the re-encode's temporaries: a contiguous copy,
            need["other"] = 8 * rows * cols  # lookups, masks, block grids broadcast (padded)
    else:  # transposed outputs: each piece's rows read in steps
        need["read"] = max(_step_bytes(tensors[n], b - a, size) for n, a, b in pieces)
        need["out"] = _out_bytes(unit, tensors, cfg)
        need["other"] = max(_cast_bytes(tensors[n], b - a, spec.dtype) for n, a, b in pieces)
        if unit.transform == "qkv" and _fused_kv(pieces[1][0], tensors, cfg):
            # the fused K/V evidence: the K and V slices read whole, stacked, then masked
            kv = sum((b - a) * math.prod(tensors[n].shape[1:]) for n, a, b in pieces[1:])
            need["other"] = max(need["other"], 3 * kv)
    return need


def peak_memory(plan: Plan, workers: int) -> int:
    """An upper estimate of peak RSS: :func:`workers_memory` of :func:`worker_memory`."""
    return workers_memory(worker_memory(plan), workers)


def workers_memory(per_worker: int, workers: int) -> int:
    """Peak RSS of ``workers`` workers holding ``per_worker`` bytes each, with the baseline."""
    return BASELINE_RSS + workers * per_worker


def default_workers(per_worker: int) -> int:
    """``--workers`` when none is given: two more than the CPUs this process may run on (units
    blocked in their writes leave cores idle), at most ``MAX_WORKERS``, and no more than keep a
    baseline plus ``per_worker`` bytes per worker within ``MEMORY_BUDGET`` or half the machine's
    RAM, whichever is less (at least one worker). A conversion's ``per_worker`` is
    :func:`worker_memory` of its plan."""
    n = min(_cpus() + 2, MAX_WORKERS)
    while n > 1 and workers_memory(per_worker, n) > min(MEMORY_BUDGET, _ram() // 2):
        n -= 1
    return n


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use, not the host's
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 * MEMORY_BUDGET  # unknown: the budget alone decides


def worker_memory(plan: Plan) -> int:
    """What one worker can hold at once, in bytes: the largest request of each buffer role over
    all units (what its buffers can grow to; at most ``buffers.POOL_BYTES`` beyond the unit it
    runs) and the largest short-lived arrays."""
    per_role = dict.fromkeys(ROLES, 0)
    largest = 0
    for unit in plan.units:
        need = unit_buffers(unit, plan.inventory, plan.config)
        largest = max(largest, sum(need.values()))
        for role, n in need.items():
            per_role[role] = max(per_role[role], n)
    kept = sum(n for role, n in per_role.items() if role != "other")
    return min(kept, buffers.POOL_BYTES + largest) + per_role["other"]


def _pieces(
    unit: Unit, tensors: dict[str, HubTensor], cfg: MiMoConfig
) -> list[tuple[str, int, int]]:
    """(tensor, first row, end row) of each source read of ``unit``."""
    if unit.transform == "qkv":
        layer = cfg.layer(unit.params["layer"])
        d, dv = layer.head_dim, layer.v_head_dim
        (h0, h1), (g0, g1) = unit.params["q_heads"], unit.params["kv_heads"]
        q, k, v = (unit.inputs[key][0] for key in ("q", "k", "v"))
        return [(q, h0 * d, h1 * d), (k, g0 * d, g1 * d), (v, g0 * dv, g1 * dv)]
    rows = unit.params.get("source_rows") if unit.transform != "split_rows" else None
    names = [n for group in unit.inputs.values() for n in group]
    return [(n, *(rows or (0, tensors[n].shape[0]))) for n in names]


def _widest(t: HubTensor) -> int:
    """Bytes per value of ``t`` in the widest dtype a valid checkpoint may store it in."""
    return max(ITEMSIZE[d] for d in (t.dtype, *t.accepts))


def _step_bytes(t: HubTensor, rows: int, itemsize: int) -> int:
    """``read`` bytes of one step of ``UnitContext.transposed_rows`` over ``rows`` rows of ``t``
    (FP8 codes or raw float rows, whichever ``t`` may be stored as, rows ``ROW_PAD`` bytes
    apart)."""
    step = min(rows, reading.rows_per_step(t.shape, itemsize))
    return step * (math.prod(t.shape[1:]) * _widest(t) + reading.ROW_PAD)


def _cast_bytes(t: HubTensor, rows: int, dtype: str) -> int:
    """Short-lived arrays of one step of float rows of ``t`` stored in another dtype than the
    output ``dtype``: the cast rows, and as much again for NumPy's working copies (measured);
    FP8 codes are dequantised straight into the output: none."""
    if not _casts(t, dtype):
        return 0
    size = LOGICAL_DTYPES[dtype].itemsize
    step = min(rows, reading.rows_per_step(t.shape, size))
    return 2 * step * math.prod(t.shape[1:]) * size


def _casts(t: HubTensor, dtype: str) -> bool:
    """Whether float rows of ``t`` (in any dtype a valid checkpoint may store) are cast to
    ``dtype`` output; FP8 codes are dequantised, never cast."""
    return not {t.dtype, *t.accepts} - {F8} <= {_STORED[dtype]}


def _fused_kv(k: str, tensors: dict[str, HubTensor], cfg: MiMoConfig) -> bool:
    """Whether ``k`` (a ``k_proj`` weight) has the per-head fused K/V scale grid."""
    grid = tensors.get(scale_name(k))
    return grid is not None and grid.shape[0] != -(-tensors[k].shape[0] // cfg.quant.block[0])


def _out_bytes(unit: Unit, tensors: dict[str, HubTensor], cfg: MiMoConfig) -> int:
    """``out`` bytes of a transposed output: the whole output, a band or pass of it, or one
    expert's."""
    spec = unit.outputs[0]
    size = LOGICAL_DTYPES[spec.dtype].itemsize
    if unit.transform == "transpose_split":  # the largest pass of whole device slices
        rows = tensors[unit.inputs["w"][0]].shape[0]
        cols = [tuple(c) for c in unit.params["source_cols"]]
        passes = transforms.split_passes(cols, rows * size, cfg.quant.block[1])
        return max(g1 - g0 for (g0, g1), _ in passes) * rows * size
    if unit.transform == "transpose" and spec.nbytes > transforms.IN_MEMORY_LIMIT:
        row = spec.shape[1] * size  # a band of whole output rows (transforms._transpose)
        return min(spec.shape[0], transforms.band_rows(spec.shape[0], row)) * row
    if unit.transform.startswith("experts_"):
        return spec.nbytes // spec.shape[0]  # one expert's slab at a time
    return spec.nbytes
