"""The fused K/V evidence counts blocks on the codes' bits exactly as a float reading would.

``fused_kv_saturation`` works on the e4m3fn codes (``0x7E``: magnitude 448, ``0x7F``: NaN); the
reference here decodes every block to float32 and takes its maximum magnitude, block by block.
Shapes cover a K head whose rows end inside a block (the "trim" reading's tail), one that ends on
a block boundary, ragged column blocks, NaN codes and blocks with and without a 448.
"""

from __future__ import annotations

import numpy as np
import pytest

from mimo.fp8 import FP8_MAX
from pipeline.fp8 import FP8, fused_kv_saturation


def reference(k, v, head_dim, v_head_dim, block):
    bm, bn = block
    heads, cols = k.shape[0] // head_dim, k.shape[1]
    fused = ok = alone = alone_ok = 0
    for h in range(heads):
        rows = np.concatenate(
            [k[h * head_dim : (h + 1) * head_dim], v[h * v_head_dim : (h + 1) * v_head_dim]]
        ).view(FP8)
        mag = np.abs(rows.astype(np.float32))  # a NaN makes its block's maximum NaN
        for r0 in range(0, mag.shape[0], bm):
            for c0 in range(0, cols, bn):
                fused += 1
                ok += int(mag[r0 : r0 + bm, c0 : c0 + bn].max() >= FP8_MAX)
                if r0 < head_dim < r0 + bm:
                    alone += 1
                    alone_ok += int(mag[r0:head_dim, c0 : c0 + bn].max() >= FP8_MAX)
    return {
        "fused_blocks": fused,
        "fused_saturated": ok,
        "k_tail_blocks": alone,
        "k_tail_saturated": alone_ok,
    }


@pytest.mark.parametrize(
    "heads, head_dim, v_head_dim, cols, block",
    [(2, 24, 16, 40, (16, 16)), (3, 32, 16, 33, (16, 8)), (1, 192, 128, 300, (128, 128))],
)
def test_counts_match_a_float_reading(heads, head_dim, v_head_dim, cols, block):
    rng = np.random.default_rng(heads * head_dim + cols)
    for trial in range(6):
        k = rng.integers(0, 0x7E, (heads * head_dim, cols), dtype=np.uint8)  # below 448
        v = rng.integers(0, 0x7E, (heads * v_head_dim, cols), dtype=np.uint8)
        for codes, special in ((k, 0x7E), (v, 0x7E), (k, 0xFE), (v, 0x7F), (k, 0xFF)):
            hits = rng.integers(0, codes.size, 1 + trial * 3)
            codes.reshape(-1)[hits] = special  # +-448, and NaN codes of either sign
        got = fused_kv_saturation(k, v, head_dim, v_head_dim, block)
        assert got == reference(k, v, head_dim, v_head_dim, block)
        assert got == fused_kv_saturation(k.view(FP8), v.view(FP8), head_dim, v_head_dim, block)
    if head_dim % block[0]:
        assert got["k_tail_blocks"] == heads * -(-cols // block[1])
    else:
        assert got["k_tail_blocks"] == 0


def test_a_saturated_block_is_counted_and_a_nan_cancels_it():
    k = np.zeros((24, 16), np.uint8)
    v = np.zeros((16, 16), np.uint8)
    k[20, 3] = 0x7E  # in the tail rows 16..23 and in the straddling block 16..31
    got = fused_kv_saturation(k, v, 24, 16, (16, 16))
    assert got == {
        "fused_blocks": 3,
        "fused_saturated": 1,
        "k_tail_blocks": 1,
        "k_tail_saturated": 1,
    }
    v[0, 0] = 0x7F  # a NaN in the same fused block: no longer reaches 448
    assert fused_kv_saturation(k, v, 24, 16, (16, 16))["fused_saturated"] == 0
