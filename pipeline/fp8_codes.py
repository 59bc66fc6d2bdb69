"""Transposed copies into kernel layout, bit for bit, compiled with numba: FP8 codes and floats.

:func:`transpose_bits_into` writes ``out[c, r] = a[r, c]`` for 1-, 2- or 4-byte elements (hub
layout ``[R, C]`` into a ``[C, R]`` destination, which may be a column band of a larger array);
:func:`transpose_codes_into` does it for FP8 codes and returns how many are NaN (``0x7F``/
``0xFF``: e4m3fn has no infinity). No arithmetic: the copy walks tiles of ``TILE_ROWS`` source
rows, eight destination rows per pass, so each source cache line is read once per tile and every
destination row receives a contiguous segment (two to three times NumPy's banded transpose). The
NaN count is a separate vectorised pass over the source (a small fraction of the copy). Both
loops release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numpy.lib.stride_tricks import as_strided

TILE_ROWS = 512  # source rows per tile: 512 lines of the source stay in L1/L2 across 8 columns

_FLAT_IN = types.Array(types.uint8, 1, "C", readonly=True)
_BITS = {1: types.uint8, 2: types.uint16, 4: types.uint32}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@numba.njit(
    [
        types.void(
            types.Array(t, 1, "C", readonly=True),
            types.int64,
            types.int64,
            types.int64,
            types.Array(t, 1, "C"),
            types.int64,
        )
        for t in _BITS.values()
    ],
    nogil=True,
    cache=True,
)
def _transpose(codes, ldc, rows, cols, out, ldo):
    """``out[c*ldo + r] = codes[r*ldc + c]`` for ``r < rows``, ``c < cols``."""
    u = np.uint64
    octets = cols - cols % 8
    for r0 in range(0, rows, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, rows)
        for c in range(0, octets, 8):
            o = c * ldo
            for r in range(r0, r1):
                s = r * ldc + c
                for k in range(8):
                    out[u(o + k * ldo + r)] = codes[u(s + k)]
        for c in range(octets, cols):
            for r in range(r0, r1):
                out[u(c * ldo + r)] = codes[u(r * ldc + c)]


@numba.njit(types.int64(_FLAT_IN, types.int64, types.int64, types.int64), nogil=True, cache=True)
def _count_nan(codes, ld, rows, cols):
    """How many of the ``rows x cols`` codes (rows ``ld`` apart) are NaN (low 7 bits all ones)."""
    n = 0
    for i in range(rows):
        row = codes[i * ld : i * ld + cols]
        for j in range(cols):
            n += (row[j] & 0x7F) == 0x7F
    return n


def flat_rows(a: np.ndarray) -> tuple[np.ndarray, int]:
    """A 2-D array with unit-stride rows as a flat 1-D view, and its row stride (elements)."""
    rows, cols = a.shape
    ld = a.strides[0] // a.itemsize
    return as_strided(a, shape=((rows - 1) * ld + cols,), strides=(a.itemsize,)), ld


def unit_rows(a: np.ndarray) -> bool:
    """Whether a 2-D array's rows are unit-stride and do not overlap (:func:`flat_rows` holds)."""
    step = a.strides[0]
    return a.strides[1] == a.itemsize and step >= a.shape[1] * a.itemsize and step % a.itemsize == 0


def count_nan_codes(codes: np.ndarray) -> int:
    """How many of the 2-D e4m3fn ``codes`` (uint8 bits, unit-stride rows) are NaN."""
    codes = codes.view(np.uint8)
    if codes.size == 0:
        return 0
    if not unit_rows(codes):
        codes = np.ascontiguousarray(codes)
    flat, ld = flat_rows(codes)
    return int(_count_nan(flat, ld, *codes.shape))


def transpose_bits_into(a: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = a.T`` bit for bit for 2-D arrays of one element size (1, 2 or 4 bytes).

    ``a``: ``[R, C]``, any strides. ``out``: ``[C, R]``, any strides (e.g. ``dst[:, j:j+R]``);
    rows that are not unit-stride go through a temporary.
    """
    size = a.dtype.itemsize
    if size not in _UNSIGNED or out.dtype.itemsize != size:
        raise TypeError(f"transpose_bits_into: {a.dtype} into {out.dtype}")
    bits, out_bits = a.view(_UNSIGNED[size]), out.view(_UNSIGNED[size])
    rows, cols = bits.shape
    if out_bits.shape != (cols, rows):
        raise ValueError(f"output shape {out.shape}; input {a.shape} needs {(cols, rows)}")
    if rows == 0 or cols == 0:
        return
    if not unit_rows(bits):
        bits = np.ascontiguousarray(bits)
    dst = out_bits if unit_rows(out_bits) else np.empty(out_bits.shape, out_bits.dtype)
    flat_src, lds = flat_rows(bits)
    flat_dst, ldo = flat_rows(dst)
    _transpose(flat_src, lds, rows, cols, flat_dst, ldo)
    if dst is not out_bits:
        out_bits[...] = dst


def transpose_codes_into(codes: np.ndarray, out: np.ndarray) -> int:
    """``out[...] = codes.T`` for 1-byte FP8 codes; return how many codes are NaN.

    ``codes``: ``[R, C]`` uint8 (or any 1-byte dtype, viewed as bits), any strides. ``out``:
    ``[C, R]`` 1-byte, any strides (e.g. ``slab[:, j:j+R]``).
    """
    codes = codes.view(np.uint8)
    if codes.dtype.itemsize != 1 or out.dtype.itemsize != 1:
        raise TypeError(f"transpose_codes_into: {codes.dtype} into {out.dtype}: 1-byte codes")
    transpose_bits_into(codes, out)
    return count_nan_codes(codes)
