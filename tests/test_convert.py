"""mimo-shard end to end: every output array equals the expected slice of the dequantised source.

The expectation is computed here from the hub tensors through the oracle's own dequantisation
(torch, block rule and fused K/V rule written out longhand), and the outputs are read back with
stock zarr (raw bits viewed with the logical dtype): nothing of the converter's code is reused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jsonschema
import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from mimo.config import MOE, MiMoConfig
from pipeline.convert import convert
from pipeline.source import LocalSource
from tests.conftest import ROOT
from tests.oracle import dequantised_state

SCHEMA = json.loads((ROOT / "manifests" / "manifest.schema.json").read_text())
TABLE_SCHEMA = {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/arrayTable"}


def load_output(out: Path) -> dict:
    """The manifest with every store's array records (schema-checked) under ``"arrays"``."""
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    arrays = []
    for entry in manifest["stores"].values():
        table = json.loads((out / entry["table"]).read_text())
        jsonschema.validate(table, TABLE_SCHEMA)
        arrays += table["arrays"]
    return manifest | {"arrays": arrays}


def read_store_array(out: Path, store: str, path: str) -> np.ndarray:
    """An output array through stock zarr, viewed with its logical dtype."""
    z = zarr.open_array(out / f"{store}.zarr" / path, mode="r")
    a = z[...]
    logical = z.attrs.get("logical_dtype")
    return a.view(np.dtype(getattr(ml_dtypes, logical))) if logical else a


