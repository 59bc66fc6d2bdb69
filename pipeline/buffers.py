"""Per-thread reusable buffers for the converter's hot loops.

Touching fresh pages is the slow part of a large temporary array (especially on VMs that hand freed
memory back to the host), so each worker thread keeps its buffers and reuses them, unit after unit.
Memory stays bounded by the largest buffer of each name a thread has needed. Buffers start on a
4 KiB boundary, so whole arrays built in them can be written with direct I/O.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()
ALIGN = 4096


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A C-contiguous ``shape``/``dtype`` view of this thread's buffer called ``name``."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = pool.get((name, dtype))
    if buf is None or buf.size < n:
        raw = np.empty(max(n, 1) * dtype.itemsize + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        buf = pool[(name, dtype)] = raw[start : start + max(n, 1) * dtype.itemsize].view(dtype)
    return buf[:n].reshape(shape)
