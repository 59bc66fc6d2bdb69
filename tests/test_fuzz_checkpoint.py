"""Hostile checkpoints at random: every run ends verified or in a one-line exit-2 error.

A fixed-seed sequence of mutations of a tiny checkpoint's config and safetensors headers (keys
dropped, values retyped or made huge, NaN, header bytes flipped, shapes, dtypes and offsets
edited). Each mutated checkpoint is converted through the command line in-process: the run must
either finish with an output that ``mimo-manifest verify`` accepts, or exit 2 with a single
``mimo-shard: error:`` line, leaving no ``manifest.json`` and no traceback.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from loader.cli import main as manifest_main
from pipeline.cli import main as shard_main

SEED = 11
MUTATIONS = 36
ODD_VALUES = [None, -1, 0, 1, 2**63, 1e300, "x", [], {}, True, float("nan"), 3.5, [1, 2]]


def mutate_config(ckpt: Path, rng: random.Random) -> str:
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    key = rng.choice(sorted(cfg))
    if rng.random() < 0.3:
        del cfg[key]
        what = f"config: drop {key}"
    else:
        cfg[key] = rng.choice(ODD_VALUES)
        what = f"config: {key} = {cfg[key]!r}"
    p.write_text(json.dumps(cfg))  # NaN is written as the NaN literal, as Python does
    return what


def mutate_header(ckpt: Path, rng: random.Random) -> str:
    f = rng.choice(sorted(ckpt.glob("model_*.safetensors")))
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    kind = rng.choice(["flip", "shape", "dtype", "offsets", "length"])
    if kind == "flip":
        i = rng.randrange(8, 8 + n)
        data[i] = rng.randrange(256)
    elif kind == "length":
        data[:8] = (n + rng.choice([-9, -1, 1, 64, 1 << 40])).to_bytes(8, "little", signed=True)
    else:
        header = json.loads(data[8 : 8 + n])
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        t = header[name]
        if kind == "shape":
            t["shape"] = rng.choice([[], [0], [1 << 40, 1 << 40], [-1], t["shape"][::-1]])
        elif kind == "dtype":
            t["dtype"] = rng.choice(["F16", "I64", "F8_E5M2", "BOOL", "??"])
        else:
            a, b = t["data_offsets"]
            t["data_offsets"] = rng.choice([[a, b + 1], [a + 1, b], [0, b - a], [b, a]])
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = bytearray(len(raw).to_bytes(8, "little")) + raw + data[8 + n :]
    f.write_bytes(bytes(data))
    return f"{f.name}: {kind}"


@pytest.fixture(scope="module")
def cases(tiny_ckpt, tmp_path_factory) -> list[tuple[str, Path]]:
    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for i in range(MUTATIONS):
        ckpt = root / f"ckpt{i}"
        shutil.copytree(tiny_ckpt, ckpt)
        what = (mutate_config if rng.random() < 0.4 else mutate_header)(ckpt, rng)
        out.append((what, ckpt))
    return out


def test_every_mutated_checkpoint_converts_verified_or_fails_in_one_line(cases, tmp_path):
    outcomes = {"converted": 0, "refused": 0}
    for i, (what, ckpt) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = CliRunner().invoke(shard_main, [str(ckpt), str(out), "--devices", "2", "-q", "-j", "1"])
        text = r.output
        assert r.exit_code in (0, 2), (what, r.exit_code, text, r.exception)
        assert "Traceback" not in text, (what, text)
        if r.exit_code == 0:
            v = CliRunner().invoke(manifest_main, ["verify", str(out)])
            assert v.exit_code == 0, (what, v.output)
            outcomes["converted"] += 1
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("mimo-shard: error: "), (what, text)
            assert not (out / "manifest.json").exists(), what
            outcomes["refused"] += 1
    assert outcomes["refused"] >= MUTATIONS // 2  # the mutations do bite
