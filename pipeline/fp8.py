"""FP8 e4m3fn block quantisation: the exact dequantisation rule and its inverse.

Dequantisation is ``out[r, c] = cast(float32(code[r, c]) * S[row_scale[r], c // block_cols])``
with ``cast`` to bfloat16 by round-to-nearest-even (``ml_dtypes``), or to float32.
``weight_scale_inv`` is a *multiplier*. ``row_scale`` maps each weight row to a row of the scale
grid: ``r // 128`` for standard tensors, the per-head fused rule for full-attention K/V
(:func:`fused_kv_row_scales`).

Speed: an FP8 code has 256 values, so for each run of rows sharing a scale row the converter
builds one 256-entry table per column block holding the already-rounded outputs, and gathers
through it. The result is bit-identical to computing the rule element by element.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from pipeline.buffers import scratch

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_MAX = 448.0
_CODE_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)  # [256]


def standard_row_scales(rows: int, block_rows: int) -> np.ndarray:
    """Scale-grid row of each weight row for a standard block grid: ``r // block_rows``."""
    return (np.arange(rows) // block_rows).astype(np.int64)


def fused_kv_row_scales(
    kv_heads: int, head_dim: int, v_head_dim: int, block_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the stacked grid ``vstack([k_scale, v_scale])`` used by each K row and each V row.

    Head ``h``'s rows ``[K_h; V_h]`` were quantised as one unit in ``block_rows`` blocks. Blocks
    starting inside K are k-grid rows ``h*kb + b``; later blocks are v-grid rows ``h*vb + b - kb``
    (offset by the k grid's ``kv_heads*kb`` rows in the stacked grid). Real model, per head: K rows
    0..127 -> KS[2h], K rows 128..191 and V rows 0..63 -> KS[2h+1], V rows 64..127 -> VS[h].
    """
    kb = -(-head_dim // block_rows)
    vb = -(-(head_dim + v_head_dim) // block_rows) - kb
    k_rows = kv_heads * kb

    def grid_row(h: int, p: int) -> int:
        b = p // block_rows
        return h * kb + b if b < kb else k_rows + h * vb + (b - kb)

    k_map = [grid_row(h, t) for h in range(kv_heads) for t in range(head_dim)]
    v_map = [grid_row(h, head_dim + t) for h in range(kv_heads) for t in range(v_head_dim)]
    return np.asarray(k_map, np.int64), np.asarray(v_map, np.int64)


def _tables(scales: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Flat tables: entry ``k * 256 + code`` is ``cast(f32(code) * scales[k])``."""
    table = (_CODE_VALUES[None, :] * scales[:, None]).astype(out_dtype)
    return table.view(np.uint16 if out_dtype == BF16 else np.float32).reshape(-1)


def dequantise(
    codes: np.ndarray,
    scales: np.ndarray,
    row_scale: np.ndarray,
    block_cols: int,
    out_dtype: np.dtype = BF16,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dequantise ``codes [R, C]`` (float8_e4m3fn or its uint8 bits) to ``out_dtype``.

    ``scales [S, ceil(C/block_cols)]`` float32; ``row_scale [R]`` gives each row's scale-grid row.
    Returns ``out`` (allocated when None) of shape ``[R, C]``.
    """
    codes = np.ascontiguousarray(codes).view(np.uint8)
    rows, cols = codes.shape
    out_dtype = np.dtype(out_dtype)
    if out is None:
        out = np.empty((rows, cols), out_dtype)
    out_bits = out.view(np.uint16 if out_dtype == BF16 else np.float32)
    col_offset = ((np.arange(cols) // block_cols) * 256).astype(np.int32)  # [C]
    change = np.flatnonzero(np.diff(row_scale)) + 1  # runs of rows sharing a scale-grid row
    starts, ends = np.concatenate([[0], change]), np.concatenate([change, [rows]])
    for r0, r1 in zip(starts.tolist(), ends.tolist(), strict=True):
        table = _tables(scales[row_scale[r0]], out_dtype)  # [ncb * 256]
        for s0 in range(r0, r1, 128):
            s1 = min(s0 + 128, r1)
            idx = scratch("idx", (s1 - s0, cols), np.dtype(np.int32))
            np.add(codes[s0:s1], col_offset[None, :], out=idx)
            np.take(table, idx, out=out_bits[s0:s1], mode="clip")  # indices are in range
    return out


def dequantise_transposed(
    codes_t: np.ndarray,
    scales: np.ndarray,
    row_scale: np.ndarray,
    block_cols: int,
    out_dtype: np.dtype = BF16,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``dequantise(codes_t.T, ...).T``: the same rule, from and to the kernel layout.

    ``codes_t [C, R]`` holds the codes of weight rows ``R`` transposed; ``row_scale [R]`` the
    scale-grid row of each weight row. ``out [C, R]`` may be a strided view (a column band of a
    larger array). Output row ``c`` uses scale column ``c // block_cols``.
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
    ncb = -(-cols // block_cols)
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
