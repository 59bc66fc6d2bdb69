"""The converter's per-byte passes other than the kernels: the chunk checksum, the non-finite
count and the row-padded source read, each against an independent computation."""

from __future__ import annotations

import ctypes
import os
import zlib

import ml_dtypes
import numpy as np
import pytest

from loader.verify import crc32_file
from mimo.checksum import crc32, format_crc32
from pipeline import safetensors_io
from pipeline.errors import InputError
from pipeline.nonfinite import count_nonfinite
from pipeline.safetensors_io import read_into


def test_checksum_equals_zlib_in_pieces_and_files(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3_000_001, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    running = 0
    for a, b in ((0, 17), (17, 70_000), (70_000, len(data))):  # in order, any piece sizes
        running = crc32(memoryview(data)[a:b], running)
    assert running == zlib.crc32(data)
    path = tmp_path / "chunk"
    path.write_bytes(data)
    assert crc32_file(path, buf_bytes=1 << 16) == f"crc32:{zlib.crc32(data):08x}"
    assert format_crc32(5) == "crc32:00000005"


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_nonfinite_count_on_bands_and_odd_shapes(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((67, 301)).astype(dtype)
    flat = a.reshape(-1)
    where = rng.choice(flat.size, 40, replace=False)
    flat[where[:15]] = np.nan
    flat[where[15:30]] = np.inf
    flat[where[30:]] = -np.inf
    assert count_nonfinite(a) == 40
    band = a[:, 100:203]  # unit-stride rows, 301 apart
    assert count_nonfinite(band) == int((~np.isfinite(band.astype(np.float32))).sum())
    assert count_nonfinite(a[::2]) == int((~np.isfinite(a[::2].astype(np.float32))).sum())
    assert count_nonfinite(a.T) == 40  # no unit-stride rows: counted on a copy
    assert count_nonfinite(a.reshape(67, 7, 43)) == 40
    assert count_nonfinite(a[:0]) == 0


def test_padded_read_equals_the_file_and_reports_truncation(tmp_path):
    rng = np.random.default_rng(2)
    rows, cols, pad = 2500, 96, 64  # more rows than one preadv takes (IOV_MAX)
    data = rng.integers(0, 256, 10 + rows * cols, dtype=np.uint8)
    path = tmp_path / "tensor.bin"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = np.full((rows, cols + pad), 7, np.uint8)
        out = read_into(fd, 10, buf[:, :cols], "t")
        np.testing.assert_array_equal(out, data[10:].reshape(rows, cols))
        assert (buf[:, cols:] == 7).all()  # the padding is never written
        wide = np.empty((rows // 2, cols + pad), np.uint16)[:, : cols // 2]
        read_into(fd, 10, wide, "t")
        half = data[10 : 10 + rows * cols // 2].reshape(rows // 2, cols)
        np.testing.assert_array_equal(wide.view(np.uint8), half)
        with pytest.raises(InputError, match="'t'.*unexpected end of file"):
            read_into(fd, 11, np.empty((rows, cols + pad), np.uint8)[:, :cols], "'t'")
        with pytest.raises(ValueError, match="unit-stride rows"):
            read_into(fd, 0, np.empty((8, 8), np.uint8).T[:, :4], "t")
    finally:
        os.close(fd)


def test_short_reads_resume_where_they_stopped(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    rows, cols = 300, 50
    data = rng.integers(0, 256, rows * cols, dtype=np.uint8)
    path = tmp_path / "tensor.bin"
    data.tofile(path)
    real, calls = safetensors_io._preadv, []

    def short(fd, iov_address, count, offset):  # at most 777 bytes a call, cutting rows anywhere
        iov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(iov_address))
        cut, budget = iov.reshape(count, 2).copy(), 777
        for i in range(count):
            cut[i, 1] = min(int(cut[i, 1]), budget)
            budget -= int(cut[i, 1])
            if budget == 0:
                break
        calls.append(offset)
        return real(fd, cut.ctypes.data, i + 1, offset)

    monkeypatch.setattr(safetensors_io, "_preadv", short)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = read_into(fd, 0, np.empty((rows, cols + 13), np.uint8)[:, :cols], "t")
        whole = read_into(fd, 0, np.empty(rows * cols, np.uint8), "t")
    finally:
        os.close(fd)
    np.testing.assert_array_equal(out, data.reshape(rows, cols))
    np.testing.assert_array_equal(whole, data)
    assert calls[:3] == [0, 777, 1554]  # each call resumed where the last one stopped
