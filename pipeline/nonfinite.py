"""Counting NaN and infinite values of bfloat16 and float32 arrays on their bits, with numba.

A value is non-finite when its exponent bits are all ones (``0x7F80`` of a bfloat16,
``0x7F800000`` of a float32). The count is one compiled pass over the bits (vectorised, far
faster than the copy that produced them) holding no Python objects, so it releases the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

_EXPONENT = {2: np.uint16(0x7F80), 4: np.uint32(0x7F800000)}  # all ones: infinite or NaN


@numba.njit(
    [types.int64(types.Array(t, 2, "A", readonly=True), t) for t in (types.uint16, types.uint32)],
    nogil=True,
    cache=True,
)
def _count(bits, exponent):
    n = 0
    for i in range(bits.shape[0]):
        row = bits[i]
        for j in range(row.size):
            n += (row[j] & exponent) == exponent
    return n


def count_nonfinite(a: np.ndarray) -> int:
    """How many values of the bfloat16 or float32 array ``a`` are NaN or infinite (any shape;
    any strides for 2-D, e.g. a column band; others are made contiguous first)."""
    if a.dtype.itemsize not in _EXPONENT or a.dtype.kind not in "fV":
        raise TypeError(f"count_nonfinite: {a.dtype} is not bfloat16 or float32")
    e = _EXPONENT[a.dtype.itemsize]
    if a.size == 0:
        return 0
    if a.ndim != 2:
        a = np.ascontiguousarray(a).reshape(1, -1)
    return int(_count(a.view(e.dtype), e))
