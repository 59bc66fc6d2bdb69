"""One validation per option, the same in every mode of a command (exit 2, one message)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main as shard
from pipeline.synth import main as synth


@pytest.mark.parametrize("mode", [[], ["--dry-run"]])
@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive_in_every_mode(tiny_ckpt, tmp_path, mode, workers):
    out = [] if mode else [str(tmp_path / "out")]
    r = CliRunner().invoke(shard, [str(tiny_ckpt), *out, "--devices", "2", "-j", workers, *mode])
    assert r.exit_code == 2
    assert f"--workers {workers}: must be >= 1" in r.output
    assert not (tmp_path / "out").exists()


def test_hub_only_options_with_a_local_folder_are_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        shard, [str(tiny_ckpt), str(out), "--devices", "2", "--cache-dir", str(tmp_path / "c")]
    )
    assert r.exit_code == 2 and "--cache-dir" in r.output and "Hub repo id" in r.output
    assert not out.exists()


def test_synth_refuses_a_negative_seed_and_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(synth, [str(out), "--seed", "-1"])
    assert r.exit_code == 2 and "--seed" in r.output
    assert not out.exists()


def test_synth_failure_midway_removes_what_it_wrote(tmp_path, monkeypatch):
    import pipeline.synth as s

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s, "write_tokenizer", fail)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(synth, [str(out)])
    assert r.exit_code != 0
    assert not out.exists()
