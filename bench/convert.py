"""Conversion speed and memory against the raw-I/O floor, measured in one run.

For each checkpoint size (full-width synthetic checkpoints: real tensor shapes, few layers):

- floor: read every source byte, then write the output's byte count, with plain sequential I/O
  and an fsync; and the same with O_DIRECT writes (the disk's own speed: on VMs the page-cache
  copy of buffered writes costs CPU time that depends on the guest's memory state);
- mimo-shard: the conversion in a child process; wall time and peak RSS (``wait4`` rusage).

The source is read once first so both sides read it from the page cache; floor and conversion
then alternate ``--repeats`` times and the best of each is compared (the machine is shared).

Also: the FP8 -> BF16 dequantisation rate of one core (the table-lookup kernel alone, and with the
transposition into kernel layout), and the cost of the manifest checksum (CRC32) against SHA-256.

    python bench/convert.py [--layers 6 12] [--experts 8] [--devices 4] [--workers 3]
                            [--repeats 2] [--work bench-out] [--keep]

Goals: conversion / floor <= 1.3; peak RSS <= 2 GB and flat across sizes; dequant >= 1 GB/s/core.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mimo.fp8 import standard_row_scales  # noqa: E402
from pipeline.fp8 import BF16, dequantise_transposed, quantise  # noqa: E402
from pipeline.synth import preset_config, write_checkpoint  # noqa: E402
from pipeline.transforms import ROW_PAD, transpose_into  # noqa: E402

CHUNK = 64 << 20


def checkpoint(work: Path, layers: int, experts: int) -> Path:
    path = work / f"full-width-L{layers}-E{experts}"
    if not (path / "model.safetensors.index.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        print(f"writing {path} ...", flush=True)
        write_checkpoint(path, preset_config("full-width", layers, experts), seed=0)
    return path


def raw_floor(src: Path, out_bytes: int, dest: Path, direct: bool = False) -> float:
    """Seconds to read every source file and write ``out_bytes`` sequentially, then fsync.

    ``direct`` writes with O_DIRECT (the disk's own speed, no page-cache copy).
    """
    raw = np.zeros(CHUNK + 4096, np.uint8)
    buf = raw[-raw.ctypes.data % 4096 :][:CHUNK]  # 4 KiB-aligned, as O_DIRECT needs
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(dest, flags, 0o644)
    left, off = out_bytes, 0
    while left > 0:
        n = min(CHUNK, left)
        n = n - n % 4096 if direct and n >= 4096 else n
        if direct and n < 4096:  # the unaligned tail goes through the page cache
            os.close(fd)
            fd = os.open(dest, os.O_WRONLY)
        os.pwrite(fd, memoryview(buf)[:n], off)
        left, off = left - n, off + n
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    dest.unlink()
    return dt


def run_convert(src: Path, out: Path, devices: int, workers: int) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, summary line) of a mimo-shard child process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        str(src),
        str(out),
        "--devices",
        str(devices),
        "--workers",
        str(workers),
        "--quiet",
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    line = p.stdout.read().strip()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mimo-shard failed: {line}")
    return dt, usage.ru_maxrss * 1024, line


def output_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def core_rates() -> dict[str, float]:
    """Single-thread rates in GB/s of BF16 output (or of hashed bytes)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    rows = standard_row_scales(4096, 128)
    codes, scales = quantise(w, rows, 32, 128)
    out = np.empty((4096, 4096), BF16)

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = out.nbytes
    data = memoryview(out.view(np.uint8).reshape(-1))
    codes_u8 = np.empty((4096, 4096 + ROW_PAD), np.uint8)[:, :4096]  # as the converter reads them
    codes_u8[...] = codes.view(np.uint8)
    codes_t = transpose_into(codes_u8, np.empty((4096, 4096), np.uint8))

    def convert_path():  # what the converter runs: transpose the codes, dequantise into place
        transpose_into(codes_u8, codes_t)
        dequantise_transposed(codes_t, scales, rows, 128, BF16, out)

    return {
        "dequant": nbytes
        / best(lambda: dequantise_transposed(codes_t, scales, rows, 128, BF16, out))
        / 1e9,
        "dequant+transpose": nbytes / best(convert_path) / 1e9,
        "crc32": nbytes / best(lambda: zlib.crc32(data)) / 1e9,
        "sha256": nbytes / best(lambda: hashlib.sha256(data).digest()) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side (best is kept)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints for the next run")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    for layers in args.layers:
        src = checkpoint(args.work, layers, args.experts)
        out = args.work / "out"
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        raw_floor(src, 0, args.work / "floor.bin")  # warm the page cache: both sides read warm
        convs, floors, directs, rss, out_b, line = [], [], [], 0, 0, ""
        for _ in range(args.repeats):  # alternate, so drift and noise hit both sides alike
            dt, peak, line = run_convert(src, out, args.devices, args.workers)
            out_b = output_bytes(out)
            shutil.rmtree(out)
            convs.append(dt)
            rss = max(rss, peak)
            floors.append(raw_floor(src, out_b, args.work / "floor.bin"))
            directs.append(raw_floor(src, out_b, args.work / "floor.bin", direct=True))
        rows.append((layers, src_bytes, out_b, min(convs), min(floors), min(directs), rss))
        print(line, flush=True)
        if not args.keep:
            shutil.rmtree(src)

    rates = core_rates()
    print()
    print("floor: plain buffered writes + fsync; direct: the same bytes written with O_DIRECT")
    print(
        f"{'layers':>6} {'source GB':>10} {'output GB':>10} {'convert s':>10} {'floor s':>8} "
        f"{'ratio':>6} {'direct s':>9} {'ratio':>6} {'MB/s out':>9} {'peak RSS GB':>12}"
    )
    for layers, sb, ob, conv, floor, direct, rss in rows:
        print(
            f"{layers:>6} {sb / 1e9:>10.2f} {ob / 1e9:>10.2f} {conv:>10.1f} {floor:>8.1f} "
            f"{conv / floor:>6.2f} {direct:>9.1f} {conv / direct:>6.2f} {ob / conv / 1e6:>9.0f} "
            f"{rss / 1e9:>12.2f}"
        )
    if len(rows) > 1:
        print(
            f"peak RSS growth from {rows[0][0]} to {rows[-1][0]} layers: "
            f"{rows[-1][6] / rows[0][6]:.2f}x for {rows[-1][1] / rows[0][1]:.2f}x the source"
        )
    print()
    print("one core, GB/s of BF16 output (hashes: GB/s hashed):")
    for k, v in rates.items():
        print(f"  {k:18} {v:6.2f}")
    last = rows[-1]
    print(
        f"CRC32 of the output costs {last[2] / rates['crc32'] / 1e9 / last[3] * 100:.1f}% of the "
        f"conversion time (SHA-256 would cost "
        f"{last[2] / rates['sha256'] / 1e9 / last[3] * 100:.1f}%)"
    )


if __name__ == "__main__":
    main()
