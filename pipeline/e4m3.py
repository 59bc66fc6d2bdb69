"""OCP float8_e4m3fn block-scaled codes -> Trainium2's IEEE-style float8_e4m3, block by block.

Both formats are ``S EEEE MMM`` with exponent bias 7, and every code with ``|x| < 256`` (exponent
field below 15) has the same bit pattern and value in both. They differ only at exponent 15: OCP
uses it for the finite values 256..448 (and NaN at mantissa 7); IEEE reserves it for inf
(mantissa 0) and NaN. A block of the 128x128 scale grid that holds a finite code with
``|x| >= 256`` is therefore *halved*: every code is replaced by the float8_e4m3 code nearest to
half its value (round to nearest, ties to even) and the block's scale is doubled. Other blocks keep
their bits and scale.

Exactness of halving a code of magnitude field ``mag = code & 0x7F`` (exponent ``mag >> 3``):

- exponent >= 2: the exponent drops by one and the mantissa is kept -- exact
  (``mag - 8``; 448 becomes 224, below 240);
- exponent 0 or 1: the value is ``mag * 2**-9`` (subnormals ``m * 2**-9``; exponent 1 is
  ``(8 + m) * 2**-9``), so half of it is ``mag/2`` units of ``2**-9``, rounded to an integer
  ``k`` in 0..8, which is code ``k`` (``0x08`` = ``2**-6``, the smallest normal, for ``mag`` 15
  and 16). It is exact when ``mag`` is even. The 8 odd
  magnitudes 1, 3, ..., 15 (codes 0x01, 0x03, ..., 0x0F and the same with the sign bit) are ties
  and round to even: codes 0x01 -> 0x00 (a zero of the same sign), 0x03 -> 0x02,
  0x05 -> 0x02, 0x07 -> 0x04, 0x09 -> 0x04, 0x0B -> 0x06, 0x0D -> 0x06, 0x0F -> 0x08;
- NaN (``mag = 0x7F``): kept bit for bit; ``0x7F``/``0xFF`` are NaN in both formats.

Every inexact element is off by exactly ``2**-9 * scale`` in dequantised units (``scale`` the
block's original scale, i.e. ``2**-10`` of the doubled one), and that is the bound. Exact elements
dequantise to the same float32: ``f32(x/2) * 2s`` and ``f32(x) * s`` round the same real number
(for any scale whose double is finite).

The block grid follows the array's own axes, so the function serves the store's transposed layout
(``[H, 2I]`` codes with ``[ceil(H/128), ceil(2I/128)]`` scales) as well as the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from pipeline.errors import InputError


@dataclass(frozen=True)
class Format:
    """Facts about one float8 encoding of ``S EEEE MMM`` codes."""

    dtype: np.dtype
    max_finite: float
    nan_codes: tuple[int, ...]
    inf_codes: tuple[int, ...]


FORMATS: dict[str, Format] = {
    "float8_e4m3fn": Format(
        dtype=np.dtype(ml_dtypes.float8_e4m3fn),
        max_finite=448.0,
        nan_codes=(0x7F, 0xFF),
        inf_codes=(),
    ),
    "float8_e4m3": Format(
        dtype=np.dtype(ml_dtypes.float8_e4m3),
        max_finite=240.0,
        nan_codes=tuple(range(0x79, 0x80)) + tuple(range(0xF9, 0x100)),
        inf_codes=(0x78, 0xF8),
    ),
}
SIGN = 0x80
MAG = 0x7F
NAN_MAG = 0x7F  # OCP's only NaN magnitude
OVER_MAG = 0x78  # OCP magnitudes 0x78..0x7E are 256..448: not finite in float8_e4m3
SUBNORMAL_UNIT = 2.0**-9  # the smallest subnormal: magnitude field 1, one step of exponents 0 and 1
INEXACT_ERROR = SUBNORMAL_UNIT  # |error| of an inexact halved code, in units of the block scale


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per code: ``HALVE`` u8 (halved with RNE), ``INEXACT`` bool (halving rounds), ``OVER`` bool
    (finite with ``|x| >= 256``: its block must be halved)."""
    code = np.arange(256, dtype=np.uint8)
    sign, mag = code & SIGN, code & MAG
    small = mag < 0x10  # exponent 0 or 1: the value is mag * 2**-9
    tie_up = mag & (mag >> 1) & 1  # odd mag rounds up when mag >> 1 is odd (ties to even)
    halved = np.where(small, (mag >> 1) + tie_up, mag - 0x08)
    halved = np.where(mag == NAN_MAG, mag, halved).astype(np.uint8)
    inexact = small & ((mag & 1) == 1)
    over = (mag >= OVER_MAG) & (mag != NAN_MAG)
    return (sign | halved).astype(np.uint8), inexact, over


