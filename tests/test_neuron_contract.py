"""Contract test of the Neuron backend against stand-in nkipy and spike modules.

nkipy and the Neuron compiler do not install here, so ``tests/fake_nkipy.py`` provides modules
that follow the API described in docs/nkipy.md §4 (``DeviceKernel.compile_and_load``, kernels
called with ``inputs=``/``outputs=`` dicts of DeviceTensors, ``.must_alias_input`` aliasing,
``output0``, ``DeviceTensor.from_numpy``/``.numpy``/``.write_from_numpy``) and run the kernels
with NumPy. The test checks how ``runtime.neuron`` uses that API — backend selection, compile
keys, placeholders, weight uploads, cache aliasing — and that the model gives the same logits
through it as on the CPU. It says nothing about the real compiler or hardware.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from pathlib import Path

import fake_nkipy
import numpy as np
import pytest

from loader import open_device
from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime import neuron
from runtime.backends import CpuBackend
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.softmax import softmax
from runtime.model import RankModel
from runtime.neuron import NeuronBackend, neuron_available, select_backend
from runtime.ranks import InProcessRanks

PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(24)]  # crosses the 17-key sliding window
DECODE = [5, 77, 901]
KERNELS = {
    "token_embedding",
    "rmsnorm",
    "attention_full",
    "attention_swa",
    "dense_mlp",
    "moe_block",
    "logits",
}


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("neuron-outs")
    out = {}
    for n in (1, 2):
        out[n] = root / f"out{n}"
        convert(LocalSource(tiny_ckpt), out[n], n, progress=False)
    return out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("MIMO_BACKEND", "NEURON_RT_VISIBLE_CORES", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MIMO_NEURON_BUILD_DIR", str(tmp_path / "build"))


def no_nkipy(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nkipy", None)  # import nkipy raises ModuleNotFoundError


def forward_steps(model) -> list[np.ndarray]:
    return [model.prefill(PROMPT)] + [model.decode(t) for t in DECODE]


# ----------------------------------------------------------------------------------- selection
def test_auto_is_cpu_without_nkipy(monkeypatch):
    no_nkipy(monkeypatch)
    assert not neuron_available()
    assert isinstance(select_backend("auto", 0, 1), CpuBackend)
    assert isinstance(select_backend("cpu", 0, 1), CpuBackend)


def test_auto_is_neuron_with_nkipy(monkeypatch, tmp_path):
    fake_nkipy.install(monkeypatch)
    assert neuron_available()
    backend = select_backend("auto", 0, 1, build_dir=tmp_path / "b")
    assert isinstance(backend, NeuronBackend) and backend.build_dir == tmp_path / "b"
    assert select_backend("auto", 0, 1).build_dir == tmp_path / "build"  # MIMO_NEURON_BUILD_DIR
    assert isinstance(select_backend("cpu", 0, 1), CpuBackend)
    monkeypatch.setenv("MIMO_BACKEND", "cpu")
    assert isinstance(select_backend("auto", 0, 1), CpuBackend)
    assert isinstance(select_backend("neuron", 0, 1), NeuronBackend)  # the explicit name wins
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        select_backend("gpu", 0, 1)


def test_auto_is_cpu_without_neuron_cores(monkeypatch):
    fake_nkipy.install(monkeypatch, cores=0)
    assert not neuron_available()
    assert isinstance(select_backend("auto", 0, 1), CpuBackend)


def test_ranks_sharing_a_process_stay_on_cpu(monkeypatch):
    """Several ranks need one process each (torchrun); threads in one process use the CPU."""
    fake_nkipy.install(monkeypatch)
    assert isinstance(select_backend("auto", 1, 2), CpuBackend)
    with pytest.raises(RuntimeError, match="one process per rank.*torchrun --nproc-per-node 2"):
        select_backend("neuron", 1, 2)


def _placeholder_nkipy(monkeypatch, tmp_path) -> None:
    """PyPI's 'nkipy': a package whose import raises ImportError."""
    (tmp_path / "nkipy").mkdir()
    (tmp_path / "nkipy" / "__init__.py").write_text("raise ImportError('WRONG PACKAGE')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("nkipy", "nkipy.core", "nkipy.core.compile"):
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]  # restored (removed) after the test


