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
