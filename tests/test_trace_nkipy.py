"""Every device kernel traces with the real nkipy tracer and lowers to an HLO module proto.

Runs only where nkipy (from its source checkout) imports: ``make trace`` builds ``.venv-trace``
with it, then ``.venv-trace/bin/python -m pytest -q tests/test_trace_nkipy.py``. Elsewhere (the
main virtualenv, CI) the whole module is skipped. Shapes are the tiny synthetic preset's, for
one and two devices; the traced modules are not compiled or executed (that needs neuronx-cc), so
their signatures are checked against the same kernels run on NumPy instead.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nkipy.core.trace", reason="real nkipy not installed; run make trace")

from bench.trace import (  # noqa: E402
    F32,
    Case,
    kernel_cases,
    placeholder,
    trace_case,
    untraced_kernels,
)
from pipeline.synth import preset_config  # noqa: E402
from runtime import ops  # noqa: E402
from runtime.comm import SingleRank  # noqa: E402

MAX_SEQ_LEN = 32
PHASES = [("prefill", 20), ("decode", 1)]  # 20 tokens overflow the tiny sliding-window ring
COLLECTIVES = ("all-reduce", "all-gather")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(preset_config("tiny")))
    return path


def cases_of(config, devices, tokens):
    return kernel_cases(config, devices, tokens, MAX_SEQ_LEN)


def lower(case):
    """The traced module and its HLO proto's entry computation."""
    from nkipy.core.trace import NKIPyKernel

    module = NKIPyKernel.trace(case.kernel).specialize(
        **{k: placeholder(s) for k, s in case.arrays.items()}, **case.static
    )
    proto = module.to_proto()
    entry = next(c for c in proto.computations if c.id == proto.entry_computation_id)
    return module, entry


def sample_inputs(case, rng):
    """Valid values for a case's arrays, as the model would pass them."""
    shapes = {k: s for k, (s, _) in case.arrays.items()}
    out = {}
    for name, (shape, dtype) in case.arrays.items():
        if name == "positions":
            value = np.arange(shapes["positions"][0])
        elif name == "slots":
            ring = shapes["ring_pos"][0]
            value = np.arange(shapes["positions"][0])[-shape[0] :] % ring
        elif name == "ring_pos":
            value = np.full(shape, -1)
        elif name == "ids":
            value = rng.integers(0, shapes["table"][0], shape)
        elif name == "expert_ids":
            value = np.arange(shape[0])
        elif name == "u":
            value = rng.random(shape)
        else:
            value = rng.standard_normal(shape) * 0.1
        out[name] = np.asarray(value).astype(dtype)
    return out


@pytest.mark.parametrize("phase, tokens", PHASES)
@pytest.mark.parametrize("devices", [1, 2])
def test_every_kernel_traces_and_lowers(config, devices, phase, tokens):
    cases = cases_of(config, devices, tokens)
    failures = {c.label: r.error for c in cases if (r := trace_case(c)).error is not None}
    assert failures == {}
    assert untraced_kernels(cases) == []


@pytest.mark.parametrize("phase, tokens", PHASES)
def test_traced_signature_matches_numpy(config, phase, tokens):
    """Inputs are the model's argument names (state as aliased inputs); output0 has the shape and
    dtype the kernel returns on NumPy with the same arguments."""
    rng = np.random.default_rng(0)
    for case in cases_of(config, 1, tokens):
        module, _ = lower(case)
        names = {p.name for p in module.inputs}
        want = {f"{k}.must_alias_input" if k in case.state else k for k in case.arrays}
        assert names == want, case.label
        static = {k: SingleRank() if k == "comm" else v for k, v in case.static.items()}
        with np.errstate(all="ignore"):
            result = case.kernel(**sample_inputs(case, rng), **static)
        first = result[0] if isinstance(result, tuple) else result
        out0 = next(o for o in module.outputs if o.name == "output0")
        assert (tuple(out0.shape), np.dtype(out0.dtype)) == (first.shape, first.dtype), case.label
        aliased = {o.name for o in module.outputs} - {f"output{i}" for i in range(8)}
        assert aliased == set(case.state), case.label


def test_collectives_span_every_device(config):
    """Kernels given a communicator emit one collective over all ranks; the others none."""
    for case in cases_of(config, 2, 4):
        _, entry = lower(case)
        found = [i for i in entry.instructions if i.opcode in COLLECTIVES]
        if "comm" in case.static:
            assert len(found) == 1, case.label
            assert [list(g.replica_ids) for g in found[0].replica_groups] == [[0, 1]], case.label
        else:
            assert found == [], case.label


def test_a_plain_numpy_constant_operand_is_reported():
    """The tracer accepts a host array as a matmul operand but cannot lower it to HLO; the
    project's kernels promote such constants with ops.constant."""
    tri = np.tril(np.ones((4, 4), np.float32))

    def cumulative(x):
        return np.matmul(tri, x)

    def promoted(x):
        return np.matmul(ops.constant(tri), x)

    assert trace_case(Case("cumulative", cumulative, {"x": ((4,), F32)})).error is not None
    result = trace_case(Case("promoted", promoted, {"x": ((4,), F32)}))
    assert result.error is None
    assert result.ops["dot"] == 1 and result.ops["constant"] >= 1


def test_a_mutation_the_model_does_not_pass_as_state_is_reported(config):
    """An input written in place must be passed as state, or the device copy is never updated."""
    case = next(c for c in cases_of(config, 1, 1) if c.kernel.__name__ == "attention_full")
    undeclared = Case(case.label, case.kernel, case.arrays, case.static, state=())
    error = trace_case(undeclared).error
    assert error is not None and "cache_k" in error
