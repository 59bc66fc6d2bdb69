"""The plan: checked-in real-model dry-runs are current; layout facts of the real model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mimo.config import MiMoConfig
from pipeline.cli import main
from pipeline.plan import Options, build_plan
from tests.conftest import REAL_CONFIG, ROOT

PLANS = ROOT / "manifests" / "mimo-v2-flash"


@pytest.mark.parametrize("devices", [32, 64])
@pytest.mark.parametrize("fmt", ["txt", "json"])
def test_checked_in_dry_run_plans_are_current(devices, fmt):
    args = ["--dry-run", "--config", str(REAL_CONFIG), "--devices", str(devices), "--workers", "4"]
    res = CliRunner().invoke(main, args + (["--json"] if fmt == "json" else []))
    assert res.exit_code == 0, res.output
    stored = (PLANS / f"dry-run-{devices}.{fmt}").read_text()
    # the origin names the config file as given on the command line
    assert res.output.replace(str(REAL_CONFIG), "config.json") == stored, "run `make plans`"


def test_real_plan_at_32_devices():
    cfg = MiMoConfig.from_file(REAL_CONFIG)
    plan = build_plan(cfg, Options(devices=32))
    summary = json.loads((PLANS / "dry-run-32.json").read_text())
    per_store = plan.store_bytes()
    devices = {v for k, v in per_store.items() if k != "shared"}
    assert len(devices) == 1  # every device holds the same bytes
    # experts: 47 layers x 8 experts x 3 x 2048 x 4096 x 2 bytes
    experts = 47 * 8 * 3 * 2048 * 4096 * 2
    assert summary["bytes"]["per_device_max"] > experts
    assert summary["bytes"]["shared"] == per_store["shared"]
    # full layers: query heads 18-19 read KV head 18 // 16 (4 KV heads, each on 8 devices)
    layout = plan.layout["attention"]
    assert layout["0"][9] == {"q_heads": [18, 20], "kv_heads": [1, 2]}
    assert layout["1"][9] == {"q_heads": [18, 20], "kv_heads": [2, 3]}  # 8 KV heads: groups of 8
    assert plan.layout["expert_map"]["47"][31] == list(range(248, 256))
    assert summary["source_bytes"] == 311_862_258_560  # every main-model tensor, none twice
    assert summary["expected_peak_memory"] < 2e9


def test_dry_run_without_workers_reports_the_default_within_the_budget(monkeypatch):
    from pipeline import memory

    monkeypatch.setattr(memory, "_cpus", lambda: 192)
    monkeypatch.setattr(memory, "_ram", lambda: 2 * 10**12)
    for devices in ("1", "32"):
        args = ["--dry-run", "--config", str(REAL_CONFIG), "--devices", devices, "--json"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output)
        assert 1 < summary["workers"] <= memory.MAX_WORKERS
        assert summary["expected_peak_memory"] <= memory.MEMORY_BUDGET
    assert summary["workers"] > 4  # 32 devices on a large host: more than the old fixed cap