def _no_compiler(monkeypatch, tmp_path) -> None:
    """nkipy is there, but nkipy.core.compile's ``import neuronxcc`` fails."""
    fake_nkipy.install(monkeypatch)
    core = sys.modules["nkipy.core"]
    (tmp_path / "compile.py").write_text("from neuronxcc.driver import CommandDriver\n")
    monkeypatch.setattr(core, "__path__", [str(tmp_path)])
    monkeypatch.delattr(core, "compile")
    del sys.modules["nkipy.core.compile"]  # monkeypatch restores it
    monkeypatch.setitem(sys.modules, "neuronxcc", None)


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda mp, tmp: no_nkipy(mp), "nkipy is not installed"),
        (_placeholder_nkipy, "nkipy is not importable .*WRONG PACKAGE.*placeholder"),
        (_no_compiler, r"Neuron compiler \(neuronx-cc"),
        (lambda mp, tmp: fake_nkipy.install(mp, cores=0), "no NeuronCores are visible"),
    ],
)
def test_neuron_backend_when_unavailable_is_a_clear_error(monkeypatch, tmp_path, setup, reason):
    setup(monkeypatch, tmp_path)
    assert not neuron_available()
    with pytest.raises(RuntimeError, match=reason) as e:
        select_backend("neuron", 0, 1)
    assert "README section 'Running on Trainium: the Neuron backend'" in str(e.value)
    monkeypatch.setenv("MIMO_BACKEND", "neuron")  # forces the error instead of a fallback
    with pytest.raises(RuntimeError, match="MIMO_BACKEND=neuron"):
        select_backend("auto", 0, 1)


# ------------------------------------------------------------------------------- one rank
def weights_of(model: RankModel) -> list[np.ndarray]:
    """The loader's read-only memory maps the model passes to kernels."""
    ws = [model.embed, model.norm, model.lm_head]
    ws += [w for layer in model.layers for w in layer.weights.values()]
    ws = [w for w in ws if not w.flags.writeable]
    assert len({id(w) for w in ws}) == len(ws) > 3 * len(model.layers)
    return ws


def test_one_rank_through_neuron_backend(monkeypatch, outputs, tmp_path):
    log = fake_nkipy.install(monkeypatch)
    build = tmp_path / "b1"
    cpu = RankModel(open_device(outputs[1], 0), max_seq_len=32, backend=CpuBackend(exact=True))
    dev = RankModel(open_device(outputs[1], 0), max_seq_len=32, backend=NeuronBackend(0, 1, build))
    weights = weights_of(dev)

    # the same logits as the CPU backend, prompt and decode steps
    want = forward_steps(cpu)
    got = []
    uploads_per_step = []
    for fn in [lambda: dev.prefill(PROMPT)] + [(lambda t=t: dev.decode(t)) for t in DECODE]:
        before = len(log.uploads)
        got.append(fn())
        uploads_per_step.append(len(log.uploads) - before)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_array_equal(g, w)

    # one compile per distinct (kernel, shapes, static): the prompt's and the decode step's,
    # shared by every layer of a kind, none on later decode steps
    assert Counter(c["name"] for c in log.compiles) == {k: 2 for k in KERNELS}
    assert len(log.runs) == 4 * (1 + 2 * 7 + 7 + 7 + 1)  # steps x kernel calls per forward
    for c in log.compiles:
        assert c["build_dir"] == str(build)
        assert c["cc_enabled"] is None and c["rank_id"] is None and c["is_spmd"] is True
        assert c["mutated"] == {
            "attention_full": {"cache_k", "cache_v"},
            "attention_swa": {"ring_k", "ring_v", "ring_pos"},
        }.get(c["name"], set())
        # placeholders: fresh np.empty arrays, never the weights
        for a in c["arrays"].values():
            assert type(a) is np.ndarray and a.flags.owndata
            assert not any(np.shares_memory(a, w) for w in weights)
    first_swa = next(c for c in log.compiles if c["name"] == "attention_swa")
    layer1 = dev.layers[1]
    for name in ("qkv_w", "o_w", "sinks"):
        w, p = layer1.weights[name], first_swa["arrays"][name]
        assert (p.shape, p.dtype) == (w.shape, w.dtype)
    assert first_swa["arrays"]["x"].shape == (len(PROMPT), dev.cfg.hidden_size)
    assert first_swa["static"]["comm"] is dev.comm

    # every weight uploaded once, from the memory map itself; nothing else reads a weight's memory
    for w in weights:
        sources = [src for _, src, _ in log.uploads if src is w]
        assert len(sources) == 1 and np.shares_memory(sources[0], w)
    for _, src, _ in log.uploads:
        if not any(src is w for w in weights):
            assert not any(np.shares_memory(src, w) for w in weights)
    # a warm decode step allocates nothing: inputs are rewritten in place
    assert uploads_per_step[2:] == [0] * (len(DECODE) - 1) and log.writes > 0

    # caches: bound as <name>.must_alias_input and <name> to one device tensor per layer,
    # updated in place on the device across calls
    full = [r for r in log.runs if r["name"] == "attention_full"]
    assert len(full) == 2 * 4  # two full-attention layers, four steps
    for r in full:
        for k in ("cache_k", "cache_v"):
            assert r["inputs"][f"{k}.must_alias_input"] is r["outputs"][k]
    layer0 = [r["outputs"]["cache_k"] for r in full[::2]]
    assert all(t is layer0[0] for t in layer0) and layer0[0] is not full[1]["outputs"]["cache_k"]
    last = len(PROMPT) + len(DECODE) - 1  # position of the last token (also written)
    cache = layer0[0].data
    assert np.abs(cache[: last + 1]).max(axis=(1, 2)).min() > 0 and not cache[last + 1 :].any()
    assert not dev.layers[0].cache["cache_k"].any()  # the device holds the state, not the host
    swa = [r for r in log.runs if r["name"] == "attention_swa"]
    for r in swa:
        for k in ("ring_k", "ring_v", "ring_pos"):
            assert r["inputs"][f"{k}.must_alias_input"] is r["outputs"][k]
    ring_pos = swa[0]["outputs"]["ring_pos"].data  # layer 1's ring after the last step
    assert sorted(ring_pos) == list(range(last + 1 - len(ring_pos), last + 1))

    # reset: fresh caches are bound to fresh device tensors; nothing recompiles
    compiles = len(log.compiles)
    again = dev.prefill(PROMPT)
    np.testing.assert_array_equal(again, want[0])
    assert len(log.compiles) == compiles
    fresh = [r for r in log.runs if r["name"] == "attention_full"][-2]["outputs"]["cache_k"]
    assert fresh is not layer0[0]


