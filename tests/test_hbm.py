"""The HBM plan (mimo/hbm.py) of MiMo-V2-Flash's 32-device output, and rank placement."""

from __future__ import annotations

import json

import pytest
from conftest import REAL_CONFIG

from mimo import hbm
from mimo.config import MiMoConfig

DRY_RUN = REAL_CONFIG.parent / "dry-run-32.json"


@pytest.fixture(scope="module")
def real():
    return MiMoConfig.from_file(REAL_CONFIG), json.loads(DRY_RUN.read_text())


def test_32_devices_at_lnc_2_fit_from_the_manifest_bytes(real):
    cfg, manifest = real
    p = hbm.plan_from_manifest(manifest, cfg, max_seq_len=4096, lnc=2)
    assert p["capacity_bytes"] == 24 * hbm.GIB
    weights = manifest["bytes"]["per_device_max"] + manifest["bytes"]["shared"]
    assert p["breakdown"]["weights (device store)"] + p["breakdown"]["weights (shared store)"] == (
        weights
    )
    assert p["per_rank_bytes"] == sum(p["breakdown"].values()) > weights
    assert p["fits"] == (p["per_rank_bytes"] <= p["capacity_bytes"]) is True
    assert p["ranks_per_chip"] == 2  # 32 ranks spread over 16 chips
    hbm.check(p)  # no error
    assert "fits" in hbm.render(p)


def test_32_ranks_at_lnc_1_eight_per_chip_are_refused(real):
    cfg, manifest = real
    p = hbm.plan_from_manifest(manifest, cfg, max_seq_len=4096, lnc=1, ranks_per_chip=8)
    assert not p["fits"] and p["capacity_bytes"] == 12 * hbm.GIB
    with pytest.raises(hbm.DoesNotFit, match="--lnc 2.*FP8 experts") as e:
        hbm.check(p)
    assert "\n" not in str(e.value) and "more devices than 32" in str(e.value)


def test_kv_cache_by_layer_kind(real):
    cfg, _ = real
    heads = {s.index: 1 for s in cfg.layers}
    kv = hbm.kv_bytes(cfg, heads, 4096)
    full = sum(s.attention == "full" for s in cfg.layers)
    assert kv["full"] == full * 4096 * (192 + 128) * 2
    sliding = [s for s in cfg.layers if s.attention != "full"]
    assert kv["sliding"] == len(sliding) * (128 * (192 + 128) * 2 + 128 * 4)


def test_ranks_spread_over_chips():
    cores = [hbm.core_for_rank(r, 32, 2) for r in range(32)]
    assert [c["chip"] for c in cores[:16]] == list(range(16))
    assert len({c["core"] for c in cores}) == 32
    assert all(c["core"] // 4 == c["chip"] for c in cores)  # 4 logical cores per chip at lnc 2
    assert hbm.core_for_rank(64, 128, 2)["instance"] == 1
    with pytest.raises(ValueError, match="--lnc must be 1 or 2"):
        hbm.core_for_rank(0, 1, 3)
