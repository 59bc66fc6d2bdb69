"""Bad input: a message naming the file/tensor/option, exit code != 0, and no manifest."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from tests.conftest import disk_full_after


@pytest.fixture()
def ckpt(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args] + ["--quiet"])
    return res.exit_code, res.output


def fails(ckpt: Path, out: Path, *expected: str, devices: int = 2, extra=()) -> str:
    code, text = run(ckpt, out, "--devices", devices, *extra)
    assert code != 0, text
    for e in expected:
        assert e in text, (e, text)
    assert not (out / "manifest.json").exists()
    return text


def edit_index(ckpt: Path, fn) -> None:
    p = ckpt / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def edit_config(ckpt: Path, **kw) -> None:
    p = ckpt / "config.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | kw))


def test_truncated_safetensors(ckpt, tmp_path):
    f = ckpt / "model_3_linear_fc1.safetensors"
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size - 1000)
    fails(ckpt, tmp_path / "out", "model_3_linear_fc1.safetensors", "truncated")


def test_malformed_header(ckpt, tmp_path):
    f = ckpt / "model_2.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))
    fails(ckpt, tmp_path / "out", "model_2.safetensors", "malformed")


def test_header_larger_than_file(ckpt, tmp_path):
    f = ckpt / "model_embedding.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**9)
    f.write_bytes(bytes(data))
    fails(ckpt, tmp_path / "out", "model_embedding.safetensors", "larger than the file")


def test_tensor_in_index_but_not_in_file(ckpt, tmp_path):
    name = "model.layers.2.self_attn.q_proj.weight"
    edit_index(ckpt, lambda wm: wm.__setitem__(name, "model_3.safetensors"))
    fails(ckpt, tmp_path / "out", "model_3.safetensors", name, "not in the file")


def test_file_listed_in_index_missing(ckpt, tmp_path):
    (ckpt / "model_4_linear_fc2.safetensors").unlink()
    fails(ckpt, tmp_path / "out", "model_4_linear_fc2.safetensors", "missing")


def test_shape_contradicting_config(ckpt, tmp_path):
    edit_config(ckpt, num_attention_heads=4, swa_num_attention_heads=4)
    fails(
        ckpt,
        tmp_path / "out",
        "model_0.safetensors",
        "model.layers.0.self_attn.q_proj.weight",
        "shape",
    )


def test_dtype_contradicting_config(ckpt, tmp_path):
    f = ckpt / "model_1.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.gate.weight"
    tensors[name] = tensors[name].bfloat16()  # the router must be F32
    save_file(tensors, f)
    fails(ckpt, tmp_path / "out", "model_1.safetensors", name, "dtype BF16")


def test_missing_scale(ckpt, tmp_path):
    name = "model.layers.6.mlp.experts.3.down_proj.weight_scale_inv"
    edit_index(ckpt, lambda wm: wm.pop(name))
    fails(ckpt, tmp_path / "out", name, "scale")


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.3.mlp.experts.2.gate_proj.weight_scale_inv",  # standard grid [1, 3]
        "model.layers.5.self_attn.k_proj.weight_scale_inv",  # fused per-head grid [4, 3]
    ],
)
def test_misshaped_scale(ckpt, tmp_path, name):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    f = ckpt / index["weight_map"][name]
    tensors = load_file(f)
    tensors[name] = tensors[name][:, :2].contiguous()  # one column block short
    save_file(tensors, f)
    fails(ckpt, tmp_path / "out", index["weight_map"][name], name, "shape")


def test_index_path_escaping_the_source_folder(ckpt, tmp_path):
    name = "model.layers.1.input_layernorm.weight"
    edit_index(ckpt, lambda wm: wm.__setitem__(name, "../outside.safetensors"))
    fails(ckpt, tmp_path / "out", name, "../outside.safetensors", "outside the source folder")


def test_symlink_escaping_the_source_folder(ckpt, tmp_path):
    f = ckpt / "model_final.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(f, moved)
    f.symlink_to(moved)
    fails(ckpt, tmp_path / "out", "model_final.safetensors", "outside the source folder")


@pytest.mark.parametrize(
    ("devices", "extra", "message"),
    [
        (3, (), "--devices 3 does not divide the 8 attention heads"),
        (16, (), "--devices 16 does not divide the 8 attention heads"),
        (4, ("--experts", "0-5"), "--devices 4 does not divide the 6 --experts subset"),
        (0, (), "--devices 0"),
    ],
)
def test_device_count_not_dividing(ckpt, tmp_path, devices, extra, message):
    fails(ckpt, tmp_path / "out", message, devices=devices, extra=extra)
    assert not (tmp_path / "out").exists()  # nothing written before validation passed


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--layers", "0-99", "--layers '0-99': 7 and 92 more are out of range (valid: 0-6)"),
        ("--layers", "3-1", "runs backwards"),
        ("--experts", "abc", "--experts 'abc': 'abc' is not an index"),
        ("--experts", "1,1", "repeated"),
    ],
)
def test_unknown_subset_values(ckpt, tmp_path, option, value, message):
    fails(ckpt, tmp_path / "out", message, extra=(option, value))


def test_output_folder_holding_something_else(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ((), ("--force",)):
        fails(ckpt, out, str(out), "not written by mimo-shard", extra=extra)
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_config_that_is_not_mimo(ckpt, tmp_path):
    edit_config(ckpt, hybrid_layer_pattern=[0, 1])
    fails(ckpt, tmp_path / "out", "config.json", "hybrid_layer_pattern")


def test_full_disk_is_reported_and_resumable(ckpt, tmp_path, monkeypatch):
    """ENOSPC mid-run: exit 1, a message, no manifest; a rerun with space completes."""
    import os

    import pipeline.store as store

    real = os.pwrite
    monkeypatch.setattr(store.os, "pwrite", disk_full_after(40))
    out = tmp_path / "out"
    text = fails(ckpt, out, "No space left on device", "resumed")
    assert "Traceback" not in text
    monkeypatch.setattr(store.os, "pwrite", real)
    code, text = run(ckpt, out, "--devices", 2)
    assert code == 0, text
    assert (out / "manifest.json").exists()
    assert not list(out.glob("*.zarr/**/*.partial"))


def test_damaged_state_is_refused_unless_force(ckpt, tmp_path):
    out = tmp_path / "out"
    code, text = run(ckpt, out, "--devices", 2)
    assert code == 0, text
    (out / "manifest.json").write_text("{damaged")
    code, text = run(ckpt, out, "--devices", 2)
    assert code == 2 and "manifest.json" in text and "damaged" in text and "--force" in text
    code, text = run(ckpt, out, "--devices", 2, "--force")
    assert code == 0, text
    assert (out / "manifest.json").read_text().startswith("{")


def test_a_missing_folder_that_looks_like_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing leaves the machine
    monkeypatch.chdir(tmp_path)
    code, text = run("nosuch/folder", tmp_path / "out", "--devices", 2)
    assert code == 2 and "there is no local folder 'nosuch/folder'" in text
