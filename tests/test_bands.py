"""Bounded-memory paths write the same bytes as the in-memory ones.

A transposed output larger than ``IN_MEMORY_LIMIT`` (``lm_head`` vocabulary slices at real
shapes and few devices) is built in bands of whole output rows, each read from every source row
in chunks of ``CHUNK_BYTES``; copies go in steps of ``COPY_BYTES``. With the limits shrunk, the
tiny checkpoint's ``lm_head`` and router take that path and its embedding is copied in several
steps; a ``transpose_split`` (``o``, dense ``down``) larger than ``SPLIT_BYTES`` is built a
device slice or a few at a time. With the limits shrunk, the tiny checkpoint's ``lm_head``,
router, ``o`` and dense ``down`` take those paths and its embedding is copied in several steps;
every array must still match an ordinary conversion byte for byte.
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
    monkeypatch.setattr(transforms, "SPLIT_BYTES", 1)  # one device slice per pass
    monkeypatch.setattr(reading.UnitContext, "transposed_rows", spy)
    convert(LocalSource(tiny_ckpt), tmp_path / "bands", 2, dtype=dtype, progress=False)
    banded = {name for name, cols in calls if cols is not None}
    assert "lm_head.weight" in banded and any(".mlp.gate.weight" in n for n in banded)
    o_passes = [cols for name, cols in calls if name == "model.layers.0.self_attn.o_proj.weight"]
    assert len(o_passes) == 2 and o_passes[0][1] == o_passes[1][0]  # one per device, in order
    assert any(n.endswith("mlp.down_proj.weight") for n in banded)  # the dense layer's down
    assert checksums(tmp_path / "bands") == checksums(tmp_path / "whole")


def test_split_passes_hold_whole_slices_from_block_starts(monkeypatch):
    monkeypatch.setattr(transforms, "SPLIT_BYTES", 256)
    cols = [(0, 128), (128, 256), (256, 384), (384, 512)]
    passes = transforms.split_passes
    assert passes(cols, 1, 128) == [((0, 256), [0, 1]), ((256, 512), [2, 3])]  # 256 bytes each
    assert [s for _, s in passes(cols, 4, 128)] == [[0], [1], [2], [3]]  # a slice over the limit
    ragged = [(0, 96), (96, 192), (192, 288), (288, 384)]  # only 0 starts a block of 128
    assert passes(ragged, 1, 128) == [((0, 192), [0, 1]), ((128, 384), [2, 3])]
    held = [(96, 192), (288, 384)]  # a host's devices only
    assert passes(held, 1, 128) == [((0, 192), [0]), ((256, 384), [1])]


def test_bands_are_the_fewest_and_as_even_as_whole_blocks_allow():
    row = 38144 * 2  # an lm_head vocabulary slice at 4 devices: 4096 output rows of 76 KB
    rows = transforms.band_rows(4096, row)
    assert -(-4096 // rows) == 3 and rows * row <= transforms.IN_MEMORY_LIMIT  # 3 bands, as ever
    assert rows == 1408 and rows % transforms.BAND_ALIGN == 0  # not 1664 + 1664 + 768
    assert transforms.band_rows(100, 1 << 30) == transforms.BAND_ALIGN  # one block at least
    assert transforms.band_rows(1000, 1 << 20) == 128  # 8 bands of 128 MiB: already even
