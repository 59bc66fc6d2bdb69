"""Resharding an output: byte-identical to a direct conversion with the same options."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

import loader.cli
from pipeline import reshard as reshard_module
from pipeline.cli import main as shard_main
from pipeline.convert import convert
from pipeline.reshard import reshard
from pipeline.source import LocalSource
from tests.test_placement import replicating_map

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "manifests" / "manifest.schema.json").read_text())
EXPERT_DTYPES = ["bfloat16", "float8_e4m3fn"]


@pytest.fixture(scope="module")
def direct(tiny_ckpt, tmp_path_factory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("direct")
    out = {}
    for dtype in EXPERT_DTYPES:
        for n in (2, 8):
            out[dtype, n] = root / f"{dtype}-{n}"
            convert(LocalSource(tiny_ckpt), out[dtype, n], n, expert_dtype=dtype, progress=False)
    return out


def shard(*args) -> tuple[int, str]:
    res = CliRunner().invoke(shard_main, [str(a) for a in args] + ["--quiet"])
    return res.exit_code, res.output


def checksums(out: Path) -> dict[tuple[str, str], tuple]:
    res = CliRunner().invoke(loader.cli.main, ["list", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return {(a["store"], a["path"]): (a["shape"], a["dtype"], a["checksum"]) for a in
            json.loads(res.output)}


def assert_identical(a: Path, b: Path) -> None:
    res = CliRunner().invoke(loader.cli.main, ["diff", str(a), str(b), "--verify", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "identical content (chunk bytes compared)" in res.output
    assert checksums(a) == checksums(b)


@pytest.mark.parametrize("expert_dtype", EXPERT_DTYPES)
@pytest.mark.parametrize(("old", "new"), [(2, 8), (8, 2)])
def test_reshard_equals_direct_conversion(direct, tmp_path, expert_dtype, old, new):
    out = tmp_path / "new"
    code, text = shard(direct[expert_dtype, old], out, "--devices", new)
    assert code == 0, text
    assert_identical(out, direct[expert_dtype, new])
    m = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(m, SCHEMA)
    origin = json.loads((direct[expert_dtype, old] / "manifest.json").read_text())["source"]
    assert m["source"]["kind"] == "output"
    assert m["source"]["path"] == str(direct[expert_dtype, old].resolve())
    assert m["source"]["origin"] == origin
    # the shared store is linked, not rewritten: same bytes, same inode on one filesystem
    a = direct[expert_dtype, old] / "shared.zarr" / "embed" / "c" / "0" / "0"
    b = out / "shared.zarr" / "embed" / "c" / "0" / "0"
    assert a.stat().st_ino == b.stat().st_ino
    code, text = shard(direct[expert_dtype, old], out, "--devices", new)
    assert code == 0 and "already complete" in text


def test_reshard_with_an_expert_map_equals_direct_conversion(tiny_ckpt, direct, tmp_path):
    emap = tmp_path / "map.json"
    emap.write_text(json.dumps(replicating_map(4)))
    want = tmp_path / "direct"
    convert(LocalSource(tiny_ckpt), want, 4, progress=False, expert_map=emap)
    out = tmp_path / "new"
    code, text = shard(direct["bfloat16", 8], out, "--devices", 4, "--expert-map", emap)
    assert code == 0, text
    assert_identical(out, want)
    back = tmp_path / "back"  # and from the replicated map back to the contiguous one
    code, text = shard(out, back, "--devices", 2)
    assert code == 0, text
    assert_identical(back, direct["bfloat16", 2])


def test_interrupted_reshard_resumes_to_the_same_bytes(direct, tmp_path, monkeypatch):
    out = tmp_path / "new"
    real = reshard_module._Gather.array
    calls = {"n": 0}

    def failing(self, ctx, spec):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(5, "simulated failure", str(spec.path))
        return real(self, ctx, spec)

    monkeypatch.setattr(reshard_module._Gather, "array", failing)
    with pytest.raises(OSError):
        reshard(direct["bfloat16", 2], out, 8, workers=1, progress=False)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(reshard_module._Gather, "array", real)
    summary = reshard(direct["bfloat16", 2], out, 8, workers=1, progress=False)
    assert summary.resumed > 0
    assert_identical(out, direct["bfloat16", 8])


def test_reshard_keeps_old_options(direct, tmp_path):
    code, text = shard(direct["bfloat16", 2], tmp_path / "x", "--devices", 8, "--dtype", "float32")
    assert code == 2
    assert "--dtype float32" in text and "keeps its dtype (bfloat16)" in text
    code, text = shard(direct["bfloat16", 2], tmp_path / "y", "--devices", 3)
    assert code == 2 and "--devices 3" in text


def test_splitting_reads_old_arrays_a_band_at_a_time(direct, tmp_path, monkeypatch):
    """2 -> 8 devices: each NEW column band (lm_head, qkv, dense gate_up) is a quarter of an OLD
    array's width; OLD's rows are still read no more than ``BAND_BYTES`` at a time (experts are
    moved whole, one at a time), and the result is the direct conversion's."""
    band = 16 << 10
    monkeypatch.setattr(reshard_module, "BAND_BYTES", band)
    reads: dict[str, int] = {}
    real = reshard_module._Gather.rows

    def counted(self, store, path, r0, r1):
        block = real(self, store, path, r0, r1)
        if "/experts/" not in path:
            name = path.split("/", 2)[2] if path.startswith("layers/") else path
            reads[name] = max(reads.get(name, 0), block.nbytes)
        return block

    monkeypatch.setattr(reshard_module._Gather, "rows", counted)
    out = tmp_path / "new"
    code, text = shard(direct["bfloat16", 2], out, "--devices", 8, "--workers", 1)
    assert code == 0, text
    assert_identical(out, direct["bfloat16", 8])
    assert {"lm_head", "attn/qkv", "mlp/gate_up"} <= reads.keys()
    assert max(reads.values()) <= band, reads
