"""FP8 expert stores (``--expert-dtype float8_e4m3fn|float8_e4m3``): the checkpoint's codes, exact.

Expectations come from the hub tensors read with the safetensors library, not from the
converter's code: OCP stores hold the source codes transposed byte for byte and the scale grid
transposed; Trainium2 stores dequantise to the same values (up to the counted subnormal ties).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mimo import names
from mimo.config import MiMoConfig
from pipeline.convert import convert
from pipeline.source import LocalSource
from tests.conftest import ROOT
from tests.test_convert import load_output, read_store_array

REAL_CONFIG = ROOT / "manifests" / "mimo-v2-flash" / "config.json"


DTYPES = {"F8_E4M3": np.uint8, "F32": np.float32}


def hub_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """The expert files' tensors (FP8 as raw uint8 codes), read with a plain header parser."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*linear_fc*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        body = data[8 + n :]
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            out[name] = np.frombuffer(body[a:b], DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


@pytest.fixture(scope="module", params=["float8_e4m3fn", "float8_e4m3"])
def fp8_out(request, tiny_ckpt, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"fp8-{request.param}") / "out"
    convert(
        LocalSource(tiny_ckpt), out, 2, expert_dtype=request.param, workers=2, progress=False
    )
    return request.param, out


def experts_of(manifest: dict, layer: int) -> list[tuple[str, list[int]]]:
    blocks = manifest["layout"]["expert_map"][str(layer)]
    return [(f"device-{r:03d}", ids) for r, ids in enumerate(blocks)]


def test_stores_hold_the_checkpoint_codes_and_grids(fp8_out, tiny_ckpt):
    encoding, out = fp8_out
    cfg = MiMoConfig.from_file(tiny_ckpt / "config.json")
    hub = hub_tensors(tiny_ckpt)
    m = load_output(out)
    checked = inexact = 0
    for layer in cfg.moe_layers:
        for store, ids in experts_of(m, layer):
            gate_up = read_store_array(out, store, f"layers/{layer}/experts/gate_up")
            gu_scale = read_store_array(out, store, f"layers/{layer}/experts/gate_up_scale")
            down = read_store_array(out, store, f"layers/{layer}/experts/down")
            dn_scale = read_store_array(out, store, f"layers/{layer}/experts/down_scale")
            assert gate_up.dtype == np.dtype(getattr(ml_dtypes, encoding))
            for j, e in enumerate(ids):
                parts = [
                    (gate_up[j], gu_scale[j], ("expert.gate_proj", "expert.up_proj")),
                    (down[j], dn_scale[j], ("expert.down_proj",)),
                ]
                for codes, grid, roles in parts:
                    src = [hub[names.name(r, layer, e)] for r in roles]
                    src_grid = [hub[names.scale_name(names.name(r, layer, e))] for r in roles]
                    want_codes = np.concatenate([s.T for s in src], axis=1)
                    want_grid = np.concatenate([g.T for g in src_grid], axis=1)
                    if encoding == "float8_e4m3fn":
                        assert np.array_equal(codes.view(np.uint8), want_codes.view(np.uint8))
                        assert np.array_equal(grid, want_grid)
                    else:
                        inexact += assert_same_values(
                            codes, grid, want_codes, want_grid, src[0].shape
                        )
                    checked += 1
    assert checked == 2 * len(cfg.moe_layers) * cfg.n_routed_experts
    recorded = sum(a.get("encoding", {}).get("inexact", 0) for a in m["arrays"])
    assert inexact == recorded  # the manifest counts exactly the elements that moved


def element_scales(grid: np.ndarray, widths: list[int], rows: int) -> np.ndarray:
    """The scale of each element of ``[rows, sum(widths)]`` codes; the grid holds one block set
    per part (gate's, then up's), each part's blocks starting at its own first column."""
    parts, gcol = [], 0
    for w in widths:
        nb = -(-w // 128)
        parts.append(np.repeat(np.repeat(grid[:, gcol : gcol + nb], 128, 0), 128, 1)[:rows, :w])
        gcol += nb
    return np.concatenate(parts, axis=1).astype(np.float64)


def assert_same_values(codes, grid, want_codes, want_grid, part_shape) -> int:
    """Every element dequantises to the source's value but the counted ties; returns them."""
    widths = [part_shape[0]] * (want_codes.shape[1] // part_shape[0])
    rows = codes.shape[0]
    got = codes.astype(np.float64) * element_scales(grid, widths, rows)
    src_scale = element_scales(want_grid, widths, rows)
    want = want_codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * src_scale
    diff = got != want
    # only odd codes of exponent 0 or 1 are inexact (docs/format.md): a tie, 2^-9 of the scale
    src_bits = want_codes.view(np.uint8) & 0x7F
    assert np.all(src_bits[diff] % 2 == 1) and np.all(src_bits[diff] < 0x10)
    assert np.all(np.abs(got - want)[diff] == src_scale[diff] * 2.0**-9)
    return int(diff.sum())


def test_manifest_records_the_encoding(fp8_out):
    encoding, out = fp8_out
    m = load_output(out)
    codes = [a for a in m["arrays"] if a["path"].endswith(("experts/gate_up", "experts/down"))]
    scales = [a for a in m["arrays"] if a["path"].endswith("_scale")]
    assert codes and len(scales) == len(codes)
    for a in codes:
        enc = a["encoding"]
        assert enc["format"] == encoding == a["dtype"] and enc["block"] == [128, 128]
        assert enc["scale"] == a["path"] + "_scale"
        assert enc["nan_codes"] == 0 and enc["nonfinite_scales"] == 0
        if encoding == "float8_e4m3fn":
            assert enc["halved_blocks"] == 0 and enc["inexact"] == 0
    if encoding == "float8_e4m3":  # amax/448 scales: nearly every block holds a code >= 256
        assert sum(a["encoding"]["halved_blocks"] for a in codes) > 0
    for a in scales:
        assert a["dtype"] == "float32" and a["scale_of"] == a["path"].removesuffix("_scale")
    assert m["options"]["expert_dtype"] == encoding
    others = [a for a in m["arrays"] if "experts" not in a["path"] and a["dtype"] != "float32"]
    assert {a["dtype"] for a in others} == {"bfloat16"}  # every other array keeps --dtype


def test_verify_and_open_device_accept_fp8_stores(fp8_out):
    from loader import open_device

    encoding, out = fp8_out
    r = subprocess.run(
        [sys.executable, "-m", "loader.cli", "verify", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    dev = open_device(out, 1)
    layer = dev.config.moe_layers[0]
    assert dev[f"layers/{layer}/experts/gate_up"].dtype == np.dtype(getattr(ml_dtypes, encoding))
    assert dev[f"layers/{layer}/experts/down_scale"].dtype == np.float32


def test_bfloat16_default_is_todays_output(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, workers=2, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert "expert_dtype" not in m["options"]  # the identity of bf16 outputs is unchanged


@pytest.mark.parametrize("devices", [32, 64])
def test_real_model_dry_run_per_device_bytes(devices):
    def plan(expert_dtype: str) -> dict:
        r = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "--dry-run", "--config", str(REAL_CONFIG),
             "--devices", str(devices), "--expert-dtype", expert_dtype, "--json"],
            capture_output=True, text=True, cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    bf16, fp8 = plan("bfloat16"), plan("float8_e4m3fn")
    assert bf16["bytes"]["shared"] == fp8["bytes"]["shared"]
    ratio = fp8["bytes"]["per_device_max"] / bf16["bytes"]["per_device_max"]
    assert 0.5 < ratio < 0.53  # experts halve; everything else stays bf16
    if devices == 32:
        assert 9.8e9 < fp8["bytes"]["per_device_max"] < 10.0e9  # about 10 GB
    checked_in = ROOT / "manifests" / "mimo-v2-flash" / f"dry-run-{devices}-fp8.json"
    stored = json.loads(checked_in.read_text())
    assert stored["bytes"] == fp8["bytes"] and stored["options"] == fp8["options"]


def test_fp8_expert_dtype_needs_an_fp8_checkpoint(tmp_path):
    from pipeline.errors import InputError
    from pipeline.plan import Options, build_plan

    cfg = json.loads(REAL_CONFIG.read_text())
    cfg.pop("quantization_config")
    with pytest.raises(InputError, match="--expert-dtype"):
        build_plan(MiMoConfig.from_dict(cfg), Options(devices=1, expert_dtype="float8_e4m3"))


@pytest.fixture(scope="module")
def fp8_reference(tiny_ckpt):
    """transformers with float32-dequantised experts (no bf16 rounding), other weights bf16."""
    from tests.oracle import load_transformers_model
    from tests.oracle import logits as oracle_logits
    from tests.test_model import PROMPT

    return oracle_logits(load_transformers_model(tiny_ckpt, expert_rounding=None), PROMPT)


@pytest.mark.parametrize("encoding", ["float8_e4m3fn", "float8_e4m3"])
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_fp8_logits_equal_transformers(tiny_ckpt, tmp_path, fp8_reference, encoding, devices):
    """Prompts cross the sliding window (40 tokens, 17 keys); both backends' MoE paths."""
    from runtime.backends import CpuBackend
    from runtime.ranks import InProcessRanks
    from tests.test_model import PROMPT, rel

    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, devices, expert_dtype=encoding, progress=False)
    for exact in (False, True):
        factory = functools.partial(lambda exact, _rank: CpuBackend(exact=exact), exact)
        with InProcessRanks(out, max_seq_len=64, backend_factory=factory) as model:
            got = model.prefill(PROMPT)
        assert rel(got, fp8_reference) < 1e-3, exact
        assert (got.argmax(-1) == fp8_reference.argmax(-1)).all()
