"""Resharding time and peak RSS against a direct conversion, measured in one run.

On the ``small`` synthetic preset (about 400 MB; written once under ``--work``): convert to
``--old`` devices, then for ``--new`` devices time a direct conversion of the checkpoint and a
reshard of the first output, each in a child process (wall time, peak RSS from ``wait4``),
best of ``--repeats``; last, check the two outputs are byte-identical (``mimo-manifest diff
--verify``).

    python bench/reshard.py [--old 8] [--new 2] [--expert-dtype bfloat16] [--repeats 2]
                            [--work bench-out] [--clean]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``python -m ARGS`` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=int, default=8)
    ap.add_argument("--new", type=int, default=2)
    ap.add_argument("--expert-dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--clean", action="store_true", help="Remove the outputs afterwards.")
    a = ap.parse_args()
    ckpt, old = a.work / "small", a.work / f"reshard-old-{a.old}"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.synth", str(ckpt), "--preset", "small"],
                       cwd=ROOT, check=True)
    opts = ["--expert-dtype", a.expert_dtype, "--quiet"]
    run("pipeline.cli", str(ckpt), str(old), "--devices", str(a.old), *opts)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(a.repeats):
        for name, src in (("direct", ckpt), ("reshard", old)):
            out = a.work / f"reshard-{name}-{a.new}"
            shutil.rmtree(out, ignore_errors=True)
            got = run("pipeline.cli", str(src), str(out), "--devices", str(a.new), *opts)
            best[name] = min(best.get(name, got), got)
    same = subprocess.run(
        [sys.executable, "-m", "loader.cli", "diff", "--verify", "--quiet",
         str(a.work / f"reshard-direct-{a.new}"), str(a.work / f"reshard-reshard-{a.new}")],
        cwd=ROOT, capture_output=True, text=True,
    )
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e6
    print(f"small preset ({size:.0f} MB), {a.old} -> {a.new} devices, experts {a.expert_dtype}")
    for name, (sec, rss) in best.items():
        print(f"  {name:<8} {sec:6.2f} s   peak RSS {rss:7.1f} MB")
    print(f"  reshard / direct: {best['reshard'][0] / best['direct'][0]:.2f}x time")
    print(f"  outputs: {same.stdout.strip().splitlines()[-1] if same.stdout else same.stderr}")
    if a.clean:
        for p in a.work.glob("reshard-*"):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