def bits(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The bit pattern a float32 tensor of bf16-exact values has when stored as ``dtype``."""
    a = t.contiguous().numpy().astype(np.float32)
    return (
        a.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else a.view(np.uint32)
    )


def expected_arrays(
    ckpt: Path,
    devices: int,
    experts: list[int] | None = None,
    layers: list[int] | None = None,
    rounding=torch.bfloat16,
) -> dict[tuple[str, str], torch.Tensor]:
    """(store, path) -> the array the converter must write, from the dequantised hub tensors."""
    cfg = MiMoConfig.from_file(ckpt / "config.json")
    st = dequantised_state(ckpt, rounding)
    n = devices
    dev = [f"device-{r:03d}" for r in range(n)]
    out: dict[tuple[str, str], torch.Tensor] = {
        ("shared", "embed"): st["model.embed_tokens.weight"],
        ("shared", "norm"): st["model.norm.weight"],
    }
    present = experts if experts is not None else list(range(cfg.n_routed_experts))
    per = len(present) // n
    for layer in layers if layers is not None else range(cfg.num_hidden_layers):
        spec = cfg.layer(layer)
        p, lp = f"model.layers.{layer}", f"layers/{layer}"
        out["shared", f"{lp}/input_norm"] = st[f"{p}.input_layernorm.weight"]
        out["shared", f"{lp}/post_attn_norm"] = st[f"{p}.post_attention_layernorm.weight"]
        q, k, v = (st[f"{p}.self_attn.{w}_proj.weight"] for w in "qkv")
        o = st[f"{p}.self_attn.o_proj.weight"]
        d, dv, hq = spec.head_dim, spec.v_head_dim, spec.q_heads // n
        group = spec.q_heads // spec.kv_heads
        for r in range(n):
            h0, h1 = r * hq, (r + 1) * hq
            g0, g1 = h0 // group, (h1 - 1) // group + 1
            qkv = torch.cat([q[h0 * d : h1 * d], k[g0 * d : g1 * d], v[g0 * dv : g1 * dv]])
            out[dev[r], f"{lp}/attn/qkv"] = qkv.T
            out[dev[r], f"{lp}/attn/o"] = o[:, h0 * dv : h1 * dv].T
            if spec.sinks:
                out[dev[r], f"{lp}/attn/sinks"] = st[f"{p}.self_attn.attention_sink_bias"][h0:h1]
        if spec.mlp == MOE:
            out["shared", f"{lp}/router"] = st[f"{p}.mlp.gate.weight"].T
            out["shared", f"{lp}/router_bias"] = st[f"{p}.mlp.gate.e_score_correction_bias"]
            ex = f"{p}.mlp.experts"
            for r in range(n):
                mine = present[r * per : (r + 1) * per]
                out[dev[r], f"{lp}/experts/gate_up"] = torch.stack(
                    [
                        torch.cat(
                            [st[f"{ex}.{e}.gate_proj.weight"], st[f"{ex}.{e}.up_proj.weight"]]
                        ).T
                        for e in mine
                    ]
                )
                out[dev[r], f"{lp}/experts/down"] = torch.stack(
                    [st[f"{ex}.{e}.down_proj.weight"].T for e in mine]
                )
        else:
            i = cfg.intermediate_size // n
            for r in range(n):
                gate = st[f"{p}.mlp.gate_proj.weight"][r * i : (r + 1) * i]
                up = st[f"{p}.mlp.up_proj.weight"][r * i : (r + 1) * i]
                out[dev[r], f"{lp}/mlp/gate_up"] = torch.cat([gate, up]).T
                out[dev[r], f"{lp}/mlp/down"] = st[f"{p}.mlp.down_proj.weight"][
                    :, r * i : (r + 1) * i
                ].T
    vn = cfg.vocab_size // n
    for r in range(n):
        out[dev[r], "lm_head"] = st["lm_head.weight"][r * vn : (r + 1) * vn].T
    return out


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_every_array_is_the_expected_slice(tiny_ckpt, tmp_path, devices):
    out = tmp_path / "out"
    summary = convert(LocalSource(tiny_ckpt), out, devices, progress=False)
    manifest = load_output(out)
    want = expected_arrays(tiny_ckpt, devices)
    got = {(a["store"], a["path"]): a for a in manifest["arrays"]}
    assert set(got) == set(want)  # nothing missing, nothing extra
    assert summary.arrays == len(want)
    for (store, path), expect in want.items():
        rec = got[store, path]
        arr = read_store_array(out, store, path)
        assert list(arr.shape) == rec["shape"] == list(expect.shape), (store, path)
        stored = arr.view(np.uint16 if rec["dtype"] == "bfloat16" else np.uint32)
        assert np.array_equal(stored, bits(expect, rec["dtype"])), (store, path)
    assert manifest["options"]["devices"] == devices
    # nothing written twice: each store holds only its own arrays
    assert sum(s["bytes"] for s in manifest["stores"].values()) == manifest["totals"]["bytes"]


def test_subsets_are_recorded_and_exact(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, layers="0-3", experts="2-5,8,9", progress=False)
    manifest = load_output(out)
    assert manifest["options"]["layers"] == [0, 1, 2, 3]
    assert manifest["options"]["experts"] == [2, 3, 4, 5, 8, 9]
    assert manifest["layout"]["expert_map"]["1"] == [[2, 3, 4], [5, 8, 9]]
    want = expected_arrays(tiny_ckpt, 2, experts=[2, 3, 4, 5, 8, 9], layers=[0, 1, 2, 3])
    got = {(a["store"], a["path"]) for a in manifest["arrays"]}
    assert got == set(want)
    for key in [
        ("device-001", "layers/2/experts/gate_up"),
        ("device-000", "layers/3/experts/down"),
    ]:
        arr = read_store_array(out, *key).view(np.uint16)
        assert np.array_equal(arr, bits(want[key], "bfloat16"))


def test_float32_output(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, dtype="float32", layers="0-1", progress=False)
    want = expected_arrays(tiny_ckpt, 2, layers=[0, 1], rounding=None)
    for key in [
        ("device-000", "layers/0/attn/qkv"),
        ("device-001", "layers/1/experts/gate_up"),
        ("shared", "embed"),
    ]:
        arr = read_store_array(out, *key)
        assert arr.dtype == np.float32
        assert np.array_equal(arr, want[key].numpy())


def test_manifest_records_provenance(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, progress=False)
    m = load_output(out)
    assert m["format"] == "mimo-shard" and m["format_version"] == 1
    assert m["source"]["kind"] == "local" and len(m["source"]["index_sha256"]) == 64
    assert set(m["source"]["files"]) == {p.name for p in tiny_ckpt.glob("*.safetensors")}
    qkv = next(
        a for a in m["arrays"] if a["path"] == "layers/5/attn/qkv" and a["store"] == "device-001"
    )
    assert qkv["sources"] == [
        f"model.layers.5.self_attn.{w}"
        for w in (
            "q_proj.weight",
            "q_proj.weight_scale_inv",
            "k_proj.weight",
            "k_proj.weight_scale_inv",
            "v_proj.weight",
            "v_proj.weight_scale_inv",
        )
    ]
    assert qkv["transform"] == {
        "name": "qkv",
        "params": {"layer": 5, "q_heads": [4, 8], "kv_heads": [1, 2]},
    }
    assert qkv["checksum"].startswith("crc32:")
    assert (out / "config.json").read_bytes() == (tiny_ckpt / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    assert not (out / ".mimo-shard").exists()  # the journal goes once the manifest is written
    assert MiMoConfig.from_dict(m["model"]["config"]) == MiMoConfig.from_file(
        tiny_ckpt / "config.json"
    )


@pytest.mark.parametrize("where", ["buffered", "tmpfs"])
def test_direct_io_and_buffered_writes_give_the_same_bytes(tiny_ckpt, tmp_path, monkeypatch, where):
    """Aligned pieces go through O_DIRECT where the filesystem has it; the bytes never differ."""
    import pipeline.store as store

    monkeypatch.setattr(store, "DIRECT_MIN", store.ALIGN)  # the tiny arrays' pieces too
    direct = tmp_path / "direct"
    convert(LocalSource(tiny_ckpt), direct, 2, progress=False)
    if where == "buffered":
        monkeypatch.setenv("MIMO_SHARD_DIRECT_IO", "0")
        other = tmp_path / "buffered"
    else:
        shm = Path("/dev/shm")
        if not shm.is_dir():
            pytest.skip("no tmpfs at /dev/shm")
        other = Path(tempfile.mkdtemp(dir=shm)) / "out"  # tmpfs has no O_DIRECT: falls back
    try:
        convert(LocalSource(tiny_ckpt), other, 2, progress=False)
        a, b = load_output(direct)["arrays"], load_output(other)["arrays"]
        assert [(x["path"], x["checksum"]) for x in a] == [(x["path"], x["checksum"]) for x in b]
    finally:
        if where == "tmpfs":
            shutil.rmtree(other.parent)


def test_only_large_aligned_pieces_are_written_direct(tmp_path, monkeypatch):
    """A piece of at least DIRECT_MIN aligned bytes goes through O_DIRECT (the descriptor opened
    then, once); a smaller one through the page cache, so it never waits behind the disk's queue."""
    import fcntl
    import os

    import numpy as np

    import pipeline.store as store
    from pipeline.buffers import scratch
    from pipeline.plan import OutputArray

    probe = tmp_path / "probe"
    probe.touch()
    try:  # asked of the filesystem itself, not of the code under test
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT")
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    real_write, real_open, writes, opens = store._write_all, store._open_direct, [], []

    def write_all(fd, data, offset):
        if len(data):
            writes.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), len(data)))
        return real_write(fd, data, offset)

    def open_direct(path):
        opens.append(path)
        return real_open(path)

    rows = store.DIRECT_MIN // 4096  # rows of 4 KiB
    spec = OutputArray("device-000", "a", (rows + 2, 1024), "float32")
    store.create_store(tmp_path, "device-000", {})
    monkeypatch.setattr(store, "_write_all", write_all)
    monkeypatch.setattr(store, "_open_direct", open_direct)
    w = store.ArrayWriter(tmp_path, spec)
    block = scratch("out", spec.shape, np.dtype(np.float32))
    block[...] = 1
    w.rows(0, block[:1])  # 4 KiB: buffered
    assert w.direct is None and opens == []  # not opened before a large piece arrives
    w.rows(1, block[1 : rows + 1])  # DIRECT_MIN bytes: direct
    assert w.direct is not None
    w.rows(rows + 1, block[rows + 1 :])  # 4 KiB again: buffered, though the descriptor is open
    w.finish()
    assert writes == [(False, 4096), (True, store.DIRECT_MIN), (False, 4096)]
    assert len(opens) == 1


