"""Expert placement: routing statistics, balanced maps with replicas, and replicas at run time."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import loader.cli
import runtime.cli
from mimo import routing
from mimo.config import MOE, MiMoConfig
from mimo.layout import contiguous_expert_map
from pipeline.cli import main as shard_main
from pipeline.convert import convert
from pipeline.placement import place, plan_experts
from pipeline.source import LocalSource
from runtime.backends import CpuBackend
from runtime.comm import ThreadGroup
from runtime.kernels import decoder
from runtime.kernels.moe_block import replica_owner
from runtime.ranks import InProcessRanks
from tests.oracle import load_transformers_model
from tests.oracle import logits as oracle_logits

PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(40)]


def skewed_stats(cfg: MiMoConfig, seed: int = 0) -> dict:
    """Zipf-like loads with the hottest experts packed together (the worst case for blocks)."""
    stats = routing.empty(cfg, range(cfg.num_hidden_layers))
    rng = np.random.default_rng(seed)
    e = cfg.n_routed_experts
    for row in stats["layers"].values():
        load = np.sort(rng.zipf(1.6, e).clip(max=500))[::-1] + 1
        row["tokens"] = [int(x) for x in load]
        row["weight"] = [float(x) * 0.4 for x in load]
    return stats


@pytest.fixture(scope="module")
def cfg(tiny_ckpt) -> MiMoConfig:
    return MiMoConfig.from_file(tiny_ckpt / "config.json")


def check_map(blocks: list[list[int]], experts: int, devices: int, slots: int) -> None:
    assert len(blocks) == devices
    assert {len(b) for b in blocks} == {slots}
    assert set(x for b in blocks for x in b) == set(range(experts))


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_placement_lowers_max_over_mean_load(cfg, devices):
    stats = skewed_stats(cfg)
    doc, report = plan_experts(stats, devices, 0)
    for layer, before, after in report:
        check_map(doc["layers"][str(layer)], 16, devices, 16 // devices)
        load = stats["layers"][str(layer)]["tokens"]
        bound = max(1.0, max(load) / (sum(load) / devices))  # no placement does better
        assert after < before
        assert after <= 4 / 3 * bound  # within greedy LPT's factor of the best
    with_replicas, report_r = plan_experts(stats, devices, 1)
    for (layer, _, after), (_, _, after_r) in zip(report, report_r, strict=True):
        check_map(with_replicas["layers"][str(layer)], 16, devices, 16 // devices + 1)
        assert after_r <= after + 1e-9


def test_replicas_go_to_the_hottest_expert_and_share_its_load():
    load = [1000.0] + [10.0] * 7
    blocks = place(load, 4, 1)  # 12 slots: expert 0 on every rank, one more for another
    assert [b.count(0) for b in blocks] == [1, 1, 1, 1]
    assert sum(map(len, blocks)) == 12 and len({x for b in blocks for x in b}) == 8
    loads = routing.rank_loads(blocks, load)
    assert max(loads) / (sum(loads) / 4) < 1.1
    assert routing.imbalance(contiguous_expert_map(list(range(8)), 4), load) > 3


def test_plan_experts_command_and_expert_map_option(tiny_ckpt, cfg, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(skewed_stats(cfg)))
    emap = tmp_path / "map.json"
    res = CliRunner().invoke(
        shard_main, ["plan-experts", str(stats), "--devices", "4", "--replicas", "1", "-o", emap]
    )
    assert res.exit_code == 0, res.output
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.mlp_types[i] == MOE]
    lines = [x.split() for x in res.output.splitlines()[1 : 1 + len(moe)]]
    assert [int(x[0]) for x in lines] == moe
    assert all(float(after) < float(before) for _, before, after in lines)
    doc = json.loads(emap.read_text())
    assert doc["format"] == "mimo-shard/expert-map" and doc["devices"] == 4

    out = tmp_path / "out"
    res = CliRunner().invoke(
        shard_main, [str(tiny_ckpt), str(out), "-n", "4", "--expert-map", str(emap), "-q"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["layout"]["expert_map"] == doc["layers"]
    assert len(m["options"]["expert_map_sha256"]) == 64
    shape = next(
        a["shape"]
        for a in json.loads((out / "manifest.d" / "device-000.json").read_text())["arrays"]
        if a["path"] == f"layers/{moe[0]}/experts/gate_up"
    )
    assert shape[0] == 5  # 16/4 + 1 slots
    # another map is another output: resuming into OUT is refused
    doc["layers"][str(moe[0])] = contiguous_expert_map(list(range(16)), 4)
    for b in doc["layers"][str(moe[0])]:
        b.append(b[0])
    emap.write_text(json.dumps(doc))
    res = CliRunner().invoke(
        shard_main, [str(tiny_ckpt), str(out), "-n", "4", "--expert-map", str(emap), "-q"]
    )
    assert res.exit_code == 2 and "other options" in res.output


def _map(devices: int, layers: dict) -> dict:
    return {"format": "mimo-shard/expert-map", "version": 1, "devices": devices, "experts": 16,
            "layers": layers}


GOOD = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
BAD_MAPS = {
    "devices": (_map(4, {"1": GOOD}), "a map for 4 devices, not --devices 2"),
    "unequal": (_map(2, {"1": [GOOD[0] + [8], GOOD[1]]}), "slots; must be equal"),
    "range": (_map(2, {"1": [GOOD[0], GOOD[1][:-1] + [16]]}), "expert id 16 out of range"),
    "missing": (_map(2, {"1": [GOOD[0], GOOD[1][:-1] + [0]]}), "expert 15 has no slot"),
    "dense": (_map(2, {"0": GOOD}), "layer 0 is not a MoE layer"),
    "layer": (_map(2, {"99": GOOD}), "layer '99' is not a layer"),
    "format": ({"layers": {}}, "not an expert map"),
    "ranks": (_map(2, {"1": [GOOD[0]]}), "1 ranks, not 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPS))
def test_invalid_expert_maps_are_refused_by_name(tiny_ckpt, tmp_path, case):
    doc, why = BAD_MAPS[case]
    emap = tmp_path / f"{case}.json"
    emap.write_text(json.dumps(doc))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        shard_main, [str(tiny_ckpt), str(out), "-n", "2", "--expert-map", str(emap), "-q"]
    )
    assert res.exit_code == 2, res.output
    (line,) = res.output.strip().splitlines()
    assert str(emap) in line and why in line, line
    assert not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------- runtime
def replicating_map(devices: int) -> dict:
    """Shuffled experts, and experts 3 and 9 in one more slot on every rank (16/N + 2 slots per
    rank; N + 1 replicas each, two on one rank where the shuffle put it there already)."""
    rng = np.random.default_rng(devices)
    order = [int(x) for x in rng.permutation(16)]
    per = 16 // devices
    blocks = [order[r * per : (r + 1) * per] + [3, 9] for r in range(devices)]
    return _map(devices, {"1": blocks, "2": blocks[::-1], "6": blocks})


@pytest.mark.parametrize("given", ["source", "config"])
def test_dry_run_with_an_expert_map_plans_what_the_conversion_writes(tiny_ckpt, tmp_path, given):
    """The dry run of a replicating map reports the bytes and arrays the conversion with that map
    writes, from SOURCE or from --config alone; more per device than the contiguous plan."""
    emap = tmp_path / "map.json"
    emap.write_text(json.dumps(replicating_map(4)))
    where = [str(tiny_ckpt)] if given == "source" else ["--config", str(tiny_ckpt / "config.json")]

    def dry_run(*extra: str) -> dict:
        res = CliRunner().invoke(shard_main, [*where, "-n", "4", "--dry-run", "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    planned, contiguous = dry_run("--expert-map", str(emap)), dry_run()
    out = tmp_path / "out"
    res = CliRunner().invoke(
        shard_main, [str(tiny_ckpt), str(out), "-n", "4", "--expert-map", str(emap), "-q"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    devices = [v["bytes"] for k, v in m["stores"].items() if k != "shared"]
    assert planned["bytes"]["per_device_max"] == max(devices)
    assert planned["bytes"]["total"] == m["totals"]["bytes"]
    assert planned["arrays"] == m["totals"]["arrays"]
    assert planned["bytes"]["per_device_max"] > contiguous["bytes"]["per_device_max"]
    assert planned["options"]["expert_map_sha256"] == m["options"]["expert_map_sha256"]


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> np.ndarray:
    return oracle_logits(load_transformers_model(tiny_ckpt), PROMPT)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_logits_with_replicated_shuffled_experts_equal_transformers(
    tiny_ckpt, tmp_path, reference, devices
):
    emap = tmp_path / "map.json"
    emap.write_text(json.dumps(replicating_map(devices)))
    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, devices, progress=False, expert_map=emap)
    m = json.loads((out / "manifest.json").read_text())
    assert m["layout"]["expert_map"]["1"] == replicating_map(devices)["layers"]["1"]
    for exact in (False, True):  # routed CPU kernel, and the dense device kernel
        with InProcessRanks(
            out, max_seq_len=64, backend_factory=lambda r, exact=exact: CpuBackend(exact)
        ) as model:
            got = model.prefill(PROMPT)
        rel = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert rel < 1e-3, (exact, rel)
        assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_fused_moe_kernel_computes_each_token_once_over_replicas():
    rng = np.random.default_rng(1)
    tokens, h, inter, experts, world = 7, 16, 8, 4, 2
    x = rng.standard_normal((tokens, h)).astype(np.float32)
    router = {
        "router_w": rng.standard_normal((h, experts)).astype(np.float32),
        "choice_bias": np.zeros(experts, np.float32),
    }
    gu = (rng.standard_normal((experts, h, 2 * inter)) * 0.3).astype(np.float32)
    dn = (rng.standard_normal((experts, inter, h)) * 0.3).astype(np.float32)
    static = {"top_k": 2, "norm_topk": True, "scaling": 1.0, "dtype": np.float32}
    (one,) = ThreadGroup.create(1)
    ids = np.arange(experts, dtype=np.uint32)
    want = decoder.moe_mlp(x, **router, expert_ids=ids, gate_up=gu, down=dn, comm=one, **static)
    blocks = [[0, 1, 2], [2, 3, 2]]  # expert 2: replica 0 on rank 0, replicas 1 and 2 on rank 1
    rep = {0: ([0, 0, 0], [1, 1, 3]), 1: ([1, 0, 2], [3, 1, 3])}
    comms = ThreadGroup.create(world)
    got = [None] * world

    def rank(r, positions):
        sl = np.asarray(blocks[r])
        got[r] = decoder.moe_mlp(
            x, **router, expert_ids=sl.astype(np.uint32), gate_up=gu[sl], down=dn[sl],
            comm=comms[r], replica_index=np.asarray(rep[r][0], np.uint32),
            replica_count=np.asarray(rep[r][1], np.uint32), positions=positions, **static,
        )

    for positions in (None, np.arange(100, 100 + tokens, dtype=np.int32)):
        threads = [threading.Thread(target=rank, args=(r, positions)) for r in range(world)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def test_single_token_steps_go_round_the_replicas():
    """Replicas split tokens by absolute position: decode steps (one token a call) at
    positions 0..5 of an expert with 3 replicas use each replica twice."""
    index, count = np.asarray([0, 1, 2], np.uint32), np.asarray([3, 3, 3], np.uint32)
    owners = [
        int(np.flatnonzero(replica_owner(np.asarray([p], np.int32), index, count)[0])[0])
        for p in range(6)
    ]
    assert owners == [0, 1, 2, 0, 1, 2]
    block = replica_owner(np.arange(7, 13, dtype=np.int32), index, count)  # a prompt at 7..12
    assert block.sum(axis=1).tolist() == [1] * 6  # each token computed by exactly one replica


# ------------------------------------------------------------------------- routing statistics
@pytest.fixture(scope="module")
def out2(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("placement") / "out2"
    convert(LocalSource(tiny_ckpt), out, 2, progress=False)
    return out


def test_record_routing_counts_every_token_and_merges(out2, cfg, tmp_path):
    stats = tmp_path / "stats.json"
    args = [str(out2), "--all-ranks", "--record-routing", str(stats), "--quiet"]
    args += ["--input-ids", "1,2,3,4,5", "--max-new-tokens", "3"]  # 5 + 2 routed tokens
    res = CliRunner().invoke(runtime.cli.main, args)
    assert res.exit_code == 0, res.output
    first = json.loads(stats.read_text())
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.mlp_types[i] == MOE]
    assert sorted(map(int, first["layers"])) == moe and first["tokens"] == 7
    for row in first["layers"].values():
        assert sum(row["tokens"]) == 7 * cfg.num_experts_per_tok
        assert sum(row["weight"]) == pytest.approx(7 * cfg.routed_scaling_factor, rel=1e-4)
    res = CliRunner().invoke(runtime.cli.main, args)  # a second run adds to the file
    assert res.exit_code == 0, res.output
    second = json.loads(stats.read_text())
    for key, row in second["layers"].items():
        assert row["tokens"] == [2 * x for x in first["layers"][key]["tokens"]]
    stats.write_text(json.dumps(dict(second, model={**second["model"], "hidden_size": 64})))
    res = CliRunner().invoke(runtime.cli.main, args)
    assert res.exit_code == 2
    assert str(stats) in res.output and "another model" in res.output


def test_prompt_file_prefills_each_line(out2, cfg, tmp_path):
    prompts = tmp_path / "corpus.txt"
    prompts.write_text("hello world\n\nthe cat sat\n")
    stats = tmp_path / "stats.json"
    res = CliRunner().invoke(
        runtime.cli.main,
        [str(out2), "--all-ranks", "--prompt-file", str(prompts), "--record-routing", str(stats)],
    )
    assert res.exit_code == 0, res.output
    s = json.loads(stats.read_text())
    assert s["prompts"] == 2 and s["tokens"] > 2
    for row in s["layers"].values():
        assert sum(row["tokens"]) == s["tokens"] * cfg.num_experts_per_tok


def test_manifest_experts_shows_placement_and_loads(out2, cfg, tmp_path):
    res = CliRunner().invoke(loader.cli.main, ["experts", str(out2)])
    assert res.exit_code == 0, res.output
    assert "layer 1\n  rank   0: 0-7\n  rank   1: 8-15" in res.output
    stats = skewed_stats(cfg)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    res = CliRunner().invoke(loader.cli.main, ["experts", str(out2), "--stats", str(path)])
    assert res.exit_code == 0, res.output
    load = stats["layers"]["1"]["tokens"]
    want = max(sum(load[:8]), sum(load[8:])) / (sum(load) / 2)
    assert f"layer 1: load max/mean {want:.3f}" in res.output
    assert f"rank   0: 0-7  (load {sum(load[:8])})" in res.output


def test_manifest_experts_png(out2, cfg, tmp_path):
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(skewed_stats(cfg)))
    png = tmp_path / "load.png"
    res = CliRunner().invoke(
        loader.cli.main, ["experts", str(out2), "--stats", str(path), "--png", str(png)]
    )
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