# ------------------------------------------------------------------------------ two ranks
def test_two_ranks_in_process_through_neuron_backend(monkeypatch, outputs, tmp_path):
    log = fake_nkipy.install(monkeypatch)
    build = tmp_path / "b2"
    with InProcessRanks(
        outputs[2], max_seq_len=32, backend_factory=lambda r: CpuBackend(exact=True)
    ) as cpu:
        want = forward_steps(cpu)
    with InProcessRanks(
        outputs[2], max_seq_len=32, backend_factory=lambda r: NeuronBackend(r, 2, build)
    ) as dev:
        got = forward_steps(dev)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # each rank compiles each kernel once per token count, with collectives enabled
    assert Counter((c["name"], c["rank_id"]) for c in log.compiles) == {
        (k, r): 2 for k in KERNELS for r in (0, 1)
    }
    for c in log.compiles:
        assert c["cc_enabled"] is True and c["world_size"] == 2 and c["is_spmd"] is True


# ------------------------------------------------------------------------------ other kernels
def test_input_dtypes_and_kernels_without_rule(monkeypatch, tmp_path):
    log = fake_nkipy.install(monkeypatch)
    backend = NeuronBackend(0, 1, tmp_path)
    # float64 inputs are compiled and uploaded as float32, as nkipy's tracer downcasts them
    x = np.random.default_rng(1).standard_normal((3, 8))
    out = backend.call(rmsnorm, {"x": x, "weight": np.ones(8, np.float32)}, {"eps": 1e-5})
    assert out.dtype == np.float32 and log.compiles[-1]["arrays"]["x"].dtype == np.float32
    np.testing.assert_allclose(out, rmsnorm(x.astype(np.float32), np.ones(8, np.float32), 1e-5))
    with pytest.raises(NotImplementedError, match="no output rule for kernel softmax"):
        backend.call(softmax, {"x": x}, {})
    assert len(log.compiles) == 1


def accumulate(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    """A kernel with state: adds x to ``total`` in place, returns 2x."""
    total[:] = total + x
    return x * np.float32(2)


def test_state_lives_on_device_and_is_released_with_its_array(monkeypatch, tmp_path):
    log = fake_nkipy.install(monkeypatch)
    monkeypatch.setitem(neuron.OUTPUT_RULES, accumulate, lambda a, s: a["x"])
    backend = NeuronBackend(0, 1, tmp_path)
    total = np.zeros(4, np.float32)
    for i in range(3):
        x = np.full(4, i + 1, np.float32)
        np.testing.assert_array_equal(
            backend.call(accumulate, {"x": x, "total": total}, {}, ("total",)), 2 * x
        )
    device_total = log.runs[-1]["outputs"]["total"]
    assert all(r["inputs"]["total.must_alias_input"] is device_total for r in log.runs)
    np.testing.assert_array_equal(device_total.data, np.full(4, 6, np.float32))
    assert not total.any() and len(log.compiles) == 1
    log.uploads.clear()
    del total
    gc.collect()
    assert not backend._bound  # the device copy goes with the host array
