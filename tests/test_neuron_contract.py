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
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fake_nkipy
import numpy as np
import pytest

from loader import open_device
from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime import neuron
from runtime.backends import BF16, CpuBackend
from runtime.comm import ThreadGroup
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.sampling import greedy, sample
from runtime.kernels.softmax import softmax
from runtime.model import RankModel
from runtime.neuron import NeuronBackend, neuron_available, select_backend
from runtime.ranks import InProcessRanks
from runtime.resident import ResidentModel

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


# ------------------------------------------------------------------- the fused device path
STEP_INPUTS = 2  # per decode step, beyond the per-layer-kind tables: token id and position


def resident(out: Path, rank: int, comm, build: Path, max_seq_len: int = 32, **kw):
    """Rank ``rank``'s model of ``out`` on the fused device path of a NeuronBackend."""
    model = RankModel(open_device(out, rank), comm, max_seq_len=max_seq_len)
    return ResidentModel(model, NeuronBackend(rank, model.comm.world_size, build), **kw)


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def run_ranks(models, fn):
    """``fn(model)`` on every rank at once (threads), results in rank order."""
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(fn, models))


# bf16 activations and caches against the float32 CPU path, tiny preset (measured: prompt
# logits 3.0e-3 of the logit scale, decode steps 2.2e-3 .. 6.2e-2; over 36 random steps the
# median was 5e-3 and the worst 0.18, when a near-tie between two experts' router scores flips
# under bf16 rounding). Prompt logits are bounded at 1e-2, decode steps at 0.1, and the greedy
# tokens must agree.
PROMPT_TOL, DECODE_TOL = 1e-2, 0.1


@pytest.mark.parametrize("world", [1, 2])
def test_fused_device_path_matches_cpu(monkeypatch, outputs, tmp_path, world):
    log = fake_nkipy.install(monkeypatch)
    if world == 1:
        cpu = [
            RankModel(open_device(outputs[1], 0), max_seq_len=32, backend=CpuBackend(exact=True))
        ]
        want = forward_steps(cpu[0])
        comms = [None]
    else:
        with InProcessRanks(
            outputs[2], max_seq_len=32, backend_factory=lambda r: CpuBackend(exact=True)
        ) as ranks:
            want = forward_steps(ranks)
        comms = ThreadGroup.create(2)
    models = run_ranks(
        list(range(world)),
        lambda r: resident(outputs[world], r, comms[r], tmp_path / "b"),
    )
    got = run_ranks(models, forward_steps)
    for rank_steps in got:
        assert relative(rank_steps[0], want[0]) < PROMPT_TOL
        for g, w in zip(rank_steps[1:], want[1:], strict=True):
            assert g.dtype == np.float32 and g.shape == w.shape
            assert relative(g, w) < DECODE_TOL
        assert [int(s.argmax(-1).ravel()[-1]) for s in rank_steps] == [
            int(s.argmax(-1).ravel()[-1]) for s in want
        ]
    # KV caches are bf16 device tensors, bound in place
    full = [r for r in log.runs if r["name"] == "layer_full_moe"]
    assert full and all(
        r["inputs"]["cache_k.must_alias_input"] is r["outputs"]["cache_k"]
        and r["outputs"]["cache_k"].dtype == BF16
        for r in full
    )
    if world == 2:
        assert {c["world_size"] for c in log.compiles} == {2}


def test_no_copies_between_layers(monkeypatch, outputs, tmp_path):
    """A decode step uploads its few step inputs once, chains every kernel on device tensors,
    and reads back only the gathered logits, or with pick() only the token id."""
    log = fake_nkipy.install(monkeypatch)
    model = resident(outputs[1], 0, None, tmp_path / "b")
    model.prefill(PROMPT)
    model.decode(DECODE[0])  # warm: buffers exist
    layers = len(model.layers)
    kinds = {(layer.rope, layer.ring) for layer in model.layers}
    ropes = {layer.rope for layer in model.layers}
    rings = {layer.ring for layer in model.layers} - {None}
    per_step = STEP_INPUTS + 2 * len(ropes) + 2 + 3 * len(rings)  # + cos/sin, write/keep, ring
    for token in DECODE[1:]:
        start = len(log.events)
        model.decode(token)
        events = log.events[start:]
        runs = [i for i, (kind, _) in enumerate(events) if kind == "run"]
        assert len(runs) == layers + 2  # embedding, one per layer, logits
        assert all(kind == "run" for kind, _ in events[runs[0] : runs[-1] + 1])
        before, after = events[: runs[0]], events[runs[-1] + 1 :]
        assert [k for k, _ in before] == ["write"] * per_step and len(kinds) >= 1
        assert after == [("read", "logits")]
    start = len(log.events)
    model.feed([DECODE[0]])
    token = model.pick()  # greedy on the device
    events = log.events[start:]
    assert [k for k, _ in events if k == "read"] == ["read"]  # the token id only
    assert ("upload", "logits") not in events and 0 <= token < model.cfg.vocab_size


