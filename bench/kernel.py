"""FP8 -> BF16 dequantisation into kernel layout: NumPy paths against the compiled kernel.

In one run, on quantised random weights read as the converter reads them (row-padded code buffer,
converter-sized row chunks written into column bands of the output):

- (a) ``numpy``: the converter's earlier step, ``transpose_bits_into`` of the codes then
  ``dequantise_transposed`` (256-entry table gather), no non-finite count;
- (b) ``tiled``: a cache-tiled NumPy version of the kernel's contract (gather through the
  transposed view of each tile, non-finite count per tile);
- (c) ``numba``: :func:`pipeline.fp8_kernel.dequantise_into`.

For each shape: GB/s of BF16 output per core (bytes / thread CPU time, best of ``--repeats``, so
other load on the machine counts less; wall-clock best alongside), ratios against (a), and the
speed-up of 2 threads over 1 converting independent tensors (ThreadPoolExecutor). Then the CRC32
of the output (what the manifest records): a separate pass after the whole tensor against
``zlib.crc32`` of each finished 128-row stripe while it is in cache; and the kernel's compile time
with a cold cache and its load time from a warm one (fresh processes).

    python bench/kernel.py [--repeats 9] [--skip-compile]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mimo.fp8 import standard_row_scales  # noqa: E402
from pipeline.fp8 import BF16, _tables, dequantise_transposed  # noqa: E402
from pipeline.fp8_codes import transpose_bits_into  # noqa: E402
from pipeline.fp8_kernel import dequantise_into  # noqa: E402
from pipeline.reading import CHUNK_BYTES, ROW_PAD  # noqa: E402

BLOCK = 128
SHAPES = {"expert [4096, 2048]": (4096, 2048), "dense gate [16384, 4096]": (16384, 4096)}


class Tensor:
    """Random FP8 codes of a hub ``[rows, cols]`` weight, its grid and a ``[cols, rows]`` output."""

    def __init__(self, rows: int, cols: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rows, self.cols = rows, cols
        self.codes = np.empty((rows, cols + ROW_PAD), np.uint8)[:, :cols]
        # e4m3fn codes of a bell-shaped weight: no NaN codes (0x7F, 0xFF)
        self.codes[...] = rng.integers(0, 0x7F, (rows, cols), dtype=np.uint8)
        self.codes[rng.random((rows, cols)) < 0.5] |= 0x80
        self.scales = (rng.random((-(-rows // BLOCK), -(-cols // BLOCK))) * 1e-3).astype(np.float32)
        self.row_scale = standard_row_scales(rows, BLOCK)
        self.out = np.empty((cols, rows), BF16)
        self.step = max(BLOCK, CHUNK_BYTES // (cols * 2) // BLOCK * BLOCK)  # converter chunks
        self.codes_t = np.empty((cols, min(self.step, rows)), np.uint8)

    def chunks(self):
        for r0 in range(0, self.rows, self.step):
            r1 = min(r0 + self.step, self.rows)
            yield r0, r1, self.codes[r0:r1], self.out[:, r0:r1]


def numpy_path(t: Tensor) -> int:
    """(a) The converter's current step: transpose the codes, then dequantise into the band."""
    for r0, r1, codes, band in t.chunks():
        codes_t = t.codes_t[:, : r1 - r0]
        transpose_bits_into(codes, codes_t)
        dequantise_transposed(codes_t, t.scales, t.row_scale[r0:r1], BLOCK, BF16, band)
    return 0


