"""OUT on a shared disk: decisions under the lock, a failure-safe --force, no link followed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import loader.cli
import pipeline.cli
from pipeline.convert import convert
from pipeline.errors import InputError
from pipeline.journal import OutputDir
from pipeline.source import LocalSource
from tests.conftest import disk_full_after


def shard(ckpt: Path, out: Path, devices: int = 2, **kw):
    return convert(LocalSource(ckpt), out, devices, progress=False, **kw)


def verifies(out: Path) -> bool:
    res = CliRunner().invoke(loader.cli.main, ["verify", str(out), "--quiet"])
    return res.exit_code == 0


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (links not followed): relative path -> (inode, size, mtime)."""
    out = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(parent) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def interrupted(tiny_ckpt, tmp_path, monkeypatch) -> Path:
    """An output whose conversion failed midway (a full disk): resumable, no manifest."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", disk_full_after(40))
        with pytest.raises(OSError):
            shard(tiny_ckpt, out)
    assert (out / ".mimo-shard" / "run.json").is_file() and not (out / "manifest.json").exists()
    return out


@pytest.fixture()
def victim(tmp_path) -> Path:
    """A file outside OUT that no run may touch."""
    p = tmp_path / "victim.txt"
    p.write_text("precious")
    return p


# --------------------------------------------------------------------------- 1. under the lock
@pytest.mark.parametrize("other_options", [False, True])
def test_a_run_paused_before_the_lock_never_rewrites_what_another_run_finished(
    tiny_ckpt, tmp_path, monkeypatch, other_options
):
    """Run A pauses right before locking; run B converts OUT meanwhile. A must then see B's
    output: 'already complete' with the same options, refused with others; never rewritten."""
    out = tmp_path / "out"
    arrived, go = threading.Event(), threading.Event()
    real_lock = OutputDir.lock

    def lock(self):
        if threading.current_thread().name == "A":
            arrived.set()
            assert go.wait(120)
        return real_lock(self)

    monkeypatch.setattr(OutputDir, "lock", lock)
    result: dict = {}

    def run_a():
        try:
            kw = {"dtype": "float32"} if other_options else {}
            result["summary"] = shard(tiny_ckpt, out, **kw)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    a = threading.Thread(target=run_a, name="A")
    a.start()
    assert arrived.wait(120)
    shard(tiny_ckpt, out)  # run B
    before = tree(out)
    go.set()
    a.join(300)
    assert not a.is_alive()
    if other_options:
        assert isinstance(result.get("error"), InputError), result
        assert "another source or other options" in str(result["error"])
    else:
        assert "error" not in result, result
        assert result["summary"].already_complete
    assert tree(out) == before
    assert verifies(out)


# ------------------------------------------------------------------------------- 2. --force
def user_files(out: Path) -> None:
    """What a user keeps next to an output: notes and their own zarr store."""
    (out / "notes.txt").write_text("mine")
    exp = out / "experiments.zarr"
    exp.mkdir()
    (exp / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (exp / "run-1").write_text("results")


def assert_user_files(out: Path) -> None:
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "experiments.zarr" / "run-1").read_text() == "results"


def test_force_removes_only_what_mimo_shard_wrote(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    shard(tiny_ckpt, out, devices=4)
    user_files(out)
    shard(tiny_ckpt, out, devices=2, force=True)
    assert_user_files(out)
    assert sorted(p.name for p in out.glob("*.zarr")) == [
        "device-000.zarr",
        "device-001.zarr",
        "experiments.zarr",
        "shared.zarr",
    ]
    assert json.loads((out / "manifest.json").read_text())["options"]["devices"] == 2
    assert verifies(out)


def test_force_interrupted_midway_is_finished_by_the_next_force(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shard(tiny_ckpt, out, devices=4)
    user_files(out)
    real, calls = shutil.rmtree, {"n": 0}

    def rmtree(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first removal
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(OSError):
            shard(tiny_ckpt, out, devices=2, force=True)
    assert calls["n"] >= 2
    assert not (out / "manifest.json").exists()  # the old output no longer claims completeness
    with pytest.raises(InputError, match="--force"):
        shard(tiny_ckpt, out, devices=2)  # refused, and the message says how to go on
    summary = shard(tiny_ckpt, out, devices=2, force=True)
    assert not summary.already_complete
    assert_user_files(out)
    assert sorted(p.name for p in out.glob("device-*.zarr")) == [
        "device-000.zarr",
        "device-001.zarr",
    ]
    assert verifies(out)


def test_force_over_an_interrupted_run_of_other_options(interrupted, tiny_ckpt):
    user_files(interrupted)
    shard(tiny_ckpt, interrupted, devices=2, dtype="float32", force=True)
    assert_user_files(interrupted)
    assert verifies(interrupted)


# ------------------------------------------------------------------------------ 3. no links
@pytest.mark.parametrize("name", ["config.json.tmp", "manifest.json.tmp"])
def test_a_planted_temporary_name_is_not_followed(tiny_ckpt, tmp_path, victim, name):
    out = tmp_path / "out"
    shard(tiny_ckpt, out)
    (out / name).symlink_to(victim)
    shard(tiny_ckpt, out, dtype="float32", force=True)
    assert victim.read_text() == "precious"
    assert verifies(out)


def plant(out: Path, name: str, victim: Path) -> Path:
    """Replace OUT/name by a link to a copy outside OUT; return the copy (files: the victim)."""
    p = out / name
    if p.is_dir():
        target = victim.parent / f"moved-{p.name}"
        shutil.move(p, target)
        (target / "c.0123456789abcdef.partial").write_text("not mimo-shard's")
    elif p.exists() or p.suffix in (".json", ".jsonl"):
        p.unlink(missing_ok=True)
        target = victim
    else:
        target = victim.parent / f"new-{p.name}"
        target.mkdir()
    p.symlink_to(target)
    return target


@pytest.mark.parametrize(
    "name",
    ["config.json", "manifest.d", "device-001.zarr", ".mimo-shard", ".mimo-shard/journal.jsonl"],
)
def test_a_link_inside_out_is_refused_on_resume(interrupted, tiny_ckpt, victim, name):
    if name == "manifest.d":
        (interrupted / name).mkdir()
    target = plant(interrupted, name, victim)
    before, text = tree(target) if target.is_dir() else {}, victim.read_text()
    with pytest.raises(InputError, match="symbolic link") as e:
        shard(tiny_ckpt, interrupted)
    assert name.split("/")[-1] in str(e.value) and "\n" not in str(e.value)
    assert victim.read_text() == text
    if target.is_dir():
        assert tree(target) == before  # nothing written into it, nothing deleted from it
    assert not (interrupted / "manifest.json").exists()


@pytest.mark.parametrize("name", ["manifest.json", "shared.zarr", "config.json"])
def test_a_link_inside_a_complete_output_is_refused_even_with_force(
    tiny_ckpt, tmp_path, victim, name
):
    out = tmp_path / "out"
    shard(tiny_ckpt, out)
    target = plant(out, name, victim)
    before, text = tree(target) if target.is_dir() else {}, victim.read_text()
    code_text = CliRunner().invoke(
        pipeline.cli.main, [str(tiny_ckpt), str(out), "--devices", "2", "--force", "--quiet"]
    )
    assert code_text.exit_code == 2, code_text.output
    assert name in code_text.output and "symbolic link" in code_text.output
    assert "Traceback" not in code_text.output
    assert victim.read_text() == text
    if target.is_dir():
        assert tree(target) == before


def test_a_store_link_is_not_searched_for_partial_files(interrupted, tiny_ckpt, tmp_path):
    """Orphan pieces are removed from the stores mimo-shard writes, never through a link."""
    elsewhere = tmp_path / "elsewhere.zarr"
    elsewhere.mkdir()
    (elsewhere / "keep.partial").write_text("someone else's")
    (interrupted / "extra.zarr").symlink_to(elsewhere)
    shard(tiny_ckpt, interrupted)
    assert (elsewhere / "keep.partial").read_text() == "someone else's"
    assert verifies(interrupted)


def test_temporary_files_of_a_killed_run_are_removed(interrupted, tiny_ckpt):
    left = [
        interrupted / ".config.json.0123456789abcdef.tmp",
        interrupted / ".mimo-shard" / ".run.json.0123456789abcdef.tmp",
    ]
    for p in left:
        p.write_text("torn")
    (interrupted / "notes.0123456789abcdef.tmp").write_text("mine")  # not a name it writes
    shard(tiny_ckpt, interrupted)
    assert not any(p.exists() for p in left)
    assert (interrupted / "notes.0123456789abcdef.tmp").read_text() == "mine"
    assert verifies(interrupted)


def test_out_a_link_to_nothing_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="not a folder"):
        shard(tiny_ckpt, out)
    assert not (tmp_path / "nowhere").exists()


# -------------------------------------------------------------------- 4. OUT itself a link
def test_out_may_be_a_link_to_a_folder(tiny_ckpt, tmp_path):
    real = tmp_path / "disk" / "out"
    real.mkdir(parents=True)
    out = tmp_path / "out"
    out.symlink_to(real, target_is_directory=True)
    shard(tiny_ckpt, out)
    assert (real / "manifest.json").is_file()
    assert shard(tiny_ckpt, out).already_complete
    shard(tiny_ckpt, out, dtype="float32", force=True)
    assert out.is_symlink() and verifies(out)