def test_a_filesystem_refusing_direct_writes_falls_back(tiny_ckpt, tmp_path, monkeypatch):
    """Some filesystems accept an O_DIRECT open, then fail its writes with EINVAL."""
    import errno
    import fcntl
    import os

    import pipeline.store as store

    real, refused = store._write_all, []

    def write_all(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(store, "_write_all", write_all)
    monkeypatch.setattr(store, "DIRECT_MIN", store.ALIGN)  # the tiny arrays' pieces too
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, progress=False)
    assert refused  # direct writes were attempted, refused, and redone buffered
    monkeypatch.setattr(store, "_write_all", real)
    reference = tmp_path / "ref"
    convert(LocalSource(tiny_ckpt), reference, 2, progress=False)
    got, want = load_output(out)["arrays"], load_output(reference)["arrays"]
    assert [a["checksum"] for a in got] == [a["checksum"] for a in want]


def test_fused_kv_evidence_is_measured_and_recorded(tiny_ckpt, tmp_path):
    """amax/448 scales: every fused [K_h; V_h] block holds a code of magnitude 448."""
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(tiny_ckpt), str(out), "--devices", "2", "--quiet"])
    assert res.exit_code == 0 and "warning" not in res.stderr
    qkv = [
        a
        for a in load_output(out)["arrays"]
        if a["path"] in ("layers/0/attn/qkv", "layers/5/attn/qkv")
    ]
    assert len(qkv) == 4
    for a in qkv:
        c = a["checks"]["fused_kv"]
        assert c["fused_blocks"] == c["fused_saturated"] > 0  # 1 KV head x 3 blocks x 3 columns
    sliding = next(a for a in load_output(out)["arrays"] if a["path"] == "layers/1/attn/qkv")
    assert "checks" not in sliding  # standard grids: nothing to prove

    # V codes halved in layer 0: its V-only blocks no longer reach 448 -> a loud warning
    src = Path(shutil.copytree(tiny_ckpt, tmp_path / "src"))
    f = src / "model_0.safetensors"
    tensors = load_file(f)
    name = "model.layers.0.self_attn.v_proj.weight"
    tensors[name] = (tensors[name].float() / 2).to(torch.float8_e4m3fn)
    save_file(tensors, f)
    res = CliRunner().invoke(main, [str(src), str(tmp_path / "out2"), "--devices", "1", "--quiet"])
    assert res.exit_code == 0
    assert "warning: layer 0: only" in res.stderr and "layer 5" not in res.stderr
    rec = next(
        a for a in load_output(tmp_path / "out2")["arrays"] if a["path"] == "layers/0/attn/qkv"
    )
    c = rec["checks"]["fused_kv"]
    assert c["fused_saturated"] < 0.9 * c["fused_blocks"]


def test_only_the_console_script_freezes_the_collector(tiny_ckpt, tmp_path):
    """``mimo-shard`` freezes its imports for the garbage collector (a faster exit); ``main``
    called in-process, as the tests do, leaves the collector as it found it."""
    import gc
    import subprocess
    import sys

    from click.testing import CliRunner

    from pipeline.cli import main

    before = gc.get_freeze_count()
    res = CliRunner().invoke(main, [str(tiny_ckpt), str(tmp_path / "a"), "--devices", "1"])
    assert res.exit_code == 0 and gc.get_freeze_count() == before
    probe = (
        "import atexit, gc, sys; from pipeline.cli import entry; "
        "atexit.register(lambda: print(gc.get_freeze_count(), file=sys.stderr)); entry()"
    )
    args = [str(tiny_ckpt), str(tmp_path / "b"), "--devices", "1", "--quiet"]
    run = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True
    )
    assert int(run.stderr.split()[-1]) > 1000  # the converter's modules and numba's objects