def tiled_dequantise(codes, scales, row_scale, block_cols, out, tile_rows=512) -> int:
    """NumPy with the kernel's contract: ``out [C, R]`` from ``codes [R, C]``; non-finite count."""
    rows, cols = codes.shape
    bits = out.view(np.uint16)
    idx = np.empty((block_cols, tile_rows), np.int32)
    nonfinite = 0
    for r0 in range(0, rows, tile_rows):
        r1 = min(r0 + tile_rows, rows)
        rs = row_scale[r0:r1]
        lo = int(rs.min())
        offset = ((rs - lo) * 256).astype(np.int32)
        used = scales[lo : int(rs.max()) + 1]
        for c0 in range(0, cols, block_cols):
            c1 = min(c0 + block_cols, cols)
            table = _tables(used[:, c0 // block_cols], BF16)
            tile_idx = idx[: c1 - c0, : r1 - r0]
            np.add(codes[r0:r1, c0:c1].T, offset[None, :], out=tile_idx)
            tile = bits[c0:c1, r0:r1]
            np.take(table, tile_idx, out=tile, mode="clip")
            nonfinite += int(np.count_nonzero((tile & 0x7F80) == 0x7F80))
    return nonfinite


def tiled_path(t: Tensor) -> int:
    """(b)"""
    return sum(
        tiled_dequantise(c, t.scales, t.row_scale[r0:r1], BLOCK, b) for r0, r1, c, b in t.chunks()
    )


def numba_path(t: Tensor) -> int:
    """(c)"""
    return sum(
        dequantise_into(c, t.scales, t.row_scale[r0:r1], BLOCK, b) for r0, r1, c, b in t.chunks()
    )


PATHS = {"(a) numpy": numpy_path, "(b) tiled": tiled_path, "(c) numba": numba_path}


def best(fn, repeats: int) -> tuple[float, float]:
    """(best thread CPU seconds, best wall seconds) of ``fn()`` after one warm-up call."""
    fn()
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, time.thread_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall


def per_core(name: str, shape: tuple[int, int], repeats: int) -> None:
    t = Tensor(*shape, seed=0)
    numpy_path(t)
    want = t.out.view(np.uint16).copy()
    print(f"\n{name}: {t.out.nbytes / 1e6:.0f} MB of BF16 output, chunks of {t.step} rows")
    base = None
    for label, fn in PATHS.items():
        t.out[...] = 0
        fn(t)
        assert np.array_equal(t.out.view(np.uint16), want), f"{label} differs from (a)"
        cpu, wall = best(lambda fn=fn: fn(t), repeats)
        base = base or cpu
        print(
            f"  {label:10s} {t.out.nbytes / cpu / 1e9:6.2f} GB/s/core (CPU time)"
            f"  {t.out.nbytes / wall / 1e9:6.2f} GB/s (wall)  x{base / cpu:.2f} vs (a)"
        )


def threads(shape: tuple[int, int], repeats: int, per_thread: int = 3) -> None:
    """Wall-time speed-up of 2 threads over 1 for the same set of independent tensors.

    1- and 2-thread runs alternate and the best of each is kept, so a moment when the machine's
    other core is free counts for both. Also printed: the cores the process got during the best
    2-thread run (process CPU time / wall time); other load on a shared machine lowers it.
    """
    tensors = [Tensor(*shape, seed=i) for i in range(2 * per_thread)]
    nbytes = sum(t.out.nbytes for t in tensors)
    print(f"\n2 threads vs 1, {len(tensors)} independent {list(shape)} tensors (wall time)")
    with ThreadPoolExecutor(2) as pool:
        for label, fn in PATHS.items():
            one = two = float("inf")
            cores = 0.0
            for _ in range(repeats + 1):  # the first round warms up
                w0 = time.perf_counter()
                for t in tensors:
                    fn(t)
                one = min(one, time.perf_counter() - w0)
                p0, w0 = time.process_time(), time.perf_counter()
                list(pool.map(fn, tensors))
                wall = time.perf_counter() - w0
                if wall < two:
                    two, cores = wall, (time.process_time() - p0) / wall
            print(
                f"  {label:10s} 1 thread {nbytes / one / 1e9:5.2f} GB/s, 2 threads "
                f"{nbytes / two / 1e9:5.2f} GB/s: x{one / two:.2f}  ({cores:.2f} cores busy)"
            )


def crc(shape: tuple[int, int], repeats: int, stripe: int = 128) -> None:
    """CRC32 of the finished output: a separate pass against one per output stripe."""
    t = Tensor(*shape, seed=0)
    data = memoryview(t.out.view(np.uint8).reshape(-1))
    row_bytes = t.rows * 2

    def kernel_only():
        dequantise_into(t.codes, t.scales, t.row_scale, BLOCK, t.out)

    def separate():
        kernel_only()
        return zlib.crc32(data)

    def striped():
        value = 0
        for c0 in range(0, t.cols, stripe):
            c1 = min(c0 + stripe, t.cols)
            dequantise_into(
                t.codes[:, c0:c1], t.scales[:, c0 // BLOCK :], t.row_scale, BLOCK, t.out[c0:c1]
            )
            value = zlib.crc32(data[c0 * row_bytes : c1 * row_bytes], value)
        return value

    assert separate() == striped()
    print(f"\nCRC32 of a {list(shape)} tensor's output ({t.out.nbytes / 1e6:.0f} MB), one thread")
    kernel = best(kernel_only, repeats)[0]
    crc_alone = best(lambda: zlib.crc32(data), repeats)[0]
    print(f"  zlib.crc32 alone          {t.out.nbytes / crc_alone / 1e9:6.2f} GB/s")
    print(f"  kernel, no CRC            {t.out.nbytes / kernel / 1e9:6.2f} GB/s")
    for label, fn in (
        ("kernel + separate CRC", separate),
        (f"{stripe}-row stripes + CRC", striped),
    ):
        cpu = best(fn, repeats)[0]
        print(
            f"  {label:25s} {t.out.nbytes / cpu / 1e9:6.2f} GB/s"
            f"  (CRC adds {cpu / kernel - 1:+.0%})"
        )
    with ThreadPoolExecutor(2) as pool:
        one = best(lambda: [zlib.crc32(data) for _ in range(2)], repeats)[1]
        two = best(lambda: list(pool.map(zlib.crc32, [data, data])), repeats)[1]
    print(f"  zlib.crc32, 2 threads vs 1: x{one / two:.2f} (it releases the GIL)")
    for module, attr in (("isal.isal_zlib", "crc32"), ("zlib_ng.zlib_ng", "crc32")):
        try:  # the same CRC32 as zlib, with carry-less multiplication (isal: mimo.checksum's)
            fn = getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            print(f"  {module}.{attr}: not installed")
            continue
        assert fn(data) == zlib.crc32(data)
        cpu = best(lambda fn=fn: fn(data), repeats)[0]
        print(
            f"  {module}.{attr:8s} {t.out.nbytes / cpu / 1e9:6.2f} GB/s"
            f"  (a separate pass would add {cpu / kernel:+.0%})"
        )


CHILD = """
import time, numpy as np
t0 = time.perf_counter()
from pipeline.fp8_kernel import dequantise_into
t1 = time.perf_counter()
from pipeline.fp8 import BF16
dequantise_into(np.zeros((256, 256), np.uint8), np.ones((2, 2), np.float32),
                np.arange(256) // 128, 128, np.empty((256, 256), BF16))
print(t1 - t0, time.perf_counter() - t1)
"""


def compile_time() -> None:
    """Import (compiles the kernel's signatures) and first call, cold then warm numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache}
        print("\nnumba kernel: import + first call in a fresh process")
        for label in ("cold cache", "warm cache"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(
                f"  {label}: import {float(out[0]):.2f} s, first call {float(out[1]) * 1e3:.1f} ms"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--skip-compile", action="store_true", help="skip the compile-time runs")
    args = ap.parse_args()
    for name, shape in SHAPES.items():
        per_core(name, shape, args.repeats)
    threads(SHAPES["expert [4096, 2048]"], args.repeats)
    crc(SHAPES["expert [4096, 2048]"], args.repeats)
    if not args.skip_compile:
        compile_time()


if __name__ == "__main__":
    main()
