"""The converter's memory model: an upper estimate of what a unit, and a run, hold at once.

``mimo-shard --dry-run`` prints :func:`peak_memory`; the benchmark compares it with the measured
peak RSS.
"""

from __future__ import annotations

from loader.format import LOGICAL_DTYPES
from pipeline.buffers import POOL_BYTES
from pipeline.plan import Plan, Unit
from pipeline.reading import CHUNK_BYTES
from pipeline.transforms import COPY_BYTES, IN_MEMORY_LIMIT

BASELINE_RSS = 320 << 20  # interpreter, numpy, zarr, tqdm, numba and its compiled kernels


def working_set(unit: Unit, source_shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes a unit holds at once: its in-memory output (or output band) and one source chunk
    (raw rows, or FP8 codes read in chunks)."""
    out = max(a.nbytes for a in unit.outputs)
    if unit.transform == "transpose_split":
        rows, cols = source_shapes[unit.inputs["w"][0]]
        out = rows * cols * LOGICAL_DTYPES[unit.outputs[0].dtype].itemsize
    elif unit.transform == "copy":
        out = min(out, COPY_BYTES)  # streamed in steps
    elif unit.transform == "transpose":
        out = min(out, IN_MEMORY_LIMIT)  # in bands of output rows
    elif unit.transform.startswith("experts_"):
        out = out // unit.outputs[0].shape[0]  # one expert's slab at a time
    return out + CHUNK_BYTES


def peak_memory(plan: Plan, workers: int) -> int:
    """An upper estimate of peak RSS: a baseline plus, per worker, its bounded buffer pool or the
    largest unit's working set, whichever is larger."""
    shapes = {n: s.shape for n, s in plan.inventory.items()}
    largest = max(working_set(u, shapes) for u in plan.units)
    return BASELINE_RSS + workers * max(POOL_BYTES, largest)
