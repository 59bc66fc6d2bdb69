"""Conversion speed and memory against the raw-I/O floor, measured in one run.

On a full-width synthetic checkpoint (the real tensor shapes, 6 layers and 8 experts, about
4.5 GB; written once and kept under ``--work``), for ``--expert-dtype bfloat16`` and
``float8_e4m3fn``:

- floors: read every source byte, then write the output's byte count sequentially with an
  fsync, once with plain buffered writes and once with O_DIRECT (the disk's own speed: on VMs the
  page-cache copy of buffered writes costs CPU time that depends on the guest's memory state);
- mimo-shard: the conversion in a child process; wall time, peak RSS (``wait4`` rusage) and
  output bytes; the BF16 conversion also with ``--workers 1`` and ``2`` (the speed-up), and
  at the default workers confined to one core (``sched_setaffinity``): the speed-up from one core
  to all of them, with the same overlap of each worker's writes on both sides.

The source is read once first so every side reads it from the page cache; floors and
conversions alternate ``--repeats`` times and the best of each is kept (the machine is shared).

Also measured: the start-up (a new interpreter importing the converter), this machine's speed-up
from 1 to 2 threads for arithmetic and for a memory-bound copy (both vary from run to run: the
second vCPU is shared), the per-array metadata cost (zarr-python's ``create_array`` against the
converter's direct ``zarr.json`` writes), one core's rate of the FP8 -> BF16 kernel (GB/s of BF16
output) and of the FP8 expert code copy, the kernel's speed-up from 1 to 2 threads, and the
checksum (CRC32). Last, a projection for the real model from the plans in
``manifests/mimo-v2-flash`` (source bytes, output bytes) on a host with C cores and a disk of
D GB/s: ``max((read + write bytes) / D, CPU seconds / C)``, where CPU seconds are the output
bytes over the measured per-core rate (BF16 outputs at the kernel's, FP8 expert codes at the
copy's) plus every output byte over the CRC32 rate; and again, more conservatively, with CPU
seconds at the rate of this run's whole conversions (output bytes per CPU second).

    python bench/convert.py [--layers 6] [--experts 8] [--devices 4] [--workers W]
                            [--repeats 2] [--work bench-out] [--clean]

Goals: time / faster floor <= 1.5 (BF16 experts), <= 1.2 (FP8 experts); kernel >= 1.5 GB/s of
BF16 output per core; 2 workers >= 1.8x one; peak RSS <= 2 GB; real model on 32 cores and a
2 GB/s disk <= 10 min (BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loader.format import CORE_DTYPES, chunk_shape, storage_dtype  # noqa: E402
from mimo.checksum import crc32  # noqa: E402
from mimo.fp8 import standard_row_scales  # noqa: E402
from pipeline.convert import make_plan  # noqa: E402
from pipeline.fp8 import BF16, quantise  # noqa: E402
from pipeline.fp8_codes import transpose_codes_into  # noqa: E402
from pipeline.fp8_kernel import dequantise_into  # noqa: E402
from pipeline.memory import default_workers, peak_memory, worker_memory  # noqa: E402
from pipeline.plan import OutputArray  # noqa: E402
from pipeline.reading import ROW_PAD  # noqa: E402
from pipeline.source import LocalSource  # noqa: E402
from pipeline.store import create_array_metadata, create_store  # noqa: E402
from pipeline.synth import preset_config, write_checkpoint  # noqa: E402

CHUNK = 64 << 20
PLANS = ROOT / "manifests" / "mimo-v2-flash"
EXPERT_DTYPES = ("bfloat16", "float8_e4m3fn")
HOSTS = [(c, d) for c in (32, 192) for d in (2, 8)]  # (cores, disk GB/s) of the projection
ONE_CORE = 0  # in ``runs``: the default workers, confined to one core


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


def run_convert(
    src: Path, out: Path, devices: int, workers: int, expert_dtype: str, one_core: bool = False
) -> tuple[float, int, int, float]:
    """(seconds, peak RSS bytes, output bytes, CPU seconds: user + system) of a mimo-shard child
    process; ``one_core`` confines it to the first CPU this process may use."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", str(src), str(out), "--devices", str(devices)]
    cmd += ["--workers", str(workers), "--expert-dtype", expert_dtype, "--quiet"]
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=pin)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    line = p.stdout.read().strip()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mimo-shard failed: {line}")
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)
    return dt, usage.ru_maxrss * 1024, nbytes, usage.ru_utime + usage.ru_stime


