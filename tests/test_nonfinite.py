"""Non-finite values (NaN, infinity) in the output fail the conversion unless allowed.

Bad checkpoints are made by patching bytes of a private copy of the tiny checkpoint in place:
an FP8 block scale set to NaN or infinity (a whole 128x128 block of the dequantised weight turns
non-finite), FP8 NaN codes (``0x7F``, ``0xFF``), and a bfloat16 NaN and infinity in a norm.
Without ``--allow-nonfinite`` mimo-shard exits 2 naming the tensor and the count and writes no
manifest; with it the conversion completes, warns, and the array records carry the counts.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.test_convert import TABLE_SCHEMA

Q = "model.layers.1.self_attn.q_proj.weight"  # F8_E4M3 [1536, 320], grid [12, 3] of 128x128
NORM = "model.layers.1.input_layernorm.weight"  # BF16 [320]
DOWN = "model.layers.3.mlp.experts.2.down_proj.weight"  # F8_E4M3 [320, 96], grid [3, 1]
FP8_EXPERTS = ("--expert-dtype", "float8_e4m3fn")


@pytest.fixture()
def ckpt(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def patch(ckpt: Path, name: str, index: tuple[int, ...], value: bytes) -> None:
    """Overwrite element ``index`` of tensor ``name`` with the raw bytes ``value``, in place."""
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    path = ckpt / weight_map[name]
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
        offset = int(np.ravel_multi_index(index, entry["shape"])) * len(value)
        f.seek(8 + n + entry["data_offsets"][0] + offset)
        f.write(value)


def run(ckpt: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(ckpt), str(out), "--devices", "2", "--quiet", *extra])
    return res.exit_code, res.stdout, res.stderr


def records(out: Path) -> dict[str, dict]:
    """store/path -> array record, over every store's table (schema-checked)."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for entry in manifest["stores"].values():
        table = json.loads((out / entry["table"]).read_text())
        jsonschema.validate(table, TABLE_SCHEMA)
        for r in table["arrays"]:
            found[f"{r['store']}/{r['path']}"] = r
    return found


F32_NAN = struct.pack("<f", float("nan"))
F32_INF = struct.pack("<f", float("inf"))

# (damage, extra options, tensor named, array, its recorded count, other record fields)
CASES = {
    "nan-scale": (
        [(Q + "_scale_inv", (0, 0), F32_NAN)],
        (),
        Q,
        "device-000/layers/1/attn/qkv",
        128 * 128,
        {},
    ),
    "inf-scale": (
        [(Q + "_scale_inv", (0, 0), F32_INF)],
        (),
        Q,
        "device-000/layers/1/attn/qkv",
        128 * 128,
        {},
    ),
    "nan-codes": (
        [(Q, (0, 0), b"\x7f"), (Q, (700, 9), b"\xff")],
        (),
        Q,
        "device-000/layers/1/attn/qkv",
        2,
        {},
    ),
    "norm-nan-inf": (
        [(NORM, (5,), b"\xc0\x7f"), (NORM, (6,), b"\x80\xff")],  # bf16 NaN, -inf
        (),
        NORM,
        "shared/layers/1/input_norm",
        2,
        {},
    ),
    "fp8-expert-nan-codes": (
        [(DOWN, (0, 0), b"\x7f"), (DOWN, (300, 95), b"\xff")],
        FP8_EXPERTS,
        DOWN,
        "device-000/layers/3/experts/down",
        2,
        {"nan_codes": 2},
    ),
    "fp8-expert-inf-scale": (
        [(DOWN + "_scale_inv", (1, 0), F32_INF)],
        FP8_EXPERTS,
        DOWN,
        "device-000/layers/3/experts/down_scale",
        1,
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nonfinite_fails_naming_tensor_and_count(ckpt, tmp_path, case):
    damage, extra, tensor, array, count, _ = CASES[case]
    for name, index, value in damage:
        patch(ckpt, name, index, value)
    code, _, err = run(ckpt, tmp_path / "out", *extra)
    assert code == 2, err
    assert f"'{tensor}'" in err and f"'{array}'" in err, err
    assert f"holds {count} non-finite" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_allow_nonfinite_converts_and_records_counts(ckpt, tmp_path, case):
    damage, extra, tensor, array, count, encoding = CASES[case]
    for name, index, value in damage:
        patch(ckpt, name, index, value)
    out = tmp_path / "out"
    code, _, err = run(ckpt, out, *extra, "--allow-nonfinite")
    assert code == 0, err
    assert "warning" in err and f"'{array}'" in err and f"holds {count} non-finite" in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["allow_nonfinite"] is True
    recs = records(out)
    assert recs[array]["nonfinite"] == count
    assert tensor in recs[array]["sources"]
    for key, n in encoding.items():
        assert recs[array]["encoding"][key] == n
    flagged = {k for k, r in recs.items() if "nonfinite" in r}
    assert flagged == {array}


def test_clean_output_records_no_counts_and_no_option(ckpt, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(ckpt, out, *FP8_EXPERTS)
    assert code == 0, err
    assert "allow_nonfinite" not in json.loads((out / "manifest.json").read_text())["options"]
    assert not any("nonfinite" in r for r in records(out).values())


def test_a_refused_run_resumes_with_allow_nonfinite(ckpt, tmp_path):
    patch(ckpt, NORM, (5,), b"\xc0\x7f")
    out = tmp_path / "out"
    assert run(ckpt, out)[0] == 2
    code, stdout, err = run(ckpt, out, "--allow-nonfinite")
    assert code == 0, err
    assert records(out)["shared/layers/1/input_norm"]["nonfinite"] == 1
