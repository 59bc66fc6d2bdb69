"""open_device: zero-copy device slices, refusals, verification; the stores stay valid zarr v3."""

from __future__ import annotations

import json
import mmap
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from loader import LoaderError, open_device
from mimo.config import MiMoConfig
from pipeline.convert import convert
from pipeline.source import LocalSource
from tests.test_convert import bits, expected_arrays, load_output


def mapped(arr: np.ndarray) -> bool:
    """True when ``arr`` is a view of a memory-mapped file (no copy of its bytes)."""
    base = arr
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return isinstance(base, mmap.mmap)


@pytest.fixture(scope="module")
def out4(tiny_ckpt, tmp_path_factory) -> Path:
    """tiny converted for 4 devices (read-only: copy it before damaging it)."""
    out = tmp_path_factory.mktemp("out4") / "out"
    convert(LocalSource(tiny_ckpt), out, 4, progress=False)
    return out


@pytest.fixture()
def damaged(out4, tmp_path) -> Path:
    return Path(shutil.copytree(out4, tmp_path / "out"))


def test_maps_every_array_of_the_device_without_copying(out4, tiny_ckpt):
    dev = open_device(out4, 2)
    manifest = load_output(out4)
    mine = {a["path"] for a in manifest["arrays"] if a["store"] in ("shared", "device-002")}
    assert set(dev) == mine
    want = expected_arrays(tiny_ckpt, 4)
    for path, arr in dev.items():
        assert mapped(arr) and not arr.flags.writeable  # a read-only view of the chunk file
        store = "shared" if ("shared", path) in want else "device-002"
        rec = next(a for a in manifest["arrays"] if a["store"] == store and a["path"] == path)
        assert arr.dtype.name == rec["dtype"]
        assert np.array_equal(
            arr.view(np.uint16 if rec["dtype"] == "bfloat16" else np.uint32),
            bits(want[store, path], rec["dtype"]),
        )
    assert dev.config == MiMoConfig.from_file(tiny_ckpt / "config.json")
    assert dev.expert_map[3] == [8, 9, 10, 11] and dev.devices == 4
    assert dev.heads(5) == ((4, 6), (1, 2)) and dev.vocab_range == (512, 768)
    assert dev.layers == tuple(range(7))


def test_open_does_not_import_zarr(out4):
    code = (
        f"import sys; from loader import open_device; d = open_device({str(out4)!r}, 0); "
        "print(len(d), 'zarr' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, imported = res.stdout.split()
    assert int(n) > 20 and imported == "False"


def test_stores_open_with_stock_zarr(out4):
    manifest = load_output(out4)
    dev = {r: open_device(out4, r) for r in range(4)}
    groups = {}
    for a in manifest["arrays"]:
        g = groups.setdefault(a["store"], zarr.open_group(out4 / f"{a['store']}.zarr", mode="r"))
        z = g[a["path"]]
        raw = z[...]
        assert list(z.shape) == a["shape"]
        rank = 0 if a["store"] == "shared" else int(a["store"].split("-")[1])
        assert raw.tobytes() == np.ascontiguousarray(dev[rank][a["path"]]).tobytes()


def test_refuses_an_incomplete_output(damaged):
    (damaged / "manifest.json").unlink()
    with pytest.raises(LoaderError, match="incomplete"):
        open_device(damaged, 0)


def test_refuses_an_unknown_format_version(damaged):
    p = damaged / "manifest.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | {"format_version": 99}))
    with pytest.raises(LoaderError, match="format version 99"):
        open_device(damaged, 0)


@pytest.mark.parametrize("rank", [-1, 4, 17])
def test_refuses_a_rank_outside_the_device_count(out4, rank):
    with pytest.raises(LoaderError, match=f"rank {rank} is outside 0..3"):
        open_device(out4, rank)


def test_refuses_a_missing_chunk_file(damaged):
    (
        damaged / "device-001.zarr" / "layers" / "3" / "experts" / "down" / "c" / "0" / "0" / "0"
    ).unlink()
    with pytest.raises(LoaderError, match="device-001/layers/3/experts/down: missing"):
        open_device(damaged, 1)
    open_device(damaged, 0)  # other devices are unaffected


def test_refuses_a_wrongly_sized_chunk_file(damaged):
    chunk = damaged / "shared.zarr" / "embed" / "c" / "0" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size - 2)
    with pytest.raises(LoaderError, match="shared/embed: size"):
        open_device(damaged, 3)


def test_refuses_metadata_contradicting_the_manifest(damaged):
    root = damaged / "device-000.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    meta["consolidated_metadata"]["metadata"]["lm_head"]["shape"] = [320, 128]
    root.write_text(json.dumps(meta))
    with pytest.raises(LoaderError, match="device-000/lm_head: metadata: zarr shape"):
        open_device(damaged, 0)


def test_verify_catches_a_flipped_bit(damaged):
    chunk = damaged / "device-002.zarr" / "layers" / "5" / "attn" / "qkv" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    open_device(damaged, 2)  # sizes and metadata are fine: opening does not read the bytes
    with pytest.raises(LoaderError, match="device-002/layers/5/attn/qkv: checksum"):
        open_device(damaged, 2, verify=True)


def test_refuses_a_tampered_or_missing_array_table(damaged):
    table = damaged / "manifest.d" / "device-001.json"
    data = table.read_text()
    table.write_text(data.replace('"crc32:', '"crc32:0', 1))
    with pytest.raises(LoaderError, match="does not match the sha256"):
        open_device(damaged, 1)
    open_device(damaged, 2)  # other devices do not read that table
    table.unlink()
    with pytest.raises(LoaderError, match="missing"):
        open_device(damaged, 1)