HALVE, INEXACT, OVER = _tables()


@dataclass(frozen=True)
class HalvingStats:
    """What :func:`ocp_to_trn` changed.

    ``halved_blocks`` blocks had their codes halved and scale doubled; ``inexact`` elements of
    those rounded (each by ``INEXACT_ERROR * original scale``); ``max_abs_error`` is the largest
    such error in dequantised units (0.0 when none).
    """

    halved_blocks: int
    inexact: int
    max_abs_error: float


def _block_count(flags: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """How many of ``flags [R, C]`` are set in each block (ragged edges included) -> [nR, nC]."""
    rows, cols = flags.shape
    per_row = np.add.reduceat(
        flags.view(np.uint8), np.arange(0, cols, block[1]), axis=1, dtype=np.int32
    )  # [R, nC], along contiguous memory first
    return np.add.reduceat(per_row, np.arange(0, rows, block[0]), axis=0)


def _per_element(grid: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Broadcast a block grid ``[nR, nC]`` to elements ``[R, C]`` (ragged edges sliced off)."""
    rows = np.repeat(grid, block[0], axis=0)[: shape[0]]
    return np.repeat(rows, block[1], axis=1)[:, : shape[1]]


def ocp_to_trn(
    codes: np.ndarray,
    scales: np.ndarray,
    block: tuple[int, int] = (128, 128),
    *,
    name: str = "codes",
) -> tuple[np.ndarray, np.ndarray, HalvingStats]:
    """Re-encode OCP e4m3fn block-scaled codes as float8_e4m3 codes with adjusted scales.

    ``codes [R, C]`` uint8 (or float8_e4m3fn) bits; ``scales [ceil(R/b0), ceil(C/b1)]`` float32
    multipliers, block ``(b0, b1)`` along the array's own axes. Returns ``(codes_trn u8[R, C],
    scales_trn f32[same grid], stats)``: blocks holding a finite ``|x| >= 256`` code are halved
    (module docstring), the rest are unchanged. NaN codes stay NaN. Raises :class:`InputError`
    naming ``name`` when the scale grid does not fit the codes.
    """
    bits = np.ascontiguousarray(codes).view(np.uint8)
    if bits.ndim != 2:
        raise InputError(f"{name}: expected 2-D codes, got shape {tuple(bits.shape)}")
    grid = tuple(-(-n // b) for n, b in zip(bits.shape, block, strict=True))
    if tuple(scales.shape) != grid:
        raise InputError(
            f"{name}: scale grid {tuple(scales.shape)} does not match codes "
            f"{tuple(bits.shape)} in {block[0]}x{block[1]} blocks (expected {grid})"
        )
    scales = np.asarray(scales, np.float32)
    if bits.size == 0:
        return bits.copy(), scales.copy(), HalvingStats(0, 0, 0.0)
    halve = _block_count(OVER[bits], block) > 0  # [nR, nC]
    if halve.all():  # the usual case: scales are amax / 448, so every block reaches 448
        codes_trn = HALVE[bits]
    else:
        codes_trn = np.where(_per_element(halve, bits.shape, block), HALVE[bits], bits)
    scales_trn = np.where(halve, scales * np.float32(2), scales).astype(np.float32)
    rounded = _block_count(INEXACT[bits], block) * halve  # [nR, nC] inexact codes per block
    inexact = int(rounded.sum())
    worst = float(np.abs(scales[rounded > 0]).max()) * INEXACT_ERROR if inexact else 0.0
    return codes_trn, scales_trn, HalvingStats(int(halve.sum()), inexact, worst)