def test_pick_on_device_equals_host_choice(monkeypatch, outputs, tmp_path):
    fake_nkipy.install(monkeypatch)
    model = resident(outputs[1], 0, None, tmp_path / "b")
    logits = model.prefill(PROMPT)
    assert model.pick() == int(greedy(logits[-1]))
    for u in (0.05, 0.5, 0.95):
        want = sample(logits[-1], np.float32(u), temperature=0.8, top_k=50, top_p=0.9)
        assert model.pick(0.8, 50, 0.9, u) == int(want)


def test_prompt_buckets_bound_the_compiled_kernels(monkeypatch, outputs, tmp_path):
    """Prompts of 5, 37 and 300 tokens (max_seq_len 512) compile one kernel set per bucket used
    (16, 64, 512) plus decode; a fourth new length in a used bucket compiles nothing."""
    log = fake_nkipy.install(monkeypatch)
    model = resident(outputs[1], 0, None, tmp_path / "b", max_seq_len=512)
    kinds = len({layer.kernel for layer in model.layers}) + 2  # layers, embedding, logits
    rng = np.random.default_rng(3)
    for length in (5, 37, 300):
        model.prefill(rng.integers(1, 1000, length).tolist())
        model.decode(7)
    assert model.backend.compiled == len(log.compiles) == 4 * kinds  # 3 buckets + decode
    model.prefill(rng.integers(1, 1000, 45).tolist())  # bucket 64 again
    model.decode(7)
    assert model.backend.compiled == len(log.compiles) == 4 * kinds


def test_greedy_output_does_not_depend_on_the_bucket(monkeypatch, outputs, tmp_path):
    """The same prompt through buckets of 16..32 (exact fit, padding, chunks) gives the same
    greedy tokens, and logits within bf16 rounding (measured 2.5e-3 of the logit scale)."""
    fake_nkipy.install(monkeypatch)
    prompt = PROMPT[:21]

    def greedy_run(sizes):
        model = resident(outputs[1], 0, None, tmp_path / "b", sizes=sizes)
        logits = model.prefill(prompt)
        tokens = [int(logits[-1].argmax())]
        for _ in range(5):
            tokens.append(int(model.decode(tokens[-1]).argmax()))
        return logits, tokens

    base_logits, base = greedy_run((21,))  # no padding
    for sizes in [(32,), (16, 32), (8,), (16,)]:  # padded; chunks of 8 or 16
        logits, tokens = greedy_run(sizes)
        assert tokens == base, sizes
        assert relative(logits, base_logits) < 1e-2  # bf16 rounding of other row groupings


def test_mimo_run_neuron_generates_resident_and_samples_on_device(monkeypatch, outputs):
    """``mimo-run --backend neuron`` on one rank: the resident model, device sampling, and the
    same greedy tokens as the CPU backend."""
    from click.testing import CliRunner

    from runtime.cli import main

    args = [str(outputs[1]), "--input-ids", "5,6,7,8,9", "--max-new-tokens", "6", "--json"]
    cpu = CliRunner().invoke(main, args + ["--backend", "cpu"])
    assert cpu.exit_code == 0, cpu.output
    log = fake_nkipy.install(monkeypatch)
    dev = CliRunner().invoke(main, args + ["--backend", "neuron"])
    assert dev.exit_code == 0, dev.output
    want, got = (json.loads(r.output.strip().splitlines()[-1]) for r in (cpu, dev))
    assert got["output_ids"] == want["output_ids"]
    assert any("next_token" in str(e) for e in log.events)  # chosen on the device
    assert set(log.compiler_args) == {"--lnc 2"}  # compiled for the runtime's LNC


def test_mimo_run_refuses_a_placement_that_does_not_fit(monkeypatch, outputs):
    from click.testing import CliRunner

    from mimo import hbm
    from runtime.cli import main

    fake_nkipy.install(monkeypatch)
    monkeypatch.setattr(hbm, "capacity", lambda lnc: 1 << 20)  # a 1 MiB core
    r = CliRunner().invoke(
        main, [str(outputs[1]), "--input-ids", "5,6,7", "--backend", "neuron", "--lnc", "1"]
    )
    assert r.exit_code == 2
    assert "does not fit in HBM" in r.output and "--lnc 2" in r.output
    assert "Traceback" not in r.output


def test_mimo_run_plan_prints_the_hbm_plan(outputs):
    from click.testing import CliRunner

    from runtime.cli import main

    r = CliRunner().invoke(main, [str(outputs[2]), "--plan", "--max-seq-len", "512", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)["hbm"]
    assert p["fits"] is True and p["capacity_bytes"] == 24 << 30
    assert p["per_rank_bytes"] > p["breakdown"]["weights (device store)"] > 0
    text = CliRunner().invoke(main, [str(outputs[2]), "--plan", "--lnc", "1"])
    assert text.exit_code == 0 and "lnc 1" in text.output and "fits" in text.output
