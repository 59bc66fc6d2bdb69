"""The compiled transposed copies (``pipeline.fp8_codes``) against NumPy's ``.T``: every element
size, ragged shapes, padded and offset rows (the 64-bit word blocks and the element loop both
run), column bands of wider destinations, read-only sources, the NaN count of FP8 codes and the
non-finite count of bfloat16 and float32 values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import fp8_codes
from pipeline.fp8 import BF16
from pipeline.fp8_codes import transpose_bits_into, transpose_codes_into, transpose_floats_into

SHAPES = [(1, 1), (7, 9), (8, 8), (9, 17), (64, 40), (65, 130), (1030, 72), (24, 2049)]


def source(rows: int, cols: int, dtype, pad: int, skew: int, rng) -> np.ndarray:
    """A ``[rows, cols]`` view with rows ``cols + pad`` elements apart, starting ``skew``
    elements into its buffer (so row starts fall on and off 8-byte boundaries)."""
    top = np.iinfo(dtype).max
    buf = rng.integers(0, top, rows * (cols + pad) + skew, dtype=dtype, endpoint=True)
    return buf[skew:].reshape(rows, cols + pad)[:, :cols]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("shape", SHAPES)
def test_transpose_equals_numpy(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    for pad, skew, band in ((0, 0, 0), (64, 0, 0), (3, 1, 5), (8, 0, 8), (13, 2, 1)):
        a = source(rows, cols, dtype, pad, skew, rng)
        wide = np.zeros((cols, rows + band + 3), dtype)
        out = wide[:, band : band + rows]  # a column band of a wider array
        transpose_bits_into(a, out)
        np.testing.assert_array_equal(out, a.T)
        assert not wide[:, :band].any() and not wide[:, band + rows :].any()  # nothing else


def test_read_only_source_and_wrong_shapes():
    a = np.arange(64 * 24, dtype=np.uint8).reshape(64, 24)
    a.flags.writeable = False
    out = np.empty((24, 64), np.uint8)
    transpose_bits_into(a, out)
    np.testing.assert_array_equal(out, a.T)
    with pytest.raises(ValueError, match="output shape"):
        transpose_bits_into(a, np.empty((64, 24), np.uint8))
    with pytest.raises(TypeError):
        transpose_bits_into(a, np.empty((24, 64), np.uint16))


@pytest.mark.parametrize("shape", [(40, 24), (1030, 72), (7, 9)])
def test_code_copy_counts_nan_codes(shape):
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 0x7F, shape, dtype=np.uint8)  # no NaN codes yet
    flat = codes.reshape(-1)
    where = rng.choice(flat.size, 5, replace=False)
    flat[where[:3]] = 0x7F
    flat[where[3:]] = 0xFF
    out = np.empty(shape[::-1], np.uint8)
    assert transpose_codes_into(codes, out) == 5
    np.testing.assert_array_equal(out, codes.T)


def test_nan_codes_are_counted_in_the_word_blocks_and_at_the_edges(monkeypatch):
    calls = []
    real = fp8_codes._transpose_words
    monkeypatch.setattr(fp8_codes, "_transpose_words", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(5)
    a = source(1036, 76, np.uint8, 68, 0, rng)  # rows 144 bytes apart; ragged: 4 rows, 4 columns
    a[(a & 0x7F) == 0x7F] = 0x7E  # every other code, 0x7E and 0xFE included: no NaN yet
    spots = [(0, 0), (7, 7), (600, 40), (5, 73), (1033, 3), (1035, 75)]  # blocks, edges, corner
    for i, (r, c) in enumerate(spots):
        a[r, c] = 0xFF if i % 2 else 0x7F
    out = np.empty((76, 1040), np.uint8)[:, :1036]
    assert transpose_codes_into(a, out) == len(spots)
    np.testing.assert_array_equal(out, a.T)
    assert len(calls) == 1
    a[...] = 0x7F  # every code NaN: eight a byte lane in each block, no overflow
    assert transpose_codes_into(a, out) == a.size


NON_FINITE_BF16 = (0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0xFFFF)  # +-inf, NaNs (any payload)
NEAR_BF16 = (0x7F7F, 0xFF7F, 0x7F00, 0x0080)  # finite: one exponent bit short, or the mantissa


@pytest.mark.parametrize("skew, pad, words", [(0, 70, 1), (1, 70, 0)])
def test_nonfinite_bfloat16_are_counted_in_the_word_blocks_and_at_the_edges(
    monkeypatch, skew, pad, words
):
    calls = []
    real = fp8_codes._transpose_quads
    monkeypatch.setattr(fp8_codes, "_transpose_quads", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(11)
    bits = source(1034, 74, np.uint16, pad, skew, rng)  # ragged: 2 rows, 2 columns
    bits[(bits & 0x7F80) == 0x7F80] &= 0xBFFF  # every value finite (and the near misses below)
    near = rng.choice(bits.size, 40, replace=False)
    bits.reshape(-1)[near] = np.resize(np.array(NEAR_BF16, np.uint16), near.size)
    spots = [(0, 0), (3, 3), (500, 37), (7, 72), (1032, 5), (1033, 73), (2, 73), (1033, 0)]
    for i, (r, c) in enumerate(spots):  # blocks, the last columns, the last rows, corners
        bits[r, c] = NON_FINITE_BF16[i % len(NON_FINITE_BF16)]
    a = bits.view(BF16)
    out = np.empty((74, 1040), BF16)[:, :1034]
    assert transpose_floats_into(a, out) == len(spots)
    assert np.count_nonzero(~np.isfinite(a.astype(np.float32))) == len(spots)
    np.testing.assert_array_equal(out.view(np.uint16), bits.T)
    assert len(calls) == words
    bits[...] = 0xFFC0  # every value NaN: four a lane in each block, no overflow
    assert transpose_floats_into(a, out) == a.size


def test_float32_transposes_count_nonfinite_and_other_dtypes_are_refused():
    a = np.arange(63 * 35, dtype=np.float32).reshape(63, 35)
    a[[0, 9, 62], [1, 34, 0]] = [np.inf, np.nan, -np.inf]
    out = np.empty((35, 63), np.float32)
    assert transpose_floats_into(a, out) == 3
    np.testing.assert_array_equal(out, a.T)
    with pytest.raises(TypeError, match="float16"):
        transpose_floats_into(a.astype(np.float16), out.astype(np.float16))


@pytest.mark.parametrize(
    "dtype, words, cases",
    [
        # rows 144 or 79 bytes apart; ragged edges: 4 rows, 4 columns
        (np.uint8, "_transpose_words", ((0, 68, 1), (1, 68, 0), (0, 3, 0))),
        # rows 288 or 154 bytes apart (or 2 bytes off a boundary); ragged: 2 rows, 2 columns
        (np.uint16, "_transpose_quads", ((0, 70, 1), (1, 70, 0), (0, 3, 0))),
    ],
)
def test_word_blocks_run_where_rows_are_aligned(monkeypatch, dtype, words, cases):
    calls = []
    real = getattr(fp8_codes, words)
    monkeypatch.setattr(fp8_codes, words, lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(3)
    rows, cols = (1036, 76) if dtype == np.uint8 else (1034, 74)
    for skew, pad, want in cases:
        a = source(rows, cols, dtype, pad, skew, rng)
        out = np.empty((cols, 1040), dtype)[:, :rows]  # rows 1040 elements apart
        transpose_bits_into(a, out)
        np.testing.assert_array_equal(out, a.T)
        assert len(calls) == want, (skew, pad)
        calls.clear()
