"""The compiled FP8 kernel against an independent torch dequantisation and the NumPy path.

torch computes ``bfloat16(float32(code) * scale)`` element by element from the block grid expanded
per row; the kernel must match it bit for bit wherever the value is a number (torch's NaN bit
pattern differs from ml_dtypes', so NaN is compared as NaN), and :mod:`pipeline.fp8` (what the
converter wrote so far) bit for bit everywhere, NaN included.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
import torch

from mimo.fp8 import fused_kv_row_scales, standard_row_scales
from pipeline.fp8 import BF16, dequantise_transposed
from pipeline.fp8_kernel import dequantise_into

BLOCK = 128


def torch_dequantised(codes: np.ndarray, scales: np.ndarray, row_scale: np.ndarray, dtype):
    """``[C, R]``: ``dtype(float32(code[r, c]) * scales[row_scale[r], c // 128])``.T, in torch."""
    t = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    per_row = torch.from_numpy(scales)[torch.from_numpy(row_scale)]  # [R, col blocks]
    per_elem = per_row.repeat_interleave(BLOCK, 1)[:, : codes.shape[1]]
    return (t * per_elem).to(dtype).T.contiguous()


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype == BF16 else np.uint32)


def assert_matches_torch(out: np.ndarray, expected: torch.Tensor) -> None:
    """Same bits where torch has a number; NaN exactly where torch has NaN."""
    got = torch.from_numpy(out.astype(np.float32))
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(got), nan)
    width = torch.int16 if expected.dtype == torch.bfloat16 else torch.int32
    want = expected.view(width).numpy().view(bits(out).dtype)
    np.testing.assert_array_equal(bits(out)[~nan.numpy()], want[~nan.numpy()])


def assert_matches_numpy_path(codes, scales, row_scale, out, dtype=BF16) -> None:
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN scales are under test
        ref = dequantise_transposed(np.ascontiguousarray(codes.T), scales, row_scale, BLOCK, dtype)
    np.testing.assert_array_equal(bits(out), bits(ref))


def padded_codes(rng: np.random.Generator, rows: int, cols: int, pad: int = 64) -> np.ndarray:
    """Random codes in a row-padded buffer, as the converter reads them."""
    codes = np.empty((rows, cols + pad), np.uint8)[:, :cols]
    codes[...] = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    return codes


def grid(rng: np.random.Generator, n_rows: int, cols: int) -> np.ndarray:
    """A scale grid spanning magnitudes from bfloat16-subnormal products to overflow."""
    exps = rng.integers(-140, 120, (n_rows, -(-cols // BLOCK)))
    return (rng.random(exps.shape) + 0.5).astype(np.float32) * np.exp2(exps).astype(np.float32)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)])
