"""Per-thread reusable buffers for the converter's hot loops.

Touching fresh pages is the slow part of a large temporary array (especially on VMs that hand freed
memory back to the host), so each worker thread keeps its buffers and reuses them, unit after unit.
A buffer is named by its role, not its dtype: the same bytes serve every dtype and shape asked of
that name, so a thread needs only as much memory as its largest unit asks of each role at once
(the converter uses ``read`` for source bytes, ``out`` for the output being built and ``grid``
for FP8 expert scale slabs; the NumPy reference dequantisation uses ``idx``).
Buffers above ``GROW`` bytes are allocated in whole multiples of it, so a slightly larger request
later (a routed expert's ``down`` codes after its ``gate``'s: 8.65 against 8.52 MB) fits the
buffer already touched instead of replacing it with a new one.
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
GROW = 2 << 20  # larger buffers are whole multiples of this (a huge page)


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A C-contiguous ``shape``/``dtype`` view of this thread's buffer called ``name``.

    The view starts on an ``ALIGN`` boundary and is valid until this thread next asks for
    ``name`` (in any dtype). The buffer becomes this thread's most recently used one, so making
    room for it only ever drops other buffers.
    """
    pool: OrderedDict | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = OrderedDict()
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = pool.get(name)
    if buf is None or buf.size < max(n, 1):
        pool.pop(name, None)
        buf = None  # release a smaller buffer before allocating its replacement (a new entry: last)
        size = max(n, 1) if n <= GROW else -(-n // GROW) * GROW
        raw = np.empty(size + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        buf = pool[name] = raw[start : start + size]
        total = sum(b.nbytes for b in pool.values())
        while len(pool) > 1 and total > POOL_BYTES:
            _, dropped = pool.popitem(last=False)  # the least recently used; never ``name``
            total -= dropped.nbytes
    else:
        pool.move_to_end(name)
    return buf[:n].view(dtype).reshape(shape)