def best(fn, reps: int = 15) -> float:
    """The least time of ``reps`` calls after one more (the first calls into new memory run
    slower here for a while: best of 5 varied by a factor of two from run to run)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def metadata_cost(work: Path, n: int = 300) -> dict[str, float]:
    """Milliseconds per array of zarr-python's ``create_array`` and of the direct writes."""
    import zarr
    from zarr.codecs import BytesCodec

    dtypes = ("bfloat16", "float32", "float8_e4m3fn")
    specs = [
        OutputArray("device-000", f"layers/{i // 8}/experts/a{i % 8}", (8, 64, 32), dtypes[i % 3])
        for i in range(n)
    ]

    def with_zarr(root: Path, spec: OutputArray) -> None:  # what the converter used to call
        raw = storage_dtype(spec.dtype)
        zarr.create_array(
            store=root / "device-000.zarr",
            name=spec.path,
            shape=spec.shape,
            chunks=chunk_shape(spec.shape),
            dtype=raw,
            compressors=None,
            filters=None,
            serializer=BytesCodec(endian="little") if raw.itemsize > 1 else BytesCodec(),
            fill_value=0,
            attributes={} if spec.dtype in CORE_DTYPES else {"logical_dtype": spec.dtype},
            zarr_format=3,
            overwrite=True,
        )

    out = {}
    for name, fn in (("zarr.create_array", with_zarr), ("direct zarr.json", create_array_metadata)):
        times = []
        for _ in range(5):
            root = Path(tempfile.mkdtemp(dir=work))
            create_store(root, "device-000", {})
            os.sync()  # earlier writes' write-back is not charged to this side
            t0 = time.perf_counter()
            for s in specs:
                fn(root, s)
            times.append((time.perf_counter() - t0) / n * 1e3)
            shutil.rmtree(root)
        out[name] = min(times)
    return out


def two_threads(job) -> None:
    """``job(0)`` and ``job(1)`` on two threads at once."""
    ts = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def core_rates() -> dict[str, float]:
    """One thread's rates, GB/s of output (of hashed bytes for CRC32); and the kernel's
    throughput with two threads on two tensors, as a multiple of one thread's."""
    rng = np.random.default_rng(0)
    rows, cols = 2048, 4096  # a routed expert's gate/up: [moe_intermediate, hidden]
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    row_scale = standard_row_scales(rows, 128)
    codes, scales = quantise(w, row_scale, 16, 128)

    def padded() -> np.ndarray:  # codes as the converter reads them: rows ROW_PAD bytes apart
        buf = np.empty((rows, cols + ROW_PAD), np.uint8)[:, :cols]
        buf[...] = codes.view(np.uint8)
        return buf

    inputs = [padded(), padded()]
    outs = [np.empty((cols, rows), BF16), np.empty((cols, rows), BF16)]
    code_out = np.empty((cols, rows), np.uint8)

    def kernel(i: int) -> None:
        dequantise_into(inputs[i], scales, row_scale, 128, outs[i])

    nbytes = outs[0].nbytes
    one = best(lambda: kernel(0))
    two = best(lambda: two_threads(kernel))
    data = memoryview(outs[0].view(np.uint8).reshape(-1))
    return {
        "kernel": nbytes / one / 1e9,
        "kernel 2 threads": 2 * one / two,
        "code copy": code_out.nbytes
        / best(lambda: transpose_codes_into(inputs[0], code_out))
        / 1e9,
        "crc32": nbytes / best(lambda: crc32(data)) / 1e9,
        "zlib crc32": nbytes / best(lambda: zlib.crc32(data)) / 1e9,
    }


