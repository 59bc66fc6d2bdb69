"""Per-thread float32 buffers the CPU backend reuses call after call (no fresh pages per call)."""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def thread_buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 ``shape`` view of this thread's buffer ``name``, grown when too small.

    Valid until the next call with the same name on the same thread.
    """
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    size = int(np.prod(shape))
    buf = pool.get(name)
    if buf is None or buf.size < size:
        buf = pool[name] = np.empty(size, np.float32)
    return buf[:size].reshape(shape)
