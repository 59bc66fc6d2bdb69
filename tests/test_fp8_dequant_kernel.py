"""The FP8 block-dequantisation kernel against a block-by-block reference, for both encodings."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pipeline.e4m3 import ocp_to_trn
from runtime.kernels.fp8_dequant import dequant_blocks
from tests.nkipy_rules import check_kernel

ENCODINGS = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e4m3": ml_dtypes.float8_e4m3}
SHAPES = [(2, 256, 384), (3, 200, 130), (1, 5, 7), (2, 128, 1), (1, 129, 257)]
rng = np.random.default_rng(0)


def grid(k: int, n: int, block: int) -> tuple[int, int]:
    return -(-k // block), -(-n // block)


def random_case(shape, dtype, block=128):
    codes = rng.integers(0, 256, shape, dtype=np.uint8).view(dtype)  # every code, NaN/inf too
    scales = (rng.random((shape[0], *grid(*shape[1:], block))) * 1e-2).astype(np.float32)
    return codes, scales


def reference(codes, scales, block):
    out = np.empty(codes.shape, np.float32)
    for e in range(codes.shape[0]):
        for i in range(scales.shape[1]):
            for j in range(scales.shape[2]):
                sl = (e, slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
                out[sl] = codes[sl].astype(np.float32) * scales[e, i, j]
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_matches_block_reference(encoding, shape):
    codes, scales = random_case(shape, ENCODINGS[encoding])
    out = dequant_blocks(codes, scales)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, reference(codes, scales, 128))


@pytest.mark.parametrize("block", [1, 4, 16])
def test_other_block_sizes(block):
    codes, scales = random_case((2, 33, 18), ENCODINGS["float8_e4m3"], block)
    np.testing.assert_array_equal(
        dequant_blocks(codes, scales, block), reference(codes, scales, block)
    )


@pytest.mark.parametrize("shape", [(2, 256, 384), (3, 200, 130)], ids=["aligned", "ragged"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_follows_nkipy_tracing_rules(encoding, shape, monkeypatch):
    codes, scales = random_case(shape, ENCODINGS[encoding])
    arrays = {"codes": codes, "scales": scales}
    assert check_kernel(dequant_blocks, arrays, {"block": 128}, monkeypatch) == []


def test_reencoded_experts_dequantise_to_the_checkpoint_values():
    """Experts stored transposed as float8_e4m3 give the OCP values, but for the counted ties."""
    experts, h, two_i = 3, 256, 200  # gate_up (E, H, 2I), ragged 2I
    ocp = rng.integers(0, 256, (experts, h, two_i), dtype=np.uint8)
    ocp[(ocp & 0x7F) == 0x7F] = 0x00  # finite weights only
    scales = (rng.random((experts, *grid(h, two_i, 128))) * 1e-2).astype(np.float32)
    pieces = [ocp_to_trn(ocp[e], scales[e]) for e in range(experts)]
    trn = np.stack([p[0] for p in pieces]).view(ml_dtypes.float8_e4m3)
    trn_scales = np.stack([p[1] for p in pieces])
    want = dequant_blocks(ocp.view(ml_dtypes.float8_e4m3fn), scales)
    got = dequant_blocks(trn, trn_scales)
    assert np.isfinite(got).all()
    assert int(np.sum(got != want)) == sum(p[2].inexact for p in pieces) > 0
    worst = max(p[2].max_abs_error for p in pieces)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= worst * (1 + 2.0**-18)  # the exact error, give or take two float32 roundings


@pytest.mark.parametrize("encoding", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3])
@pytest.mark.parametrize(("shape", "parts"), [((320, 192), 2), ((96, 320), 1), ((256, 512), 2)])
def test_cpu_expert_dequantisation_equals_the_kernel(encoding, shape, parts):
    """The CPU backend's fast per-expert path computes exactly the device kernel's values."""
    from runtime.cpu_fp8 import dequant_expert
    from runtime.kernels.fp8_dequant import dequant_parts

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) >= 0x78] = 0x11  # finite codes of both encodings
    codes = bits.view(encoding)
    n = shape[1] // parts
    scales = rng.random((-(-shape[0] // 128), parts * -(-n // 128)), dtype=np.float32)
    want = dequant_parts(codes, scales, parts)
    np.testing.assert_array_equal(dequant_expert("t", codes, scales, parts), want)
