"""The memory model (``pipeline.memory``) against what every unit of a conversion really asks for.

Each unit runs with an empty buffer pool, in a fresh process (``tests/memory_probe.py``);
afterwards the pool holds, per role, a buffer of the unit's largest request of that role, and
``tracemalloc`` gives the most the unit held at once. The model must cover every one, and not by
much more: an estimate far too high is as useless to a user sizing a host as one too low.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import memory
from pipeline.convert import make_plan
from pipeline.source import LocalSource
from tests.conftest import ROOT
from tests.memory_probe import SHRUNK

SLACK = 96 << 10  # a unit's writers and records (Python objects), and buffer alignment


@pytest.mark.parametrize(
    ("dtype", "expert_dtype"),
    [
        ("bfloat16", "bfloat16"),
        ("bfloat16", "float8_e4m3fn"),
        ("bfloat16", "float8_e4m3"),
        ("float32", "bfloat16"),  # casting reads: bf16 embedding and lm_head to float32
    ],
)
@pytest.mark.parametrize("shrunk", [False, True])
def test_every_unit_asks_for_what_the_model_says(
    tiny_ckpt, tmp_path, monkeypatch, dtype, expert_dtype, shrunk
):
    args = [str(tiny_ckpt), str(tmp_path), dtype, expert_dtype, "1" if shrunk else "0"]
    run = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", *args],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    units = json.loads(run.stdout)
    if shrunk:  # the plan's sizes under the same limits
        for (module, name), value in SHRUNK.items():
            monkeypatch.setattr(module, name, value)
    plan = make_plan(LocalSource(tiny_ckpt), 4, dtype=dtype, expert_dtype=expert_dtype)[0]
    assert len(units) == len(plan.units)
    predicted = asked_total = 0
    for unit in plan.units:
        model = memory.unit_buffers(unit, plan.inventory, plan.config)
        asked, peak = units[unit.id]["asked"], units[unit.id]["peak"]
        for role, n in asked.items():
            assert n <= max(model.get(role, 0), 1), (unit.id, role, n, model)
        # everything the unit held at once, buffers and short-lived arrays, within the model
        assert peak <= sum(model.values()) + SLACK, (unit.id, peak, model)
        kept = sum(n for role, n in model.items() if role != "other")
        predicted, asked_total = predicted + kept, asked_total + sum(asked.values())
    assert predicted <= 1.5 * asked_total  # the model is an estimate, not a blanket


def test_peak_memory_is_per_role_maxima_per_worker(tiny_ckpt):
    plan = make_plan(LocalSource(tiny_ckpt), 2)[0]
    one, four = memory.peak_memory(plan, 1), memory.peak_memory(plan, 4)
    assert four - memory.BASELINE_RSS == 4 * (one - memory.BASELINE_RSS)
    needs = [memory.unit_buffers(u, plan.inventory, plan.config) for u in plan.units]
    per_role = {r: max(n[r] for n in needs) for r in memory.ROLES}
    assert one - memory.BASELINE_RSS == sum(per_role.values())


def test_default_workers_follow_the_cores_within_the_memory_budget(monkeypatch):
    """Without --workers: CPUs + 2, at most MAX_WORKERS, and never so many that the estimated
    peak passes the budget (2 GB, or half a small machine's RAM) — at least one."""
    per = 138 * 10**6  # one worker at 32 devices on the real model (dry run)
    monkeypatch.setattr(memory, "_ram", lambda: 64 * 10**9)
    monkeypatch.setattr(memory, "_cpus", lambda: 2)
    assert memory.default_workers(per) == 4
    monkeypatch.setattr(memory, "_cpus", lambda: 192)
    n = memory.default_workers(per)
    assert n == 13 < memory.MAX_WORKERS  # the budget decides on a large host
    assert memory.BASELINE_RSS + n * per <= memory.MEMORY_BUDGET
    assert memory.BASELINE_RSS + (n + 1) * per > memory.MEMORY_BUDGET
    assert memory.default_workers(1 << 20) == memory.MAX_WORKERS
    monkeypatch.setattr(memory, "_ram", lambda: 2 * 10**9)  # 1 GB budget
    assert memory.default_workers(per) == (10**9 - memory.BASELINE_RSS) // per
    assert memory.default_workers(10**10) == 1
