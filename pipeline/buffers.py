"""Per-thread reusable buffers for the converter's hot loops.

Touching fresh pages is the slow part of a large temporary array (especially on VMs that hand freed
memory back to the host), so each worker thread keeps its buffers and reuses them, unit after unit.
A thread's pool holds at most ``POOL_BYTES`` (or just one buffer, if that alone is larger): beyond
that the least recently used buffers are dropped, never the one being handed out (a unit still
using a dropped buffer keeps it alive until it finishes). Buffers start on a 4 KiB boundary, so
whole arrays built in them can be written with direct I/O.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

_local = threading.local()
ALIGN = 4096
POOL_BYTES = 320 << 20  # per thread: the largest unit at the real shapes (dense gate_up, 1 device)


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A C-contiguous ``shape``/``dtype`` view of this thread's buffer called ``name``.

    The view starts on an ``ALIGN`` boundary. The buffer becomes this thread's most recently used
    one, so making room for it only ever drops other buffers.
    """
    pool: OrderedDict | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = OrderedDict()
    dtype = np.dtype(dtype)
    n = max(math.prod(shape), 1)
    key = (name, dtype)
    buf = pool.get(key)
    if buf is None or buf.size < n:
        pool.pop(key, None)
        buf = None  # release a smaller buffer before allocating its replacement (a fresh key: last)
        raw = np.empty(n * dtype.itemsize + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        buf = pool[key] = raw[start : start + n * dtype.itemsize].view(dtype)
        total = sum(b.nbytes for b in pool.values())
        while len(pool) > 1 and total > POOL_BYTES:
            _, dropped = pool.popitem(last=False)  # the least recently used; never ``key``
            total -= dropped.nbytes
    else:
        pool.move_to_end(key)
    return buf[: math.prod(shape)].reshape(shape)
