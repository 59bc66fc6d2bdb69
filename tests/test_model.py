"""The runtime against transformers' MiMoV2FlashForCausalLM: logits, decode, world sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loader import open_device
from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime.model import RankModel, SequenceTooLong
from runtime.ranks import InProcessRanks
from tests.oracle import load_transformers_model
from tests.oracle import logits as oracle_logits

PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(40)]  # 40 tokens; the window is 17 keys


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("model-outs")
    out = {}
    for n in (1, 2, 4, 8):
        out[n] = root / f"out{n}"
        convert(LocalSource(tiny_ckpt), out[n], n, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> np.ndarray:
    model = load_transformers_model(tiny_ckpt)
    return oracle_logits(model, PROMPT)


def run(out: Path, fn, max_seq_len: int = 64):
    with InProcessRanks(out, max_seq_len=max_seq_len) as model:
        return fn(model)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_setting_is_meaningful(tiny_ckpt, outputs):
    dev = open_device(outputs[1], 0)
    kinds = {dev.config.layer(i).attention for i in dev.layers}
    assert kinds == {"full", "sliding"}
    assert len(PROMPT) > dev.config.sliding_window


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_prompt_logits_equal_transformers(outputs, reference, devices):
    got = run(outputs[devices], lambda m: m.prefill(PROMPT))
    assert got.shape == reference.shape and got.dtype == np.float32
    assert rel(got, reference) < 1e-3
    # and the argmax agrees everywhere
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_world_size_invariance(outputs):
    logits = {n: run(outputs[n], lambda m: m.prefill(PROMPT)) for n in (1, 2, 4, 8)}
    for n in (2, 4, 8):
        assert rel(logits[n], logits[1]) < 1e-5, n


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("split", [5, 16, 17, 30])
def test_prefill_then_decode_equals_one_prefill(outputs, devices, split):
    """Across the sliding-window boundary (17 keys): decode extends the caches correctly."""

    def go(m):
        full = m.prefill(PROMPT)
        steps = [m.prefill(PROMPT[:split])[-1]]
        steps += [m.decode(t) for t in PROMPT[split:-1]]
        return full, np.stack(steps)

    full, steps = run(outputs[devices], go)
    assert rel(steps, full[split - 1 : -1]) < 1e-5


def test_single_rank_model_without_threads(outputs, reference):
    model = RankModel(open_device(outputs[1], 0), max_seq_len=64)
    assert rel(model.prefill(PROMPT), reference) < 1e-3
    assert model.position == len(PROMPT)


def test_expert_subset_restricts_routing(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, experts="0-7", progress=False)
    tf = load_transformers_model(tiny_ckpt, experts=list(range(8)))
    want = oracle_logits(tf, PROMPT)
    with InProcessRanks(out, max_seq_len=64) as m:
        got = m.prefill(PROMPT)
        assert any("restricted to the 8 converted experts of 16" in n for n in m.notices)
    assert rel(got, want) < 1e-3


def test_layer_subset_runs_those_layers(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 2, layers="0-3", progress=False)
    import json

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in tiny_ckpt.glob("*.safetensors"):
        (cut / f.name).symlink_to(f)
    cfg.update(
        num_hidden_layers=4,
        hybrid_layer_pattern=cfg["hybrid_layer_pattern"][:4],
        moe_layer_freq=cfg["moe_layer_freq"][:4],
    )
    (cut / "config.json").write_text(json.dumps(cfg))
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4
    }
    (cut / "model.safetensors.index.json").write_text(json.dumps(index))
    want = oracle_logits(load_transformers_model(cut), PROMPT)
    got = run(out, lambda m: m.prefill(PROMPT))
    assert rel(got, want) < 1e-3


def test_bad_sequences_are_refused(outputs):
    model = RankModel(open_device(outputs[1], 0), max_seq_len=32)
    with pytest.raises(ValueError, match="token id 1024 is outside the vocabulary"):
        model.prefill([1, 2, 1024])
    with pytest.raises(SequenceTooLong, match="exceeds max_seq_len 32"):
        model.prefill(list(range(1, 34)))
    model.prefill(list(range(1, 33)))
    with pytest.raises(SequenceTooLong):
        model.decode(5)


def test_a_failing_rank_does_not_hang_the_others(outputs):
    with InProcessRanks(outputs[4], max_seq_len=8) as m, pytest.raises(SequenceTooLong):
        m.prefill(list(range(1, 10)))


@pytest.mark.parametrize("devices", [1, 4])
def test_device_kernels_verbatim_equal_the_cpu_variant(outputs, reference, devices):
    """CpuBackend(exact=True) runs the dense device moe_block; the default runs routed experts."""
    from runtime.backends import CpuBackend

    with InProcessRanks(
        outputs[devices], max_seq_len=64, backend_factory=lambda r: CpuBackend(exact=True)
    ) as m:
        exact = m.prefill(PROMPT)
        exact_decode = m.decode(5)
    routed, routed_decode = run(outputs[devices], lambda m: (m.prefill(PROMPT), m.decode(5)))
    assert rel(exact, reference) < 1e-3
    assert rel(exact, routed) < 1e-5 and rel(exact_decode, routed_decode) < 1e-5
