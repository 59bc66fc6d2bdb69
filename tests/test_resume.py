"""Crash safety: SIGKILL at several points and rerun: the checksums of an uninterrupted run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader import LoaderError, open_device
from loader.manifest import read_arrays
from pipeline.synth import preset_config, write_checkpoint

JOURNAL = Path(".mimo-shard") / "journal.jsonl"


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory) -> Path:
    """tiny with 13 layers and 32 experts: long enough to kill mid-run."""
    return write_checkpoint(
        tmp_path_factory.mktemp("long"), preset_config("tiny", 13, 32), seed=3, progress=False
    )


def shard(src: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            str(src),
            str(out),
            "--devices",
            "2",
            "--quiet",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MIMO_SHARD_COMMIT_SECONDS": "0.02", **(env or {})},
    )


def finish(p: subprocess.Popen) -> tuple[int, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out + err


def checksums(out: Path) -> dict[tuple[str, str], str]:
    m = json.loads((out / "manifest.json").read_text())
    return {(a["store"], a["path"]): a["checksum"] for a in read_arrays(out, m)}


def journal_lines(out: Path) -> int:
    try:
        return len((out / JOURNAL).read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def reference(long_ckpt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "out"
    code, text = finish(shard(long_ckpt, out))
    assert code == 0, text
    units = json.loads(
        subprocess.check_output(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                str(long_ckpt),
                "--devices",
                "2",
                "--dry-run",
                "--json",
            ]
        )
    )["units"]
    return {"checksums": checksums(out), "units": units}


def kill_when(
    p: subprocess.Popen, out: Path, lines: int | None, seconds: float | None = None
) -> bool:
    """SIGKILL ``p`` once the journal has ``lines`` lines (or after ``seconds``).

    False when the run ended first.
    """
    t0 = time.monotonic()
    while p.poll() is None:
        if (lines is not None and journal_lines(out) >= lines) or (
            seconds is not None and time.monotonic() - t0 >= seconds
        ):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("point", ["start", "few", "half", "all-journaled"])
def test_sigkill_then_rerun_gives_the_same_output(long_ckpt, reference, tmp_path, point):
    out = tmp_path / "out"
    lines = {
        "start": None,
        "few": 3,
        "half": reference["units"] // 2,
        "all-journaled": reference["units"],
    }[point]
    killed = kill_when(shard(long_ckpt, out), out, lines, seconds=0.3 if point == "start" else None)
    assert not (out / "manifest.json").exists() or not killed
    if killed:
        assert journal_lines(out) < reference["units"] or point == "all-journaled"
    code, text = finish(shard(long_ckpt, out))
    assert code == 0, text
    if killed and point in ("half", "all-journaled"):
        assert " 0 resumed" not in text, text  # journaled units were skipped, not redone
    assert checksums(out) == reference["checksums"]
    assert not list(out.glob("*.zarr/**/*.partial"))
    assert not (out / ".mimo-shard").exists()


def test_killed_twice_and_a_torn_journal_line(long_ckpt, reference, tmp_path):
    out = tmp_path / "out"
    assert kill_when(shard(long_ckpt, out), out, 4)
    assert kill_when(shard(long_ckpt, out), out, reference["units"] // 3)
    with open(out / JOURNAL, "a") as f:
        f.write('{"unit": "layers/3/attn/o", "arr')  # a crash mid-append
    code, text = finish(shard(long_ckpt, out))
    assert code == 0, text
    assert checksums(out) == reference["checksums"]


def test_killed_output_is_not_complete_and_damage_is_redone(long_ckpt, reference, tmp_path):
    out = tmp_path / "out"
    assert kill_when(shard(long_ckpt, out), out, reference["units"] // 2)
    assert not (out / "manifest.json").exists()
    with pytest.raises(LoaderError, match="incomplete"):
        open_device(out, 0)  # a killed conversion is never mistaken for an output
    # a journaled unit whose chunk file vanished is redone, not trusted
    first = json.loads((out / JOURNAL).read_text().splitlines()[0])["arrays"][0]
    store = out / f"{first['store']}.zarr" / first["path"]
    chunk = next(p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    code, text = finish(shard(long_ckpt, out))
    assert code == 0, text
    assert checksums(out) == reference["checksums"]


def test_rerun_of_a_complete_output_does_nothing(long_ckpt, reference, tmp_path):
    out = tmp_path / "out"
    assert finish(shard(long_ckpt, out))[0] == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    code, text = finish(shard(long_ckpt, out))
    assert code == 0 and "already complete" in text
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_other_options_refuse_unless_force(long_ckpt, tmp_path):
    out = tmp_path / "out"
    p = shard(long_ckpt, out, "--devices", "4")
    assert kill_when(p, out, 5)
    code, text = finish(shard(long_ckpt, out))  # devices 2 over an interrupted devices-4 run
    assert code == 2 and "another source or other options" in text and "devices 4" in text
    assert not (out / "manifest.json").exists()
    code, text = finish(shard(long_ckpt, out, "--force"))
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["devices"] == 2
    assert sorted(p.name for p in out.glob("*.zarr")) == [
        "device-000.zarr",
        "device-001.zarr",
        "shared.zarr",
    ]
    code, text = finish(
        shard(long_ckpt, out, "--dtype", "float32")
    )  # complete output, other options
    assert code == 2 and "--force" in text


def test_a_second_concurrent_run_is_refused(long_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running mimo-shard holds
    try:
        code, text = finish(shard(long_ckpt, out))
    finally:
        os.close(fd)
    assert code == 2 and "another mimo-shard run" in text
    assert not (out / "manifest.json").exists()
