"""The checkpoint's FP8 block-scale rule, written once (``docs/checkpoint.md`` §3).

An FP8 (e4m3fn) weight ``[rows, cols]`` has a float32 ``weight_scale_inv`` grid; the value of a
code is ``float32(code) * grid[row_scale[r], c // block_cols]``. For almost every weight
``row_scale[r] = r // block_rows`` and the grid is ``ceil(rows/block_rows) x
ceil(cols/block_cols)`` (edge blocks may be ragged).

The exception is full-attention K/V: each KV head's ``[K_h; V_h]`` rows were quantised as one
unit. Blocks that start inside ``K_h`` are rows of k's grid, later ones rows of v's, so k's grid
has ``kv_heads * ceil(head_dim/block)`` rows (8 for the real model, where the standard count
would be 6) and the first V rows of a head borrow a k scale. The grid's shape tells the two
readings apart; a checkpoint may also use the standard grid on those layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimo.config import FULL, LayerSpec, MiMoConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def standard_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Scale grid shape of a ``[rows, cols]`` weight under the standard rule."""
    return ceil_div(rows, block[0]), ceil_div(cols, block[1])


@dataclass(frozen=True)
class KVGridRows:
    """Scale-grid rows of a layer's k and v under the two readings of the checkpoint."""

    fused_k: int  # kv_heads * ceil(head_dim / 128): 8 for the real full layers
    fused_v: int  # kv_heads * (blocks of [K_h; V_h] past K): 4
    standard_k: int  # ceil(kv_heads * head_dim / 128): 6
    standard_v: int  # ceil(kv_heads * v_head_dim / 128): 4


def kv_grid_rows(spec: LayerSpec, block_rows: int) -> KVGridRows:
    """Grid rows of k and v, fused per head ``[K_h; V_h]`` or standard."""
    k_blocks = ceil_div(spec.head_dim, block_rows)
    v_blocks = ceil_div(spec.head_dim + spec.v_head_dim, block_rows) - k_blocks
    return KVGridRows(
        fused_k=spec.kv_heads * k_blocks,
        fused_v=spec.kv_heads * v_blocks,
        standard_k=ceil_div(spec.kv_heads * spec.head_dim, block_rows),
        standard_v=ceil_div(spec.kv_heads * spec.v_head_dim, block_rows),
    )


def has_fused_kv(cfg: MiMoConfig, spec: LayerSpec) -> bool:
    """Whether the checkpoint writes ``spec``'s k/v grids per head fused (full-attention FP8)."""
    return spec.attention == FULL and cfg.quant is not None


def expected_grids(cfg: MiMoConfig, spec: LayerSpec) -> dict[str, tuple[int, int]]:
    """The k/v grid shapes the hub checkpoint writes on ``spec``'s layer (``{}`` if standard)."""
    if not has_fused_kv(cfg, spec):
        return {}
    rows = kv_grid_rows(spec, cfg.quant.block[0])
    cols = ceil_div(cfg.hidden_size, cfg.quant.block[1])
    return {"k_proj": (rows.fused_k, cols), "v_proj": (rows.fused_v, cols)}


def reads_fused(spec: LayerSpec, block_rows: int, k_grid_rows: int) -> bool:
    """Whether a k grid of ``k_grid_rows`` rows is the per-head fused one (not the standard)."""
    rows = kv_grid_rows(spec, block_rows)
    return k_grid_rows == rows.fused_k != rows.standard_k


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
    kb = ceil_div(head_dim, block_rows)
    vb = ceil_div(head_dim + v_head_dim, block_rows) - kb
    k_rows = kv_heads * kb
    heads = np.arange(kv_heads)[:, None]

    def grid_rows(offsets: np.ndarray) -> np.ndarray:
        b = offsets[None, :] // block_rows
        return np.where(b < kb, heads * kb + b, k_rows + heads * vb + (b - kb)).reshape(-1)

    k_map = grid_rows(np.arange(head_dim))
    v_map = grid_rows(head_dim + np.arange(v_head_dim))
    return k_map.astype(np.int64), v_map.astype(np.int64)