@numba.njit(nogil=True, cache=True)
def _arithmetic(n: int) -> int:
    """A register-only loop (no memory traffic)."""
    s = 0
    for _ in range(n):
        s = (s * 1103515245 + 12345) & 0xFFFFFFFF
    return s


@numba.njit(nogil=True, cache=True)
def _stream(src: np.ndarray, dst: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` (memory traffic only, far beyond the caches)."""
    for i in range(src.size):
        dst[i] = src[i]


def machine_scaling() -> dict[str, float]:
    """This machine's throughput with 2 threads as a multiple of 1 thread's, for arithmetic alone
    and for a memory-bound copy of 256 MiB per thread: what any converter's 2-worker speed-up can
    reach here."""
    bufs = [(np.ones(256 << 20, np.uint8), np.ones(256 << 20, np.uint8)) for _ in range(2)]

    def ratio(job) -> float:
        return 2 * best(lambda: job(0), reps=3) / best(lambda: two_threads(job), reps=3)

    return {
        "arithmetic": ratio(lambda i: _arithmetic(100_000_000)),
        "memory copy": ratio(lambda i: _stream(*bufs[i])),
    }


FRESH = """
import time, numpy as np
a = np.empty(1 << 30, np.uint8)
t = time.perf_counter()
a[::4096] = 1
print(time.perf_counter() - t)
"""


def fresh_memory() -> float:
    """Seconds a new process takes to first touch 1 GiB of memory (the page faults alone). On VMs
    whose host reclaims the guest's free memory this swings from ~0.05 to several seconds, and
    every conversion pays it for its buffers; the floors use one 64 MiB buffer."""
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True)
    return float(out.stdout)


def start_up() -> float:
    """Least wall seconds, of 3, for a new interpreter to import the converter and exit, as
    ``mimo-shard`` does (imports frozen for the collector, so the exit skips walking them)."""
    cmd = [sys.executable, "-c", "import gc, pipeline.cli, pipeline.convert; gc.freeze()"]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return min(times)


def real_model() -> dict[str, dict[str, int]]:
    """Per expert dtype: source bytes, output bytes, and the FP8 code/scale bytes among them."""
    out = {}
    for dtype, name in zip(EXPERT_DTYPES, ("dry-run-32.json", "dry-run-32-fp8.json"), strict=True):
        plan = json.loads((PLANS / name).read_text())
        fp8 = sum(
            k["bytes"] * k["arrays"] for k in plan["kinds"] if k["dtype"].startswith("float8")
        )
        scales = sum(
            k["bytes"] * k["arrays"] for k in plan["kinds"] if k["path"].endswith("_scale")
        )
        out[dtype] = {
            "in": plan["source_bytes"],
            "out": plan["bytes"]["total"],
            "fp8": fp8 + scales,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None, help="default: mimo-shard's")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side (best is kept)")
    ap.add_argument("--clean", action="store_true", help="remove the checkpoint afterwards")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    fresh = [fresh_memory()]
    meta = metadata_cost(args.work)
    src = checkpoint(args.work, args.layers, args.experts)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out, floor_file = args.work / "out", args.work / "floor.bin"
    plans = {d: make_plan(LocalSource(src), args.devices, expert_dtype=d)[0] for d in EXPERT_DTYPES}
    if args.workers is None:  # what mimo-shard chooses for this checkpoint (BF16 experts)
        args.workers = default_workers(worker_memory(plans["bfloat16"]))
    raw_floor(src, 0, floor_file)  # warm the page cache: every side reads warm
    runs = [(d, args.workers) for d in EXPERT_DTYPES] + [("bfloat16", 1), ("bfloat16", 2)]
    runs.append(("bfloat16", ONE_CORE))
    conv: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    floors: dict[tuple[str, bool], list[float]] = {}
    rss: dict[tuple[str, int], int] = {}
    cpu_s: dict[tuple[str, int], float] = {}  # least CPU time (user + system) of a run
    out_bytes: dict[str, int] = {}
    for rep in range(args.repeats):  # alternate, so drift and noise hit every side alike
        for dtype, workers in runs:
            one_core = workers == ONE_CORE
            n = args.workers if one_core else workers
            dt, peak, nbytes, cpu = run_convert(src, out, args.devices, n, dtype, one_core)
            conv[(dtype, workers)].append(dt)
            cpu_s[(dtype, workers)] = min(cpu_s.get((dtype, workers), cpu), cpu)
            rss[(dtype, workers)] = max(rss.get((dtype, workers), 0), peak)
            out_bytes[dtype] = nbytes
            where = f"{n} workers" + (", one core" if one_core else "")
            print(f"  repeat {rep + 1}: {dtype} experts, {where}: {dt:.1f} s", flush=True)
            if workers == args.workers:
                for direct in (False, True):
                    t = raw_floor(src, nbytes, floor_file, direct)
                    floors.setdefault((dtype, direct), []).append(t)
    estimate = {  # the converter's own memory model, for comparison with the peak RSS
        d: peak_memory(plans[d], args.workers) for d in EXPERT_DTYPES
    }
    if args.clean:
        shutil.rmtree(src)
    fresh.append(fresh_memory())
    rates = core_rates()
    scaling = machine_scaling()
    startup = start_up()

    print()
    print(
        f"full-width checkpoint, {args.layers} layers, {args.experts} experts: "
        f"{src_bytes / 1e9:.2f} GB; {args.devices} devices, {args.workers} workers, "
        f"best of {args.repeats}"
    )
    print(
        "floor: read the source + write the output's bytes, plain buffered writes + fsync; "
        "direct: the same with O_DIRECT writes"
    )
    print(
        f"{'experts':>14} {'output GB':>10} {'convert s':>10} {'floor s':>8} {'ratio':>6} "
        f"{'direct s':>9} {'ratio':>6} {'/faster':>8} {'peak RSS GB':>12} {'estimate GB':>12} "
        f"{'CPU s':>6} {'CPU s/cores':>11}"
    )
    cores = os.cpu_count() or 1
    fastest = {d: min(min(floors[(d, False)]), min(floors[(d, True)])) for d in EXPERT_DTYPES}
    for dtype in EXPERT_DTYPES:
        c = min(conv[(dtype, args.workers)])
        f, d = min(floors[(dtype, False)]), min(floors[(dtype, True)])
        est = estimate[dtype] / 1e9
        print(
            f"{dtype:>14} {out_bytes[dtype] / 1e9:>10.2f} {c:>10.1f} {f:>8.1f} {c / f:>6.2f} "
            f"{d:>9.1f} {c / d:>6.2f} {c / min(f, d):>8.2f} "
            f"{rss[(dtype, args.workers)] / 1e9:>12.2f} {est:>12.2f} "
            f"{cpu_s[(dtype, args.workers)]:>6.1f} {cpu_s[(dtype, args.workers)] / cores:>11.1f}"
        )
    print(
        f"CPU s: the least user + system time of a conversion; over the {cores} cores it is the "
        "least wall time the work allows"
    )
    w1, w2 = min(conv[("bfloat16", 1)]), min(conv[("bfloat16", 2)])
    print(
        f"BF16 conversion: 1 worker {w1:.1f} s, 2 workers {w2:.1f} s: speed-up {w1 / w2:.2f}x "
        f"(peak RSS {rss[('bfloat16', 1)] / 1e9:.2f} / {rss[('bfloat16', 2)] / 1e9:.2f} GB)"
    )
    c1, call = min(conv[("bfloat16", ONE_CORE)]), min(conv[("bfloat16", args.workers)])
    print(
        f"BF16 conversion, {args.workers} workers: one core {c1:.1f} s, {cores} cores {call:.1f} s:"
        f" speed-up {c1 / call:.2f}x, of at most {c1 / fastest['bfloat16']:.2f}x that the disk"
        " allows (one core's time / the faster floor; with one worker, a core also idles while"
        " it waits for its own direct writes: here every side overlaps them)"
    )
    print(
        "first touch of 1 GiB of new memory in a new process: "
        + " / ".join(f"{t:.2f} s" for t in fresh)
        + " (before / after the runs; a conversion pays it for its buffers, a floor for one "
        "64 MiB buffer)"
    )
    print()
    print("per-array metadata, ms/array: " + ", ".join(f"{k} {v:.2f}" for k, v in meta.items()))
    print(
        "one core: "
        + ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items() if k != "kernel 2 threads")
        + " (GB/s of output; CRC32, the converter's (isal) and zlib's: of hashed bytes)"
    )
    print(f"FP8 -> BF16 kernel, 2 threads on 2 tensors: {rates['kernel 2 threads']:.2f}x one")
    print(
        "this machine, 2 threads against 1: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in scaling.items())
        + " (what streams through memory gains about the copy's speed-up from a second worker;"
        " what stays in a core's cache, the arithmetic's)"
    )
    print(
        f"start-up of a conversion (interpreter and imports, in every convert time above): "
        f"{startup:.2f} s; without it, time / faster floor: "
        + ", ".join(
            f"{d} {(min(conv[(d, args.workers)]) - startup) / fastest[d]:.2f}"
            for d in EXPERT_DTYPES
        )
    )
    print()
    print(
        "real model projection: max((read + write bytes) / D, CPU seconds / C), CPU seconds: "
        "output bytes / per-core rate + output bytes / CRC32 rate;"
    )
    print(
        f"  per-core rate: {rates['kernel']:.2f} GB/s for BF16 outputs (the kernel), "
        f"{rates['code copy']:.2f} GB/s for FP8 expert codes and scales (the copy)"
    )
    real = real_model()
    print(
        f"{'experts':>22} {'in GB':>7} {'out GB':>7} "
        + " ".join(f"{f'C={c} D={d}':>13}" for c, d in HOSTS)
    )
    whole = {  # output bytes per CPU second of a whole conversion here, start-up and I/O included
        d: out_bytes[d] / cpu_s[(d, args.workers)] for d in EXPERT_DTYPES
    }
    for dtype, r in real.items():
        cpu = (
            (r["out"] - r["fp8"]) / (rates["kernel"] * 1e9)
            + r["fp8"] / (rates["code copy"] * 1e9)
            + r["out"] / (rates["crc32"] * 1e9)  # every output byte is checksummed
        )
        for label, seconds in (("", cpu), (" (whole)", r["out"] / whole[dtype])):
            cells = []
            for cores, disk in HOSTS:
                io = (r["in"] + r["out"]) / (disk * 1e9)
                t = max(io, seconds / cores)
                cells.append(f"{t / 60:>7.1f} m {'disk' if io >= seconds / cores else 'cpu':>4}")
            name = dtype + label
            print(f"{name:>22} {r['in'] / 1e9:>7.0f} {r['out'] / 1e9:>7.0f} " + " ".join(cells))
    print(
        "(whole): CPU seconds from this run's conversions instead, "
        + ", ".join(f"{d} {whole[d] / 1e9:.2f} GB of output per CPU second" for d in EXPERT_DTYPES)
        + f" (reads, checksums, writes, start-up and {args.workers} workers' contention included)"
    )
    print(
        f"CRC32 of the output costs {1 / rates['crc32'] / (1 / rates['kernel']) * 100:.0f}% of "
        "the kernel's time per byte"
    )


if __name__ == "__main__":
    main()
