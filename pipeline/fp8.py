"""FP8 e4m3fn block quantisation: the exact dequantisation rule and its inverse.

Dequantisation is ``out[r, c] = cast(float32(code[r, c]) * S[row_scale[r], c // block_cols])``
with ``cast`` to bfloat16 by round-to-nearest-even (``ml_dtypes``), or to float32.
``weight_scale_inv`` is a *multiplier*. ``row_scale`` maps each weight row to a row of the scale
grid: ``r // 128`` for standard tensors, the per-head fused rule for full-attention K/V
(:mod:`mimo.fp8`, where the rule is written).

Speed: an FP8 code has 256 values, so for each run of rows sharing a scale row the converter
builds one 256-entry table per column block holding the already-rounded outputs, and gathers
through it. The result is bit-identical to computing the rule element by element.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mimo.fp8 import FP8_MAX, ceil_div
from pipeline.buffers import scratch

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
_CODE_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)  # [256]


def _tables(scales: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Flat tables: entry ``k * 256 + code`` is ``cast(f32(code) * scales[k])``."""
    table = (_CODE_VALUES[None, :] * scales[:, None]).astype(out_dtype)
    return table.view(np.uint16 if out_dtype == BF16 else np.float32).reshape(-1)


def dequantise_transposed(
    codes_t: np.ndarray,
    scales: np.ndarray,
    row_scale: np.ndarray,
    block_cols: int,
    out_dtype: np.dtype = BF16,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dequantise transposed codes straight into the kernel layout ``[in, out]``.

    ``codes_t [C, R]`` holds the codes of weight rows ``R`` transposed (float8_e4m3fn or its uint8
    bits); ``scales [S, ceil(C/block_cols)]``; ``row_scale [R]`` the scale-grid row of each weight
    row: ``out[c, r] = cast(float32(code[r, c]) * scales[row_scale[r], c // block_cols])``.
    ``out [C, R]`` may be a strided view (a column band of a larger array).
    """
    codes_t = codes_t.view(np.uint8)
    cols, rows = codes_t.shape
    out_dtype = np.dtype(out_dtype)
    if out is None:
        out = np.empty((cols, rows), out_dtype)
    out_bits = out.view(np.uint16 if out_dtype == BF16 else np.float32)
    lo = int(row_scale.min())
    offset = ((row_scale - lo) * 256).astype(np.int32)  # [R]
    used = scales[lo : int(row_scale.max()) + 1]  # the grid rows this chunk needs
    for c0 in range(0, cols, block_cols):
        c1 = min(c0 + block_cols, cols)
        table = _tables(used[:, c0 // block_cols], out_dtype)  # [rows used * 256]
        idx = scratch("idx", (c1 - c0, rows), np.dtype(np.int32))
        np.add(codes_t[c0:c1], offset[None, :], out=idx)
        np.take(table, idx, out=out_bits[c0:c1], mode="clip")  # indices are in range
    return out


def quantise(w: np.ndarray, row_scale: np.ndarray, n_scale_rows: int, block_cols: int):
    """Block-quantise ``w [R, C]`` float32: ``scale = amax/448`` per (scale row, column block).

    Returns ``(codes float8_e4m3fn [R, C], scales float32 [n_scale_rows, ceil(C/block_cols)])``.
    Rows sharing a scale row (per ``row_scale``) form one block with each column block.
    """
    rows, cols = w.shape
    ncb = ceil_div(cols, block_cols)
    pad = ncb * block_cols - cols
    a = np.abs(w)
    if pad:
        a = np.pad(a, ((0, 0), (0, pad)))
    col_amax = a.reshape(rows, ncb, block_cols).max(axis=2)  # [R, ncb]
    amax = np.zeros((n_scale_rows, ncb), np.float32)
    np.maximum.at(amax, row_scale, col_amax)
    scales = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    per_elem = np.repeat(scales[row_scale], block_cols, axis=1)[:, :cols]
    codes = np.clip(w / per_elem, -FP8_MAX, FP8_MAX).astype(FP8)
    return codes, scales


def fused_kv_saturation(
    k_codes: np.ndarray, v_codes: np.ndarray, head_dim: int, v_head_dim: int, block: tuple[int, int]
) -> dict[str, int]:
    """Evidence for the per-head fused K/V reading (docs/checkpoint.md §3.3).

    Scales are ``amax / 448``, so under the grouping the checkpoint was quantised with, every
    (128-row block, 128-column block) holds a code of magnitude 448. Counts, over the given KV heads
    (``k_codes [heads*head_dim, C]``, ``v_codes [heads*v_head_dim, C]``, e4m3fn codes as ``uint8``
    or FP8), the fused blocks of ``[K_h; V_h]`` that reach it, and the same for K's rows past the
    first block taken alone (the competing "trim" reading), which a fused checkpoint often leaves
    below 448. A block holding a NaN code does not reach it.

    On the codes' bits: magnitude 448 is ``code & 0x7F == 0x7E``, NaN ``0x7F``.
    """
    bm, bn = block
    heads = k_codes.shape[0] // head_dim
    cols = k_codes.shape[1]
    k = k_codes.view(np.uint8).reshape(heads, head_dim, cols)
    v = v_codes.view(np.uint8).reshape(heads, v_head_dim, cols)
    rows = np.concatenate([k, v], axis=1) & 0x7F  # [heads, head_dim + v_head_dim, C]
    col_starts = np.arange(0, cols, bn)

    def saturated(part: np.ndarray) -> np.ndarray:
        """[heads, row blocks, column blocks] of ``part [heads, R, C]``: whether each block holds
        a 448 and no NaN, i.e. its largest magnitude code is ``0x7E`` (NaN, ``0x7F``, is above)."""
        n, r, c = part.shape
        whole = r // bm * bm  # blocks of bm rows, then a ragged block (reduceat is slow here)
        by_rows = [part[:, :whole].reshape(n, whole // bm, bm, c).max(axis=2)]
        if whole < r:
            by_rows.append(part[:, whole:].max(axis=1, keepdims=True))
        by_rows = np.concatenate(by_rows, axis=1)
        return np.maximum.reduceat(by_rows, col_starts, axis=2) == 0x7E

    fused = saturated(rows)
    alone = alone_ok = 0
    if head_dim % bm:  # a block straddling K and V: K's rows in it, taken alone
        tail = saturated(rows[:, head_dim // bm * bm : head_dim])
        alone, alone_ok = tail.size, int(np.count_nonzero(tail))
    return {
        "fused_blocks": fused.size,
        "fused_saturated": int(np.count_nonzero(fused)),
        "k_tail_blocks": alone,
        "k_tail_saturated": alone_ok,
    }
