"""Bounded-memory paths write the same bytes as the in-memory ones.

A transposed output larger than ``IN_MEMORY_LIMIT`` (``lm_head`` vocabulary slices at real
shapes and few devices) is built in bands of whole output rows, each read from every source row
in chunks of ``CHUNK_BYTES``; copies go in steps of ``COPY_BYTES``. With the limits shrunk, the
tiny checkpoint's ``lm_head`` and router take that path and its embedding is copied in several
steps; every array must still match an ordinary conversion byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import reading, transforms
from pipeline.convert import convert
from pipeline.source import LocalSource


def checksums(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for entry in manifest["stores"].values():
        for r in json.loads((out / entry["table"]).read_text())["arrays"]:
            found[f"{r['store']}/{r['path']}"] = r["checksum"]
    return found


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_banded_transposes_write_the_same_bytes(tiny_ckpt, tmp_path, monkeypatch, dtype):
    convert(LocalSource(tiny_ckpt), tmp_path / "whole", 2, dtype=dtype, progress=False)
    calls = []
    original = reading.UnitContext.transposed_rows

    def spy(self, name, r0, r1, dt, dst, cols=None):
        calls.append((name, cols))
        return original(self, name, r0, r1, dt, dst, cols)

    monkeypatch.setattr(transforms, "IN_MEMORY_LIMIT", 4096)
    monkeypatch.setattr(reading, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(transforms, "COPY_BYTES", 1 << 16)  # the embedding copied in steps too
    monkeypatch.setattr(reading.UnitContext, "transposed_rows", spy)
    convert(LocalSource(tiny_ckpt), tmp_path / "bands", 2, dtype=dtype, progress=False)
    banded = {name for name, cols in calls if cols is not None}
    assert "lm_head.weight" in banded and any(".mlp.gate.weight" in n for n in banded)
    assert checksums(tmp_path / "bands") == checksums(tmp_path / "whole")
