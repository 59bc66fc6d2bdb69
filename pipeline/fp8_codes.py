"""Transposed copies into kernel layout, bit for bit, compiled with numba: FP8 codes and floats.

:func:`transpose_bits_into` writes ``out[c, r] = a[r, c]`` for 1-, 2- or 4-byte elements (hub
layout ``[R, C]`` into a ``[C, R]`` destination, which may be a column band of a larger array);
:func:`transpose_codes_into` does it for FP8 codes and returns how many are NaN (``0x7F``/
``0xFF``: e4m3fn has no infinity); :func:`transpose_floats_into` for bfloat16 and float32 values,
returning how many are NaN or infinite. No arithmetic: the copy walks tiles of ``TILE_ROWS`` source
rows, eight destination rows per pass, so each source cache line is read once per tile and every
destination row receives a contiguous segment (two to three times NumPy's banded transpose).
One-byte codes whose rows start on 8-byte boundaries move as 8x8 blocks in 64-bit words (a few
shifts and masks transpose a block in registers), about 1.5 times the byte loop, and their NaN
codes are counted on the same words (a separate pass over the source cost half as much as the
copy); 2-byte elements move as 4x4 blocks the same way, with streaming stores, and bfloat16
non-finite values are counted on their words too. All loops release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

from pipeline.fp8 import BF16
from pipeline.nonfinite import EXPONENT, NAN_CODE_BITS, count_flat, count_nonfinite
from pipeline.stores import drain, store_streaming
from pipeline.strided import flat_input, flat_rows, unit_rows

TILE_ROWS = 512  # source rows per tile: 512 lines of the source stay in L1/L2 across 8 columns

_BITS = {1: types.uint8, 2: types.uint16, 4: types.uint32}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_MARKED = {1: NAN_CODE_BITS, 2: EXPONENT[2]}  # what word blocks count: NaN codes, bf16 non-finite


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


@numba.njit(inline="always")
def _swap(lo, hi, mask, shift):
    """One round of a word-block transpose: the ``mask`` lanes of ``hi`` and the lanes ``shift``
    bits above them in ``lo`` trade places."""
    t = ((lo >> shift) ^ hi) & mask
    return lo ^ (t << shift), hi ^ t


@numba.njit(inline="always")
def _nan_bits(x):
    """Bit 0 of each byte of ``x`` set where that byte is a NaN code (low 7 bits all ones)."""
    u = np.uint64
    return (((x & u(0x7F7F7F7F7F7F7F7F)) + u(0x0101010101010101)) & u(0x8080808080808080)) >> u(7)


@numba.njit(inline="always")
def _nonfinite_bits(x):
    """Bit 0 of each 16-bit lane of ``x`` set where that lane is a non-finite bfloat16 (exponent
    bits ``0x7F80`` all ones). ``y``, the exponent bits flipped, is 0 exactly there; otherwise at
    most ``0x7F80``, so ``y + 0x7FFF`` sets the lane's top bit without carrying out of it."""
    u = np.uint64
    y = (x & u(0x7F807F807F807F80)) ^ u(0x7F807F807F807F80)
    return (~(y + u(0x7FFF7FFF7FFF7FFF)) & u(0x8000800080008000)) >> u(15)


_WORDS = types.Array(types.uint64, 1, "C")
# (source words, source row stride, row blocks, word columns, destination words, its row stride)
_BLOCKS_ARGS = (
    types.Array(types.uint64, 1, "C", readonly=True), types.int64, types.int64, types.int64,
    _WORDS, types.int64,
)  # fmt: skip


