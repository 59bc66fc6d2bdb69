"""The memory model (``pipeline.memory``) against what every unit of a conversion really asks for.

Each unit runs with an empty buffer pool; afterwards the pool holds, per role, a buffer of the
unit's largest request of that role. The model must cover every one, and not by much more: an
estimate that is far too high is as useless to a user sizing a host as one that is too low.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest

from pipeline import buffers, memory, reading, transforms
from pipeline.convert import convert, make_plan
from pipeline.source import LocalSource

# limits shrunk so the tiny checkpoint's units read in steps, copy in steps and build bands
SHRUNK = {
    (reading, "CHUNK_BYTES"): 1 << 14,
    (transforms, "COPY_BYTES"): 1 << 14,
    (transforms, "IN_MEMORY_LIMIT"): 1 << 16,
}


@pytest.mark.parametrize("expert_dtype", ["bfloat16", "float8_e4m3fn", "float8_e4m3"])
@pytest.mark.parametrize("shrunk", [False, True])
def test_every_unit_asks_for_what_the_model_says(
    tiny_ckpt, tmp_path, monkeypatch, expert_dtype, shrunk
):
    if shrunk:
        for (module, name), value in SHRUNK.items():
            monkeypatch.setattr(module, name, value)
    asked: dict[str, dict[str, int]] = {}

    def recording(transform):
        def run(ctx, unit):
            buffers._local.pool = OrderedDict()
            transform(ctx, unit)
            asked[unit.id] = {role: b.nbytes for role, b in buffers._local.pool.items()}

        return run

    for name, transform in list(transforms.TRANSFORMS.items()):
        monkeypatch.setitem(transforms.TRANSFORMS, name, recording(transform))
    source = LocalSource(tiny_ckpt)
    convert(source, tmp_path / "out", 4, expert_dtype=expert_dtype, workers=1, progress=False)
    plan = make_plan(LocalSource(tiny_ckpt), 4, expert_dtype=expert_dtype)[0]
    assert len(asked) == len(plan.units)
    predicted = asked_total = 0
    for unit in plan.units:
        model = memory.unit_buffers(unit, plan.inventory, plan.config)
        for role, n in asked[unit.id].items():
            assert n <= max(model.get(role, 0), 1), (unit.id, role, n, model)
        kept = sum(n for role, n in model.items() if role != "other")
        predicted, asked_total = predicted + kept, asked_total + sum(asked[unit.id].values())
    assert predicted <= 1.5 * asked_total  # the model is an estimate, not a blanket


def test_peak_memory_is_per_role_maxima_per_worker(tiny_ckpt):
    plan = make_plan(LocalSource(tiny_ckpt), 2)[0]
    one, four = memory.peak_memory(plan, 1), memory.peak_memory(plan, 4)
    assert four - memory.BASELINE_RSS == 4 * (one - memory.BASELINE_RSS)
    needs = [memory.unit_buffers(u, plan.inventory, plan.config) for u in plan.units]
    per_role = {r: max(n[r] for n in needs) for r in memory.ROLES}
    assert one - memory.BASELINE_RSS == sum(per_role.values())
