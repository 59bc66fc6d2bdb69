"""One-pass FP8 block dequantisation into kernel layout, compiled with numba.

:func:`dequantise_into` reads FP8 codes in hub layout ``[R, C]`` (weight rows ``R``; a strided
view such as the converter's padded read buffer is fine) and writes
``out[c, r] = cast(float32(code[r, c]) * scales[row_scale[r], c // block_cols])`` into a
``[C, R]`` destination (kernel layout; may be a column band of a larger array). The codes are
read once: transposed, dequantised and rounded together, block by block. ``cast`` is the same as
:mod:`pipeline.fp8`: bfloat16 by round-to-nearest-even with ``ml_dtypes``' NaN rule (sign kept,
quiet payload ``0x7FC0``), or float32; the result is bit-identical to
:func:`pipeline.fp8.dequantise_transposed` of the transposed codes.

How: rows are walked in tiles of at most ``TILE_ROWS``; each run of rows sharing a scale row gets,
per column block, one 256-entry table of the rounded outputs (as output bits), and the block is
written four destination rows at a time, each row receiving one contiguous segment. A bfloat16
destination whose rows start on 8-byte boundaries takes the block in 4x4 squares: the four
values one column gets from four consecutive rows are packed into a 64-bit word and stored at
once (a quarter of the stores; 1.3-1.5 times as fast on one core), the ragged edges and runs not
starting on a multiple of four rows (the fused K/V rule's) as before.

Non-finite outputs are counted from each block's codes while they are still in cache, not from
the destination: a value is non-finite exactly when its table entry is. The NaN codes' entries
always are; when no other entry is (the usual case) the block's NaN codes are counted in a
vectorised pass over its rows, otherwise (an infinite or NaN scale, a product that overflows)
every code is looked up. Counting inside the storing loop slows it down far more, and a pass
over the destination (twice the bytes, out of cache) cost a sixth of the kernel's time. The
compiled loops hold no Python objects and release the GIL, so threads converting different
tensors run in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

from pipeline.fp8 import BF16, FP8
from pipeline.nonfinite import NAN_CODE_BITS, count_flat
from pipeline.stores import drain, store_streaming
from pipeline.strided import flat_input, flat_rows, unit_rows

TILE_ROWS = 256  # at most this many weight rows share a table (destination segments <= 512 B)
_CODE_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)  # [256]
_NAN_CODE = (np.arange(256) & 0x7F) == 0x7F  # e4m3fn has no inf; 0x7F and 0xFF are NaN
_BITS = (types.uint16, types.uint32)  # output bits: bfloat16, float32
_NO_WORDS = np.empty(0, np.uint64)


@numba.njit(nogil=True, cache=True)
def _fill_table(table, scale, values, nan_code, product):
    """``table[k]`` = output bits of ``cast(values[k] * scale)``, bfloat16 when 2 bytes wide."""
    for k in range(256):
        # a NaN operand is the result, the code's first (as NumPy's multiply does)
        product[k] = values[k] if nan_code[k] else values[k] * scale
    bits = product.view(np.uint32)
    for k in range(256):
        b = bits[k]
        if table.itemsize == 4:
            table[k] = b
        elif product[k] != product[k]:  # NaN: sign kept, quiet payload (ml_dtypes)
            table[k] = ((b >> 16) & 0x8000) | 0x7FC0
        else:  # round to nearest even
            table[k] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@numba.njit(nogil=True, cache=True)
def _block(codes, ldc, table, out, ldo, rows, cols):
    """``out[c*ldo + r] = table[codes[r*ldc + c]]`` for ``r < rows``, ``c < cols``.

    Flat unit-stride arrays and unsigned indices: the compiler knows the element size and that no
    index wraps around, so the loop is a load, a table load and a store per value.
    """
    u = np.uint64
    quads = cols - cols % 4
    for c in range(0, quads, 4):  # four destination rows per pass over the codes' rows
        o = c * ldo
        for r in range(rows):
            s = r * ldc + c
            out[u(o + r)] = table[codes[u(s)]]
            out[u(o + ldo + r)] = table[codes[u(s + 1)]]
            out[u(o + 2 * ldo + r)] = table[codes[u(s + 2)]]
            out[u(o + 3 * ldo + r)] = table[codes[u(s + 3)]]
    for c in range(quads, cols):
        for r in range(rows):
            out[u(c * ldo + r)] = table[codes[u(r * ldc + c)]]


@numba.njit(nogil=True, cache=True)
def _square(codes, ldc, table, words, ldw, rows, cols):
    """``_block`` for 2-byte outputs, ``rows`` and ``cols`` multiples of 4, writing 64-bit words:
    ``words[c*ldw + r//4]`` holds the outputs of rows ``r..r+3`` of column ``c`` (lowest first).
    The stores are streaming (:mod:`pipeline.stores`): the caller drains them.
    """
    u = np.uint64
    s1, s2, s3 = u(16), u(32), u(48)
    for c in range(0, cols, 4):
        o = c * ldw
        for r in range(0, rows, 4):
            a = r * ldc + c
            b, d, e = a + ldc, a + 2 * ldc, a + 3 * ldc
            w = o + r // 4
            for k in range(4):  # column c + k: one word of four rows
                word = (
                    u(table[codes[u(a + k)]])
                    | u(table[codes[u(b + k)]]) << s1
                    | u(table[codes[u(d + k)]]) << s2
                    | u(table[codes[u(e + k)]]) << s3
                )
                store_streaming(words, u(w + k * ldw), word)


@numba.njit(nogil=True, cache=True)
def _count_nonfinite(codes, ldc, rows, cols, table):
    """How many of the ``rows x cols`` codes (rows ``ldc`` apart) have a non-finite output."""
    exponent = 0x7F80 if table.itemsize == 2 else 0x7F800000
    bad = (table & exponent) == exponent  # [256]
    if not (bad & ~_NAN_CODE).any():  # only the NaN codes: vectorised over each row
        return count_flat(codes, ldc, rows, cols, NAN_CODE_BITS)
    n = 0
    for r in range(rows):
        for c in range(cols):
            n += bad[codes[r * ldc + c]]
    return n


def _readonly(dtype, ndim: int, layout: str = "A") -> types.Array:
    """An input array type: read-only arrays (memory-mapped grids) and writable ones both match."""
    return types.Array(dtype, ndim, layout, readonly=True)


_DEQUANTISE_SIGS = [
    types.int64(
        _readonly(types.uint8, 1, "C"),  # codes, flat
        types.int64,  # ldc: codes row stride
        types.int64,  # rows
        types.int64,  # cols
        _readonly(types.float32, 2),  # scales
        _readonly(types.int64, 1),  # row_scale
        types.int64,  # block_cols
        _readonly(types.float32, 1),  # code values
        _readonly(types.boolean, 1),  # NaN codes
        types.Array(bits, 1, "C"),  # out, flat
        types.Array(types.uint64, 1, "C"),  # out as 64-bit words (empty: no word stores)
        types.int64,  # ldo: out row stride
    )
    for bits in _BITS
]


@numba.njit(_DEQUANTISE_SIGS, nogil=True, cache=True)
def _dequantise(
    codes, ldc, rows, cols, scales, row_scale, block_cols, values, nan_code, out, words, ldo
):
    table = np.empty(256, out.dtype)
    product = np.empty(256, np.float32)
    squares = words.size > 0  # 2-byte outputs, rows 8-byte aligned (ldo % 4 == 0)
    nonfinite = 0
    for r0 in range(0, rows, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, rows)
        ra = r0
        while ra < r1:  # runs of rows sharing a scale row
            g = row_scale[ra]
            rb = ra + 1
            while rb < r1 and row_scale[rb] == g:
                rb += 1
            for c0 in range(0, cols, block_cols):
                c1 = min(c0 + block_cols, cols)
                _fill_table(table, scales[g, c0 // block_cols], values, nan_code, product)
                n, m = rb - ra, c1 - c0
                n4, m4 = (n - n % 4, m - m % 4) if squares and ra % 4 == 0 else (0, 0)
                if n4 and m4:
                    w = (c0 * ldo + ra) // 4
                    _square(codes[ra * ldc + c0 :], ldc, table, words[w:], ldo // 4, n4, m4)
                if m > m4:  # the last columns, every row (or the whole block)
                    block, dst = codes[ra * ldc + c0 + m4 :], out[(c0 + m4) * ldo + ra :]
                    _block(block, ldc, table, dst, ldo, n, m - m4)
                if n > n4 and m4:  # the last rows of the other columns
                    block, dst = codes[(ra + n4) * ldc + c0 :], out[c0 * ldo + ra + n4 :]
                    _block(block, ldc, table, dst, ldo, n - n4, m4)
                nonfinite += _count_nonfinite(codes[ra * ldc + c0 :], ldc, n, m, table)
            ra = rb
    drain()  # the streaming stores are visible to every thread from here
    return nonfinite


def dequantise_into(
    codes: np.ndarray,
    scales: np.ndarray,
    row_scale: np.ndarray,
    block_cols: int,
    out: np.ndarray,
) -> int:
    """Dequantise ``codes [R, C]`` into ``out [C, R]`` (transposed); return the non-finite count.

    ``codes``: float8_e4m3fn or its uint8 bits, any strides. ``scales [S, ceil(C/block_cols)]``
    float32 (the scale grid, a multiplier); ``row_scale [R]`` the grid row of each weight row
    (:func:`mimo.fp8.standard_row_scales`, :func:`mimo.fp8.fused_kv_row_scales`).
    ``out``: bfloat16 (or its uint16 bits) or float32, any strides, e.g. a column band
    ``dst[:, j:j+R]``. Ragged edges (``R`` or ``C`` not a multiple of the block) are fine.
    Returns how many written values are infinite or NaN (NaN codes, non-finite scales, overflow
    of the product or of the bfloat16 rounding).
    """
    codes = codes.view(np.uint8)
    rows, cols = codes.shape
    if out.dtype == BF16:
        out = out.view(np.uint16)
    elif out.dtype == np.float32:
        out = out.view(np.uint32)
    elif out.dtype != np.uint16:
        raise TypeError(f"output dtype {out.dtype}: bfloat16 (uint16 bits) or float32 expected")
    if out.shape != (cols, rows):
        raise ValueError(f"output shape {out.shape}; codes {codes.shape} need {(cols, rows)}")
    if scales.dtype != np.float32 or scales.ndim != 2:
        raise TypeError(f"scales must be a 2-D float32 grid, not {scales.dtype} {scales.shape}")
    if scales.shape[1] < -(-cols // block_cols):
        raise ValueError(f"scales {scales.shape} cover fewer than {cols} columns")
    row_scale = np.asarray(row_scale, np.int64)
    if row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}; {rows} rows need ({rows},)")
    if rows and (row_scale.min() < 0 or row_scale.max() >= scales.shape[0]):
        raise ValueError(f"row_scale indexes past the {scales.shape[0]} rows of the scale grid")
    if rows == 0 or cols == 0:
        return 0
    dst = out if unit_rows(out) else np.empty(out.shape, out.dtype)
    flat_codes, ldc = flat_input(codes)
    flat_dst, ldo = flat_rows(dst)
    squares = dst.itemsize == 2 and ldo % 4 == 0 and flat_dst.ctypes.data % 8 == 0
    words = flat_dst[: flat_dst.size // 4 * 4].view(np.uint64) if squares else _NO_WORDS
    nonfinite = _dequantise(
        flat_codes,
        ldc,
        rows,
        cols,
        scales,
        row_scale,
        int(block_cols),
        _CODE_VALUES,
        _NAN_CODE,
        flat_dst,
        words,
        ldo,
    )
    if dst is not out:
        out[...] = dst
    return int(nonfinite)
