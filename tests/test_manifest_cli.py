"""mimo-manifest: verify catches damage, diff detects changes, audit accounts, JSON is stable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loader.cli import main
from pipeline.convert import convert
from pipeline.source import LocalSource
from tests.test_convert import load_output


def run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def out2(tiny_mtp_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out2") / "out"
    convert(LocalSource(tiny_mtp_ckpt), out, 2, progress=False)
    return out


@pytest.fixture()
def copy(out2, tmp_path) -> Path:
    return Path(shutil.copytree(out2, tmp_path / "out"))


def chunk(out: Path, store: str, path: str) -> Path:
    rec = next(a for a in load_output(out)["arrays"] if a["store"] == store and a["path"] == path)
    return out / f"{store}.zarr" / path / "/".join(["c"] + ["0"] * len(rec["shape"]))


def test_verify_passes_on_a_sound_output(out2):
    code, text = run("verify", out2, "-q")
    assert code == 0 and "all match" in text


@pytest.mark.parametrize(
    ("store", "path", "damage"),
    [
        ("shared", "embed", "flip-first"),
        ("device-001", "layers/6/experts/gate_up", "flip-middle"),
        ("device-000", "lm_head", "flip-last"),
        ("shared", "layers/2/router", "truncate"),
        ("device-001", "layers/0/attn/qkv", "delete"),
    ],
)
def test_verify_names_every_damaged_array(copy, store, path, damage):
    f = chunk(copy, store, path)
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[:-4]))
    elif damage == "delete":
        f.unlink()
    else:
        i = {"flip-first": 0, "flip-middle": len(data) // 2, "flip-last": len(data) - 1}[damage]
        data[i] ^= 0x01
        f.write_bytes(bytes(data))
    also = chunk(copy, "device-000", "layers/1/attn/o")  # a second damaged array is named too
    b = bytearray(also.read_bytes())
    b[7] ^= 0x80
    also.write_bytes(bytes(b))
    code, text = run("verify", copy, "-q")
    assert code == 1
    why = {"truncate": "size", "delete": "missing"}.get(damage, "checksum")
    assert f"MISMATCH {store}/{path}: {why}" in text
    assert "MISMATCH device-000/layers/1/attn/o: checksum" in text
    assert "2 of" in text


def test_verify_one_device_only(copy):
    f = chunk(copy, "device-001", "lm_head")
    f.write_bytes(f.read_bytes()[:-2])
    assert run("verify", copy, "--device-rank", "0", "-q")[0] == 0
    assert run("verify", copy, "--device-rank", "1", "-q")[0] == 1


def test_incomplete_output_is_refused(copy):
    (copy / "manifest.json").unlink()
    for cmd in (("show",), ("verify",), ("list",)):
        code, text = run(*cmd, copy)
        assert code == 2 and "incomplete" in text


def test_diff_identical_then_changed_option_then_changed_byte(tiny_mtp_ckpt, out2, tmp_path):
    same = tmp_path / "same"
    convert(LocalSource(tiny_mtp_ckpt), same, 2, progress=False)
    code, text = run("diff", out2, same)
    assert code == 0 and "identical content" in text

    four = tmp_path / "four"
    convert(LocalSource(tiny_mtp_ckpt), four, 4, progress=False)
    code, text = run("diff", out2, four, "--json")
    d = json.loads(text)
    assert code == 1 and not d["identical"]
    assert d["options"]["devices"] == {"a": 2, "b": 4}
    assert {"store": "device-003", "path": "lm_head"} in d["only_in_b"]

    src = Path(shutil.copytree(tiny_mtp_ckpt, tmp_path / "src"))
    f = src / "model_4.safetensors"
    tensors = load_file(f)
    name = "model.layers.4.post_attention_layernorm.weight"
    tensors[name][17] += 1.0  # one value of one norm
    save_file(tensors, f, metadata={"format": "pt"})
    changed = tmp_path / "changed"
    convert(LocalSource(src), changed, 2, progress=False)
    code, text = run("diff", out2, changed)
    assert code == 1
    assert "changed  shared/layers/4/post_attn_norm: checksum" in text
    assert text.count("changed  ") == 1  # exactly the one array that read the changed value


def test_audit_accounts_for_every_source_tensor(tiny_mtp_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_mtp_ckpt), out, 2, layers="0-2", experts="0-7", progress=False)
    code, text = run("audit", out, tiny_mtp_ckpt, "--json")
    r = json.loads(text)
    assert code == 0
    c = r["counts"]
    assert c["total"] == c["used"] + c["skipped"] and c["unexpected"] == 0
    assert r["skipped_reasons"]["MTP layer (multi-token prediction is not converted)"] == 60
    assert (
        r["tensors"]["model.layers.5.self_attn.q_proj.weight"]["reason"]
        == "layer outside the --layers subset"
    )
    assert r["tensors"]["model.layers.1.mlp.experts.9.up_proj.weight"]["status"] == "skipped"
    scale = r["tensors"]["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    assert scale == {"status": "used", "arrays": ["device-000/layers/1/experts/gate_up"]}
    # a tensor nobody asked for is unexpected
    index = json.loads((tiny_mtp_ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.self_attn.q_norm.weight"] = "model_1.safetensors"
    (tmp_path / "index.json").write_text(json.dumps(index))
    code, text = run("audit", out, tmp_path / "index.json")
    assert code == 1 and "UNEXPECTED model.layers.1.self_attn.q_norm.weight" in text


SHOW_KEYS = {
    "out",
    "format_version",
    "tool",
    "created",
    "model",
    "source",
    "options",
    "subsets",
    "layout",
    "stores",
    "totals",
}
LIST_KEYS = {"store", "path", "shape", "dtype", "bytes", "checksum", "transform", "sources"}
DIFF_KEYS = {
    "identical",
    "options",
    "config",
    "only_in_a",
    "only_in_b",
    "changed",
    "same_source_index",
    "arrays",
}
AUDIT_KEYS = {"tensors", "counts", "skipped_reasons", "sources_missing_from_index"}


def test_json_outputs_are_stable(out2, tiny_mtp_ckpt):
    outputs = {}
    for name, args, keys in (
        ("show", ("show", out2, "--json"), SHOW_KEYS),
        ("list", ("list", out2, "--device-rank", "1", "--json"), None),
        ("diff", ("diff", out2, out2, "--json"), DIFF_KEYS),
        ("audit", ("audit", out2, tiny_mtp_ckpt, "--json"), AUDIT_KEYS),
    ):
        first, second = run(*args), run(*args)
        assert first == second  # deterministic
        doc = json.loads(first[1])
        if keys is not None:
            assert set(doc) == keys, name
        outputs[name] = doc
    assert all(set(r) == LIST_KEYS for r in outputs["list"])
    assert {r["store"] for r in outputs["list"]} == {"shared", "device-001"}
    show = outputs["show"]
    assert show["options"] == {"devices": 2, "dtype": "bfloat16", "layers": None, "experts": None}
    assert show["model"]["full_attention_layers"] == [0, 5]
    assert show["layout"]["experts_per_device_per_layer"] == [8]
    assert show["source"]["mtp_layers_skipped"] == 3


def test_human_show_is_aligned(out2):
    code, text = run("show", out2)
    lines = text.splitlines()
    assert code == 0 and len(lines) >= 8
    col = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(col) == 1  # every value starts in the same column
    assert np.dtype(ml_dtypes.bfloat16).name == "bfloat16"


def test_list_kinds_accounts_for_every_array_by_layout_row(tiny_ckpt, tmp_path):
    """``list --kinds`` derives from the layout table: every array belongs to one row, and the
    rows' counts and bytes add up to the manifest's totals."""
    from mimo.layout import ARRAYS
    from pipeline.convert import convert
    from pipeline.source import LocalSource

    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, progress=False)
    r = CliRunner().invoke(main, ["list", str(out), "--kinds", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert sum(x["arrays"] for x in rows) == totals["arrays"]
    assert sum(x["bytes"] for x in rows) == totals["bytes"]
    order = [k.path for k in ARRAYS]
    assert [x["kind"] for x in rows] == sorted((x["kind"] for x in rows), key=order.index)
    experts = next(x for x in rows if x["kind"] == "layers/{layer}/experts/gate_up")
    assert experts["split"] == "experts" and experts["store"] == "device"
    text = CliRunner().invoke(main, ["list", str(out), "--kinds"])
    assert text.exit_code == 0 and "layers/{layer}/attn/qkv" in text.output
