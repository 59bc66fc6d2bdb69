"""OCP e4m3fn -> Trainium2 e4m3 re-encoding: dequantised values survive, except the documented
subnormal ties, which are off by exactly 2**-9 of the block scale."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pipeline.e4m3 import FORMATS, HALVE, INEXACT, INEXACT_ERROR, ocp_to_trn
from pipeline.errors import InputError

OCP = np.dtype(ml_dtypes.float8_e4m3fn)
TRN = np.dtype(ml_dtypes.float8_e4m3)
ALL = np.arange(256, dtype=np.uint8)
# The rounding cases: odd magnitude fields with exponent 0 or 1, either sign.
DOCUMENTED_INEXACT = {s | m for s in (0x00, 0x80) for m in range(1, 16, 2)}
rng = np.random.default_rng(0)


def value(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return bits.view(dtype).astype(np.float32)


def blocks(shape, block):
    for i in range(-(-shape[0] // block[0])):
        for j in range(-(-shape[1] // block[1])):
            yield (
                i,
                j,
                (
                    slice(i * block[0], (i + 1) * block[0]),
                    slice(j * block[1], (j + 1) * block[1]),
                ),
            )


def check_reencoding(codes, scales, block):
    """Check every element of ``ocp_to_trn(codes, scales, block)`` against ml_dtypes dequant."""
    out, out_scales, stats = ocp_to_trn(codes, scales, block)
    assert out.dtype == np.uint8 and out.shape == codes.shape
    assert out_scales.dtype == np.float32 and out_scales.shape == scales.shape
    halved = inexact = 0
    worst = 0.0
    for i, j, sl in blocks(codes.shape, block):
        src, dst, s, t = codes[sl], out[sl], scales[i, j], out_scales[i, j]
        before = value(src, OCP)
        big = np.isfinite(before) & (np.abs(before) >= 256)
        if not big.any():
            np.testing.assert_array_equal(dst, src)
            assert t == s
            continue
        halved += 1
        assert t == np.float32(2) * s
        after = value(dst, TRN)
        np.testing.assert_array_equal(np.isnan(after), np.isnan(before))
        assert not np.isinf(after).any()
        finite = ~np.isnan(before)
        nearest_half = (before / np.float32(2)).astype(TRN).view(np.uint8)  # ties to even
        np.testing.assert_array_equal(dst[finite], nearest_half[finite])
        rounded = np.isin(src, list(DOCUMENTED_INEXACT))
        exact = finite & ~rounded
        np.testing.assert_array_equal((after * t)[exact], (before * s)[exact])
        err = np.abs(after.astype(np.float64) * t - before.astype(np.float64) * s)[rounded]
        np.testing.assert_array_equal(err, INEXACT_ERROR * abs(float(s)))
        inexact += int(rounded.sum())
        worst = max([worst, *err.tolist()])
    np.testing.assert_array_equal(out & 0x80, codes & 0x80)  # sign preserved, zeros too
    np.testing.assert_array_equal(out[(codes & 0x7F) == 0], codes[(codes & 0x7F) == 0])
    assert (stats.halved_blocks, stats.inexact) == (halved, inexact)
    assert stats.max_abs_error == worst
    return out, out_scales, stats


def test_format_facts_match_ml_dtypes():
    for name, fmt in FORMATS.items():
        vals = value(ALL, fmt.dtype)
        assert fmt.dtype == np.dtype(getattr(ml_dtypes, name))
        assert float(ml_dtypes.finfo(fmt.dtype).max) == fmt.max_finite
        assert tuple(np.flatnonzero(np.isnan(vals))) == fmt.nan_codes
        assert tuple(np.flatnonzero(np.isinf(vals))) == fmt.inf_codes


def test_codes_below_256_have_the_same_value_in_both_formats():
    ocp, trn = value(ALL, OCP), value(ALL, TRN)
    below = np.abs(ocp) < 256
    np.testing.assert_array_equal(ocp[below], trn[below])
    assert np.isnan(trn[np.isnan(ocp)]).all()  # OCP's NaN bits are NaN on Trainium too
    assert below.sum() == 256 - 16  # 256..448 and NaN, either sign


def test_halve_table_is_round_to_nearest_even_of_half():
    ocp = value(ALL, OCP)
    finite = ~np.isnan(ocp)
    want = (ocp / np.float32(2)).astype(TRN).view(np.uint8)  # ml_dtypes rounds to nearest even
    np.testing.assert_array_equal(HALVE[finite], want[finite])
    np.testing.assert_array_equal(HALVE[~finite], ALL[~finite])  # NaN keeps its bits
    rounded = value(HALVE, TRN) * np.float32(2) != ocp
    np.testing.assert_array_equal(INEXACT, rounded & finite)
    assert set(np.flatnonzero(INEXACT)) == DOCUMENTED_INEXACT


def test_every_code_in_a_halved_block():
    codes = np.tile(ALL, 64).reshape(128, 128)
    rng.shuffle(codes.reshape(-1))
    scales = np.array([[3.7e-5]], np.float32)
    _, out_scales, stats = check_reencoding(codes, scales, (128, 128))
    assert stats.halved_blocks == 1 and stats.inexact == 16 * 64
    assert stats.max_abs_error == 2.0**-9 * float(scales[0, 0])


def random_codes(shape, block, big=lambda i, j: (i + j) % 2 == 0):
    """Random codes; blocks where ``big(i, j)`` hold at least one code >= 256, the rest none."""
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    small = rng.integers(0, 0x78, shape, dtype=np.uint8) | (codes & 0x80)
    for i, j, sl in blocks(shape, block):
        if big(i, j):
            view = codes[sl]
            r, c = rng.integers(view.shape[0]), rng.integers(view.shape[1])
            view[r, c] = rng.integers(0x78, 0x7F) | (view[r, c] & 0x80)  # 256..448
        else:
            codes[sl] = small[sl]
    return codes


@pytest.mark.parametrize(
    "shape, block",
    [
        ((256, 384), (128, 128)),
        ((300, 200), (128, 128)),
        ((5, 130), (128, 128)),
        ((70, 45), (16, 8)),
    ],
)
def test_random_blocks_including_ragged_edges(shape, block):
    codes = random_codes(shape, block)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scales = (rng.random(grid) * 1e-3).astype(np.float32)
    _, _, stats = check_reencoding(codes, scales, block)
    assert 0 < stats.halved_blocks < grid[0] * grid[1]


def test_blocks_without_large_codes_keep_bits_and_scale():
    codes = random_codes((256, 256), (128, 128), big=lambda i, j: False)
    codes[:3, :3] = 0x7F  # NaN alone does not trigger halving
    codes[200, 200] = 0x77  # 240, the largest code both formats share
    scales = np.full((2, 2), 0.5, np.float32)
    out, out_scales, stats = ocp_to_trn(codes, scales)
    np.testing.assert_array_equal(out, codes)
    np.testing.assert_array_equal(out_scales, scales)
    assert (stats.halved_blocks, stats.inexact, stats.max_abs_error) == (0, 0, 0.0)


def test_one_large_code_halves_only_its_block():
    codes = np.full((256, 256), 0x09, np.uint8)  # 2**-6 * 9/8: inexact when halved
    codes[130, 5] = 0xF8  # -256
    scales = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)
    out, out_scales, stats = check_reencoding(codes, scales, (128, 128))
    np.testing.assert_array_equal(out_scales, [[1.0, 2.0], [8.0, 8.0]])
    assert out[130, 5] == 0xF0 and value(out[130:131, 5], TRN)[0] == -128.0
    assert stats.halved_blocks == 1 and stats.inexact == 128 * 128 - 1
    assert stats.max_abs_error == 4.0 * 2.0**-9


def test_output_has_no_infinities_and_fits_float8_e4m3():
    codes = random_codes((384, 256), (128, 128), big=lambda i, j: True)
    out, _, _ = ocp_to_trn(codes, np.ones((3, 2), np.float32))
    vals = value(out, TRN)
    assert not np.isinf(vals).any()
    assert np.abs(vals[np.isfinite(vals)]).max() <= FORMATS["float8_e4m3"].max_finite


def test_transposed_layout_is_the_transpose():
    codes = random_codes((300, 200), (128, 128))
    scales = (rng.random((3, 2)) + 0.5).astype(np.float32)
    out, out_scales, stats = ocp_to_trn(codes, scales)
    out_t, out_scales_t, stats_t = ocp_to_trn(codes.T, scales.T)
    np.testing.assert_array_equal(out_t, out.T)
    np.testing.assert_array_equal(out_scales_t, out_scales.T)
    assert stats_t == stats


def test_accepts_float8_e4m3fn_arrays():
    codes = random_codes((128, 256), (128, 128))
    scales = np.ones((1, 2), np.float32)
    a = ocp_to_trn(codes, scales)
    b = ocp_to_trn(codes.view(OCP), scales)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]


def test_scale_grid_mismatch_names_the_tensor():
    with pytest.raises(InputError, match=r"experts\.0\.gate_up.*\(2, 3\)"):
        ocp_to_trn(
            np.zeros((256, 256), np.uint8), np.ones((2, 3), np.float32), name="experts.0.gate_up"
        )
