"""Opening one device of an output: open_device against safetensors and zarr, in one run.

The output has the real per-device array count: a ``small`` synthetic checkpoint with 48 layers
(16 experts) converted for 16 devices gives 232 arrays per device and 194 shared arrays, like
MiMo-V2-Flash at any device count. Each method runs in a fresh process (best of ``--repeats``):

- ``open_device``: memory-maps the shared and device-0 arrays after checking them;
- ``safetensors``: ``safe_open`` of one file holding the same arrays, then ``get_tensor`` each;
- ``zarr``: ``zarr.open_group`` of the two stores, then read each array.

It prints time to usable arrays and RSS growth, with ratios to ``open_device``.

    python bench/open.py [--repeats 3] [--work bench-out]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEVICES = 16

CHILD = r"""
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
method, out, st = sys.argv[1], sys.argv[2], sys.argv[3]
import numpy as np, ml_dtypes  # imports are not part of the measurement
if method == "open_device":
    from loader import open_device
elif method == "safetensors":
    from safetensors import safe_open
else:
    import zarr
r0, t0 = rss(), time.perf_counter()
if method == "open_device":
    dev = open_device(out, 0)
    n, nbytes = len(dev), dev.nbytes
elif method == "safetensors":
    with safe_open(st, "np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    n, nbytes = len(arrays), sum(a.nbytes for a in arrays.values())
else:
    arrays = {}
    for store in ("shared", "device-000"):
        g = zarr.open_group(f"{out}/{store}.zarr", mode="r")
        for path, a in g.arrays():
            pass
        def walk(group, prefix=""):
            for name, node in group.members():
                if isinstance(node, zarr.Array):
                    arrays[store + "/" + prefix + name] = node[...]
                else:
                    walk(node, prefix + name + "/")
        walk(g)
    n, nbytes = len(arrays), sum(a.nbytes for a in arrays.values())
dt, dr = time.perf_counter() - t0, rss() - r0
print(json.dumps({"seconds": dt, "rss": dr, "arrays": n, "bytes": nbytes}))
"""


def prepare(work: Path) -> tuple[Path, Path]:
    from pipeline.convert import convert
    from pipeline.source import LocalSource
    from pipeline.synth import preset_config, write_checkpoint

    ckpt = work / "small-L48"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_checkpoint(ckpt, preset_config("small", layers=48, experts=16), seed=0)
    out = work / f"small-L48-out{DEVICES}"
    if not (out / "manifest.json").exists():
        convert(LocalSource(ckpt), out, DEVICES, progress=False)
    st = work / "small-L48-device0.safetensors"
    if not st.exists():
        import numpy as np
        from safetensors.numpy import save_file

        from loader import open_device

        dev = open_device(out, 0)  # the same arrays, raw bits (NumPy has no bf16 in safetensors)
        raw = {
            k: np.ascontiguousarray(v).view(np.uint16 if v.dtype.itemsize == 2 else v.dtype)
            for k, v in dev.items()
        }
        save_file(raw, str(st))
    return out, st


def measure(method: str, out: Path, st: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        res = subprocess.run(
            [sys.executable, "-c", CHILD, method, str(out), str(st)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    best["rss"] = min(r["rss"] for r in runs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out, st = prepare(args.work)
    manifest = (out / "manifest.json").stat().st_size
    results = {m: measure(m, out, st, args.repeats) for m in ("open_device", "safetensors", "zarr")}
    base = results["open_device"]
    print(
        f"device 0 of {DEVICES}: {base['arrays']} arrays, {base['bytes'] / 1e9:.2f} GB "
        f"(manifest.json {manifest / 1e3:.0f} kB); best of {args.repeats} fresh processes"
    )
    print(f"{'method':14} {'arrays':>7} {'time ms':>9} {'RSS growth MB':>14} {'time ratio':>11}")
    for m, r in results.items():
        print(
            f"{m:14} {r['arrays']:>7} {r['seconds'] * 1e3:>9.1f} {r['rss'] / 1e6:>14.1f} "
            f"{r['seconds'] / base['seconds']:>11.1f}"
        )


if __name__ == "__main__":
    main()
