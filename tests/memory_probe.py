"""Run a conversion recording, per unit, the buffers it asked for and its traced peak (JSON).

    python -m tests.memory_probe CKPT OUT DTYPE EXPERT_DTYPE SHRUNK(0|1)

Run in a fresh process by ``tests/test_memory.py``: what earlier tests imported, compiled or left
for the collector is not charged to a unit. Each unit starts with an empty buffer pool; NumPy
reports its allocations to ``tracemalloc``, so the peak covers buffers and short-lived arrays.
A first, untraced conversion takes the lazy imports and first-call set-up out of the figures.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections import OrderedDict
from pathlib import Path

from pipeline import buffers, reading, transforms
from pipeline.convert import convert
from pipeline.source import LocalSource

# limits shrunk so the tiny checkpoint's units read in steps, copy in steps and build bands
SHRUNK = {
    (reading, "CHUNK_BYTES"): 1 << 14,
    (transforms, "COPY_BYTES"): 1 << 14,
    (transforms, "IN_MEMORY_LIMIT"): 1 << 16,
    (transforms, "SPLIT_BYTES"): 1,  # a pass per device slice
}


def main() -> None:
    ckpt, out, dtype, expert_dtype, shrunk = sys.argv[1:6]
    if shrunk == "1":
        for (module, name), value in SHRUNK.items():
            setattr(module, name, value)
    options = {"dtype": dtype, "expert_dtype": expert_dtype, "workers": 1, "progress": False}
    convert(LocalSource(ckpt), Path(out) / "warm", 4, **options)
    units: dict[str, dict] = {}

    def recording(transform):
        def run(ctx, unit):
            buffers._local.pool = OrderedDict()
            tracemalloc.start()
            try:
                transform(ctx, unit)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            asked = {role: b.nbytes for role, b in buffers._local.pool.items()}
            units[unit.id] = {"asked": asked, "peak": peak}

        return run

    for name, transform in list(transforms.TRANSFORMS.items()):
        transforms.TRANSFORMS[name] = recording(transform)
    convert(LocalSource(ckpt), Path(out) / "traced", 4, **options)
    print(json.dumps(units))


if __name__ == "__main__":
    main()