@numba.njit(types.int64(*_BLOCKS_ARGS), nogil=True, cache=True)
def _transpose_words(src, lds, blocks, cols8, dst, ldd):
    """Byte transpose by 8x8 blocks held in eight 64-bit words: ``blocks`` blocks of 8 source
    rows by ``cols8`` words (8 bytes) of each; ``lds``/``ldd``: row strides in words.

    Source row ``i`` of a block is word ``x_i`` (byte ``j`` = column ``j``); three rounds of
    masked swaps (bytes, byte pairs, quads) turn ``x_j`` into column ``j``, which is 8 bytes of
    destination row ``j``. Eight loads and eight stores move 64 bytes.

    Returns how many of the bytes moved are NaN codes (low 7 bits all ones), counted on the
    loaded words: ``((x & 0x7F..7F) + 0x01..01) & 0x80..80`` sets a byte's top bit exactly for
    those, and the block's eight such words, shifted to one bit per byte, add up to at most 8 a
    byte. (A separate counting pass over the source cost half as much as the copy.)
    """
    u = np.uint64
    m1, m2, m3 = u(0x00FF00FF00FF00FF), u(0x0000FFFF0000FFFF), u(0x00000000FFFFFFFF)
    s8, s16, s32, s56, ones = u(8), u(16), u(32), u(56), u(0x0101010101010101)
    nan = 0
    tile = TILE_ROWS // 8 * 2  # row blocks per tile (the source lines stay in L2 across words)
    for b0 in range(0, blocks, tile):
        b1 = min(b0 + tile, blocks)
        for c in range(cols8):
            o = c * 8 * ldd
            for b in range(b0, b1):
                s = b * 8 * lds + c
                x0, x1 = src[u(s)], src[u(s + lds)]
                x2, x3 = src[u(s + 2 * lds)], src[u(s + 3 * lds)]
                x4, x5 = src[u(s + 4 * lds)], src[u(s + 5 * lds)]
                x6, x7 = src[u(s + 6 * lds)], src[u(s + 7 * lds)]
                z = _nan_bits(x0) + _nan_bits(x1) + _nan_bits(x2) + _nan_bits(x3)
                z += _nan_bits(x4) + _nan_bits(x5) + _nan_bits(x6) + _nan_bits(x7)
                nan += (z * ones) >> s56  # the sum of z's bytes
                x0, x1 = _swap(x0, x1, m1, s8)
                x2, x3 = _swap(x2, x3, m1, s8)
                x4, x5 = _swap(x4, x5, m1, s8)
                x6, x7 = _swap(x6, x7, m1, s8)
                x0, x2 = _swap(x0, x2, m2, s16)
                x1, x3 = _swap(x1, x3, m2, s16)
                x4, x6 = _swap(x4, x6, m2, s16)
                x5, x7 = _swap(x5, x7, m2, s16)
                x0, x4 = _swap(x0, x4, m3, s32)
                x1, x5 = _swap(x1, x5, m3, s32)
                x2, x6 = _swap(x2, x6, m3, s32)
                x3, x7 = _swap(x3, x7, m3, s32)
                d = o + b
                dst[u(d)], dst[u(d + ldd)] = x0, x1
                dst[u(d + 2 * ldd)], dst[u(d + 3 * ldd)] = x2, x3
                dst[u(d + 4 * ldd)], dst[u(d + 5 * ldd)] = x4, x5
                dst[u(d + 6 * ldd)], dst[u(d + 7 * ldd)] = x6, x7
    return nan


@numba.njit(types.int64(*_BLOCKS_ARGS), nogil=True, cache=True)
def _transpose_quads(src, lds, blocks, cols4, dst, ldd):
    """2-byte transpose by 4x4 blocks held in four 64-bit words: ``blocks`` blocks of 4 source
    rows by ``cols4`` words (4 elements) of each; ``lds``/``ldd``: row strides in words.

    Two rounds of masked swaps (elements, then pairs) turn the source rows' words into columns.
    The four words go out as streaming stores (:mod:`pipeline.stores`), four destination rows
    filled side by side: 1.5 times the element loop here (the 8-byte version of this for 1-byte
    codes, eight rows side by side, runs at a third of its plain stores' speed, so it keeps them).

    Returns how many of the elements moved have the bfloat16 exponent bits (``0x7F80``) all
    set, counted on the loaded words (:func:`_nonfinite_bits`; a separate pass would read the
    source again).
    """
    u = np.uint64
    m1, m2 = u(0x0000FFFF0000FFFF), u(0x00000000FFFFFFFF)
    s16, s32, s48, ones = u(16), u(32), u(48), u(0x0001000100010001)
    marked = 0
    tile = TILE_ROWS // 4  # row blocks per tile (the source lines stay in L2 across words)
    for b0 in range(0, blocks, tile):
        b1 = min(b0 + tile, blocks)
        for c in range(cols4):
            o = c * 4 * ldd
            for b in range(b0, b1):
                s = b * 4 * lds + c
                x0, x1 = src[u(s)], src[u(s + lds)]
                x2, x3 = src[u(s + 2 * lds)], src[u(s + 3 * lds)]
                z = _nonfinite_bits(x0) + _nonfinite_bits(x1) + _nonfinite_bits(x2)
                marked += ((z + _nonfinite_bits(x3)) * ones) >> s48  # the sum of the lanes
                x0, x1 = _swap(x0, x1, m1, s16)
                x2, x3 = _swap(x2, x3, m1, s16)
                x0, x2 = _swap(x0, x2, m2, s32)
                x1, x3 = _swap(x1, x3, m2, s32)
                d = o + b
                store_streaming(dst, u(d), x0)
                store_streaming(dst, u(d + ldd), x1)
                store_streaming(dst, u(d + 2 * ldd), x2)
                store_streaming(dst, u(d + 3 * ldd), x3)
    drain()
    return marked


def _words(flat: np.ndarray) -> np.ndarray:
    """A flat array's whole 64-bit words (it starts on an 8-byte boundary)."""
    n = 8 // flat.itemsize
    return flat[: flat.size - flat.size % n].view(np.uint64)


