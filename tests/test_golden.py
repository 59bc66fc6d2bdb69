"""Golden outputs: conversions keep writing the same bytes as the recorded ones.

``tests/golden/outputs.json`` records, for synthetic checkpoints (seed 0) converted with given
options, every output array's store, path, shape, dtype and checksum (CRC32 of its chunk file),
and the sha256 of each checkpoint. Here every tiny combination and one small one (``small/2``)
are converted again in-process and compared array by array, both the manifest records and the
chunk files read back; ``python bench/same_outputs.py`` checks every combination through the CLI.

The file changes only on purpose. When a change of output is intended, regenerate it from the
changed tree and commit it with the change (the script prints how many arrays changed per
combination)::

    python bench/same_outputs.py --regenerate
"""

from __future__ import annotations

import json
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from bench.same_outputs import (
    COMBOS,
    FIELDS,
    GOLDEN,
    arrays_sha256,
    checkpoint_sha256,
    combo_key,
    differences,
    load_golden,
    normalise,
)
from pipeline.convert import convert
from pipeline.source import LocalSource
from pipeline.synth import preset_config, write_checkpoint

DOC = load_golden()
TINY = [k for k, c in DOC["combos"].items() if c["preset"] == "tiny"]
SMALL = "small/2"
SHOWN = 5  # differing arrays named in a failure message


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """The small preset (8 layers, 32 experts, about 450 MB), seed 0."""
    return write_checkpoint(
        tmp_path_factory.mktemp("small"), preset_config("small"), seed=DOC["seed"], progress=False
    )


@cache
def _checkpoint_sha256(ckpt: Path) -> str:
    return checkpoint_sha256(ckpt)


def output_arrays(out: Path) -> list[dict[str, Any]]:
    """The golden fields of every array record in ``out``'s array tables, sorted."""
    manifest = json.loads((out / "manifest.json").read_text())
    records = []
    for entry in manifest["stores"].values():
        records += json.loads((out / entry["table"]).read_text())["arrays"]
    return normalise(records)


def chunk_checksum(out: Path, rec: dict[str, Any]) -> str:
    """``crc32:xxxxxxxx`` of the array's single chunk file, read back from disk."""
    chunk = out / f"{rec['store']}.zarr" / rec["path"] / "/".join(["c"] + ["0"] * len(rec["shape"]))
    crc = 0
    with open(chunk, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


def failure(key: str, what: str, diff: list[str]) -> str:
    shown = "\n  ".join(diff[:SHOWN])
    more = f"\n  ... and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    return (
        f"{key}: {len(diff)} arrays {what} {GOLDEN.name}; first:\n  {shown}{more}\n"
        "(if the change is intended: python bench/same_outputs.py --regenerate)"
    )


def assert_golden(ckpt: Path, key: str, out: Path) -> None:
    """Convert ``ckpt`` with combination ``key``'s options; its arrays must equal the golden."""
    combo = DOC["combos"][key]
    assert _checkpoint_sha256(ckpt) == DOC["checkpoints"][combo["preset"]], (
        f"the synthetic {combo['preset']} checkpoint differs from the one {GOLDEN.name} was "
        "converted from (pipeline.synth changed): the outputs cannot be compared"
    )
    convert(LocalSource(ckpt), out, combo["devices"], progress=False, **combo["options"])
    got = output_arrays(out)
    diff = differences(combo["arrays"], got)
    assert not diff, failure(key, "differ from", diff)
    on_disk = [r | {"checksum": chunk_checksum(out, r)} for r in got]
    diff = differences(combo["arrays"], on_disk)
    assert not diff, failure(key, "have chunk files that differ from", diff)


@pytest.mark.parametrize("key", TINY)
def test_tiny_outputs_match_golden(tiny_ckpt, tmp_path, key):
    assert_golden(tiny_ckpt, key, tmp_path / "out")


def test_small_output_matches_golden(small_ckpt, tmp_path):
    assert_golden(small_ckpt, SMALL, tmp_path / "out")


def test_golden_file_is_consistent():
    """The file holds exactly the script's combinations, each sorted, unique and digested."""
    assert set(DOC["combos"]) == {combo_key(c) for c in COMBOS}
    assert set(DOC["checkpoints"]) == {c["preset"] for c in COMBOS}
    for key, combo in DOC["combos"].items():
        assert combo_key(combo) == key
        rows = combo["arrays"]
        assert all(tuple(r) == FIELDS for r in rows), key
        names = [(r["store"], r["path"]) for r in rows]
        assert names == sorted(set(names)), f"{key}: arrays not sorted or not unique"
        assert arrays_sha256(rows) == combo["arrays_sha256"], f"{key}: arrays_sha256 is stale"
