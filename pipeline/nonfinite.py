"""Counting NaN and infinite values of bfloat16 and float32 arrays, and NaN codes of e4m3fn
arrays, on their bits, with numba.

A value is non-finite when its exponent bits are all ones (``0x7F80`` of a bfloat16,
``0x7F800000`` of a float32). The count is one compiled pass over the bits holding no Python
objects, so it releases the GIL. Rows are walked as slices of one flat unit-stride array
(:func:`pipeline.strided.flat_rows`), which the compiler vectorises: 20-30 GB/s on one core,
against about 6 with a generic strided 2-D loop.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

from pipeline.strided import flat_input

EXPONENT = {2: np.uint16(0x7F80), 4: np.uint32(0x7F800000)}  # all ones: infinite or NaN
NAN_CODE_BITS = np.uint8(0x7F)  # e4m3fn: exponent and mantissa all ones is NaN


@numba.njit(
    [
        types.int64(types.Array(t, 1, "C", readonly=True), types.int64, types.int64, types.int64, t)
        for t in (types.uint8, types.uint16, types.uint32)
    ],
    nogil=True,
    cache=True,
)
def count_flat(bits, ld, rows, cols, exponent):
    """How many of the ``rows x cols`` values (rows ``ld`` elements apart in the flat ``bits``)
    have all the bits of ``exponent`` set."""
    n = 0
    for i in range(rows):
        row = bits[i * ld : i * ld + cols]
        for j in range(cols):
            n += (row[j] & exponent) == exponent
    return n


def count_nonfinite(a: np.ndarray) -> int:
    """How many values of the bfloat16 or float32 array ``a`` are NaN or infinite (any shape;
    2-D with unit-stride rows, e.g. a column band, is read in place; others are made contiguous
    first)."""
    if a.dtype.itemsize not in EXPONENT or a.dtype.kind not in "fV":
        raise TypeError(f"count_nonfinite: {a.dtype} is not bfloat16 or float32")
    e = EXPONENT[a.dtype.itemsize]
    if a.size == 0:
        return 0
    bits = a.view(e.dtype) if a.ndim == 2 else np.ascontiguousarray(a).view(e.dtype).reshape(1, -1)
    flat, ld = flat_input(bits)
    return int(count_flat(flat, ld, *bits.shape, e))


def count_nan_codes(codes: np.ndarray) -> int:
    """How many of the 2-D e4m3fn ``codes`` (or their uint8 bits, any strides) are NaN: low 7
    bits all ones (``0x7F``, ``0xFF``; e4m3fn has no infinity)."""
    codes = codes.view(np.uint8)
    if codes.size == 0:
        return 0
    flat, ld = flat_input(codes)
    return int(count_flat(flat, ld, *codes.shape, NAN_CODE_BITS))