def _transpose_blocks(src, lds, rows, cols, dst, ldd) -> int:
    """:func:`_transpose` for 1- and 2-byte elements: blocks of ``n = 8 / size`` rows by ``n``
    elements moved as 64-bit words (:func:`_transpose_words`, :func:`_transpose_quads`) where
    both sides' rows start on 8-byte boundaries (the converter's buffers do), the element loop
    for the edges and the rest. Returns how many elements have all the bits of ``_MARKED`` set:
    NaN codes of 1-byte elements, non-finite bfloat16 of 2-byte ones."""
    n = 8 // src.itemsize
    rn, cn = rows - rows % n, cols - cols % n
    aligned = lds % n == 0 and ldd % n == 0 and src.ctypes.data % 8 == 0 == dst.ctypes.data % 8
    if not (aligned and rn and cn):
        _transpose(src, lds, rows, cols, dst, ldd)
        return _marked(src, lds, rows, cols)
    words = _transpose_words if n == 8 else _transpose_quads
    marked = words(_words(src), lds // n, rn // n, cn // n, _words(dst), ldd // n)
    if cols > cn:  # the last columns, every row
        _transpose(src[cn:], lds, rows, cols - cn, dst[cn * ldd :], ldd)
        marked += _marked(src[cn:], lds, rows, cols - cn)
    if rows > rn:  # the last rows, the other columns
        _transpose(src[rn * lds :], lds, rows - rn, cn, dst[rn:], ldd)
        marked += _marked(src[rn * lds :], lds, rows - rn, cn)
    return marked


def _marked(flat: np.ndarray, ld: int, rows: int, cols: int) -> int:
    """Elements with all the bits of ``_MARKED`` set among ``rows x cols`` of ``flat``, rows
    ``ld`` apart."""
    return int(count_flat(flat, ld, rows, cols, _MARKED[flat.itemsize]))


def _transposed(a: np.ndarray, out: np.ndarray) -> int:
    """:func:`transpose_bits_into`; returns, for 1- and 2-byte elements, how many have all the
    bits of ``_MARKED`` set (0 for 4-byte ones)."""
    size = a.dtype.itemsize
    if size not in _UNSIGNED or out.dtype.itemsize != size:
        raise TypeError(f"transpose_bits_into: {a.dtype} into {out.dtype}")
    bits, out_bits = a.view(_UNSIGNED[size]), out.view(_UNSIGNED[size])
    rows, cols = bits.shape
    if out_bits.shape != (cols, rows):
        raise ValueError(f"output shape {out.shape}; input {a.shape} needs {(cols, rows)}")
    if rows == 0 or cols == 0:
        return 0
    dst = out_bits if unit_rows(out_bits) else np.empty(out_bits.shape, out_bits.dtype)
    flat_src, lds = flat_input(bits)
    flat_dst, ldo = flat_rows(dst)
    nan = 0
    if size == 4:
        _transpose(flat_src, lds, rows, cols, flat_dst, ldo)
    else:
        nan = _transpose_blocks(flat_src, lds, rows, cols, flat_dst, ldo)
    if dst is not out_bits:
        out_bits[...] = dst
    return nan


def transpose_bits_into(a: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = a.T`` bit for bit for 2-D arrays of one element size (1, 2 or 4 bytes).

    ``a``: ``[R, C]``, any strides. ``out``: ``[C, R]``, any strides (e.g. ``dst[:, j:j+R]``);
    rows that are not unit-stride go through a temporary.
    """
    _transposed(a, out)


def transpose_floats_into(a: np.ndarray, out: np.ndarray) -> int:
    """``out[...] = a.T`` for bfloat16 or float32 ``a`` (``[R, C]``, any strides; ``out``
    ``[C, R]`` of the same dtype, any strides); return how many values are NaN or infinite.

    bfloat16 values are counted on the words the copy moves; float32 ones in a pass of their own.
    """
    if a.dtype == BF16 == out.dtype:
        return _transposed(a, out)
    if a.dtype != np.float32 or out.dtype != np.float32:
        raise TypeError(f"transpose_floats_into: {a.dtype} into {out.dtype}: bfloat16 or float32")
    nonfinite = count_nonfinite(a)
    _transposed(a, out)
    return nonfinite


def transpose_codes_into(codes: np.ndarray, out: np.ndarray) -> int:
    """``out[...] = codes.T`` for 1-byte FP8 codes; return how many codes are NaN.

    ``codes``: ``[R, C]`` uint8 (or any 1-byte dtype, viewed as bits), any strides. ``out``:
    ``[C, R]`` 1-byte, any strides (e.g. ``slab[:, j:j+R]``).
    """
    codes = codes.view(np.uint8)
    if codes.dtype.itemsize != 1 or out.dtype.itemsize != 1:
        raise TypeError(f"transpose_codes_into: {codes.dtype} into {out.dtype}: 1-byte codes")
    return _transposed(codes, out)