@pytest.mark.parametrize("shape", [(300, 200), (129, 1), (1, 129), (256, 384)])
def test_standard_grid_matches_torch(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    codes = padded_codes(rng, rows, cols)
    scales = grid(rng, -(-rows // BLOCK), cols)
    row_scale = standard_row_scales(rows, BLOCK)
    out = np.empty((cols, rows), dtype)
    n = dequantise_into(codes, scales, row_scale, BLOCK, out)
    torch_dtype = torch.bfloat16 if dtype == BF16 else torch.float32
    expected = torch_dequantised(codes, scales, row_scale, torch_dtype)
    assert_matches_torch(out, expected)
    assert_matches_numpy_path(codes, scales, row_scale, out, dtype)
    assert n == int((~torch.isfinite(expected.float())).sum())


def test_every_code_value_with_every_kind_of_scale():
    """All 256 codes against scales that round up, round to even, underflow and overflow."""
    codes = np.tile(np.arange(256, dtype=np.uint8), (8, 1))  # [8 rows, 256 columns]
    scales = np.array(
        [[1.0, 1.0], [1 / 3, 3.0], [2.0**-133, 2.0**-120], [2.0**120, 1e38], [0.0, -0.0]]
        + [[np.float32(1) + np.float32(2.0**-9), 7e-3], [np.inf, -np.inf], [np.nan, 1.0]],
        np.float32,
    )
    row_scale = np.arange(8)
    out = np.empty((256, 8), BF16)
    n = dequantise_into(codes, scales, row_scale, BLOCK, out)
    expected = torch_dequantised(codes, scales, row_scale, torch.bfloat16)
    assert_matches_torch(out, expected)
    assert_matches_numpy_path(codes, scales, row_scale, out)
    assert n == int((~torch.isfinite(expected.float())).sum())


def test_fused_kv_rule_matches_torch():
    """K and V rows of full attention index the stacked grid ``[k_scale; v_scale]`` per head."""
    heads, d, dv, cols = 4, 192, 128, 320
    rng = np.random.default_rng(7)
    k_map, v_map = fused_kv_row_scales(heads, d, dv, BLOCK)
    stacked = grid(rng, heads * 2 + heads, cols)  # k grid: 2 rows a head, v grid: 1
    for row_scale in (k_map, v_map):
        codes = padded_codes(rng, len(row_scale), cols)
        out = np.empty((cols, len(row_scale)), BF16)
        dequantise_into(codes, stacked, row_scale, BLOCK, out)
        assert_matches_torch(out, torch_dequantised(codes, stacked, row_scale, torch.bfloat16))
        assert_matches_numpy_path(codes, stacked, row_scale, out)
    # a chunk that starts inside a head, as the converter reads a device's heads
    r0, r1 = d + 40, 3 * d
    codes = padded_codes(rng, r1 - r0, cols)
    out = np.empty((cols, r1 - r0), BF16)
    dequantise_into(codes, stacked, k_map[r0:r1], BLOCK, out)
    assert_matches_torch(out, torch_dequantised(codes, stacked, k_map[r0:r1], torch.bfloat16))


@pytest.mark.parametrize("rule", ["every row its own", "runs longer than a tile"])
def test_any_row_scale_rule_matches_torch(rule):
    """Runs of one row, and runs of equal grid rows longer than the kernel's row tile."""
    rows, cols = 600, 260
    rng = np.random.default_rng(17)
    codes = padded_codes(rng, rows, cols)
    if rule == "every row its own":
        row_scale = rng.integers(0, 5, rows)
    else:
        row_scale = standard_row_scales(rows, 512)
    scales = grid(rng, 5, cols)
    out = np.empty((cols, rows), BF16)
    dequantise_into(codes, scales, row_scale, BLOCK, out)
    assert_matches_torch(out, torch_dequantised(codes, scales, row_scale, torch.bfloat16))
    assert_matches_numpy_path(codes, scales, row_scale, out)


def test_nan_codes_and_non_finite_scales_are_counted():
    rows, cols = 260, 300
    rng = np.random.default_rng(3)
    codes = padded_codes(rng, rows, cols)
    codes[codes & 0x7F == 0x7F] = 0
    codes[5, 7], codes[200, 299], codes[259, 0] = 0x7F, 0xFF, 0x7F  # the two NaN codes
    scales = np.full((3, 3), 0.01, np.float32)
    scales[1, 2] = np.inf  # rows 128..255, columns 256..299
    scales[2, 0] = np.nan  # rows 256..259, columns 0..127
    row_scale = standard_row_scales(rows, BLOCK)
    out = np.empty((cols, rows), BF16)
    n = dequantise_into(codes, scales, row_scale, BLOCK, out)
    expected = torch_dequantised(codes, scales, row_scale, torch.bfloat16)
    assert_matches_torch(out, expected)
    assert_matches_numpy_path(codes, scales, row_scale, out)
    # the NaN code at (5, 7), every value of the inf block (inf * 0 is NaN) and of the NaN block
    assert n == 1 + 128 * 44 + 4 * 128
    assert n == int((~np.isfinite(out.astype(np.float32))).sum())
    assert out.view(np.uint16)[7, 5] == 0x7FC0 and out.view(np.uint16)[299, 200] == 0xFFC0


def test_writes_only_its_column_band_of_a_larger_destination():
    rows, cols = 192, 260
    rng = np.random.default_rng(11)
    codes = padded_codes(rng, rows, cols)
    scales = grid(rng, 2, cols)
    row_scale = standard_row_scales(rows, BLOCK)
    dst = np.full((cols, 3 * rows), 1.5, BF16)  # e.g. [q | k | v] of a qkv output
    dequantise_into(codes, scales, row_scale, BLOCK, dst[:, rows : 2 * rows])
    assert_matches_torch(
        dst[:, rows : 2 * rows], torch_dequantised(codes, scales, row_scale, torch.bfloat16)
    )
    untouched = np.concatenate([dst[:, :rows], dst[:, 2 * rows :]], axis=1)
    assert (untouched == np.array(1.5, BF16)).all()


@pytest.mark.parametrize("offset", [0, 1, 2, 4])
def test_word_stores_and_element_stores_agree(offset):
    """A bfloat16 destination on 8-byte boundaries takes 4x4 squares as 64-bit words; one that is
    not (offset 1 or 2 elements), ragged edges (rows and columns not multiples of 4) and runs of
    rows starting off a multiple of 4 take the element stores: every case matches torch."""
    rows, cols = 262, 133
    rng = np.random.default_rng(21 + offset)
    codes = padded_codes(rng, rows, cols)
    row_scale = np.repeat(np.arange(6), [3, 125, 5, 7, 120, 2])  # runs of 3, 125, 5, 7, ...
    scales = grid(rng, 6, cols)
    wide = np.full((cols, rows + 10), 1.5, BF16)  # rows 272 elements apart: 8-byte aligned
    out = wide[:, offset : offset + rows]
    n = dequantise_into(codes, scales, row_scale, BLOCK, out)
    assert_matches_torch(out, torch_dequantised(codes, scales, row_scale, torch.bfloat16))
    assert n == int((~np.isfinite(out.astype(np.float32))).sum()) > 0
    assert_matches_numpy_path(codes, scales, row_scale, out)
    assert (wide[:, :offset] == np.array(1.5, BF16)).all()
    assert (wide[:, offset + rows :] == np.array(1.5, BF16)).all()


def test_other_layouts_give_the_same_result():
    """Contiguous, transposed-view and column-strided inputs and outputs (copied internally)."""
    rows, cols = 200, 150
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    scales = grid(rng, 2, cols)
    row_scale = standard_row_scales(rows, BLOCK)
    want = np.empty((cols, rows), BF16)
    dequantise_into(base, scales, row_scale, BLOCK, want)
    codes_views = [base.view(ml_dtypes.float8_e4m3fn), np.asfortranarray(base), base.T.copy().T]
    for codes in codes_views:
        out = np.empty((rows, cols), BF16).T  # a transposed (column-strided) destination
        dequantise_into(codes, scales, row_scale, BLOCK, out)
        np.testing.assert_array_equal(bits(out), bits(want))
    assert_matches_numpy_path(base, scales, row_scale, want)


def test_read_only_inputs():
    """Grids and codes may be memory-mapped from the checkpoint (read-only arrays)."""
    rows, cols = 130, 140
    rng = np.random.default_rng(13)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    scales = grid(rng, 2, cols)
    row_scale = standard_row_scales(rows, BLOCK)
    for a in (codes, scales, row_scale):
        a.flags.writeable = False
    out = np.empty((cols, rows), BF16)
    dequantise_into(codes, scales, row_scale, BLOCK, out)
    assert_matches_numpy_path(codes, scales, row_scale, out)


def test_threads_convert_independent_tensors():
    rng = np.random.default_rng(9)
    jobs = []
    for i in range(4):
        codes = padded_codes(rng, 256 + i, 384)
        scales = grid(rng, 3, 384)
        jobs.append((codes, scales, standard_row_scales(256 + i, BLOCK)))
    outs = [np.empty((384, len(rs)), BF16) for _, _, rs in jobs]
    threads = [
        threading.Thread(target=dequantise_into, args=(c, s, rs, BLOCK, o))
        for (c, s, rs), o in zip(jobs, outs, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (codes, scales, row_scale), out in zip(jobs, outs, strict=True):
        assert_matches_numpy_path(codes, scales, row_scale, out)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(out=np.empty((10, 10), BF16)), "output shape"),
        (dict(out=np.empty((150, 200), np.float16)), "output dtype"),
        (dict(row_scale=np.full(200, 2)), "row_scale indexes past"),
        (dict(row_scale=np.zeros(199, np.int64)), "row_scale has shape"),
        (dict(scales=np.ones((2, 1), np.float32)), "cover fewer than 150 columns"),
        (dict(scales=np.ones((2, 2), np.float64)), "float32 grid"),
    ],
)
def test_rejects_inconsistent_arguments(change, message):
    args = dict(
        codes=np.zeros((200, 150), np.uint8),
        scales=np.ones((2, 2), np.float32),
        row_scale=standard_row_scales(200, BLOCK),
        block_cols=BLOCK,
        out=np.empty((150, 200), BF16),
    )
    with pytest.raises((ValueError, TypeError), match=message):
        dequantise_into(**(args | change))
