"""Usage errors of every command (a missing argument, a bad or unknown option) are one line
``PROG: error: ...`` naming the option, with exit code 2, like the other bad input."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loader.cli import main as manifest_main
from pipeline.cli import main as shard_main
from pipeline.synth import main as synth_main
from runtime.cli import main as run_main

CASES = [
    (shard_main, "mimo-shard", ["src", "out", "--devices", "x"], "'--devices'"),
    (shard_main, "mimo-shard", ["src", "out"], "Missing option '--devices'"),
    (shard_main, "mimo-shard", ["src", "out", "-n", "2", "--bogus"], "--bogus"),
    (shard_main, "mimo-shard plan-experts", ["plan-experts", "--bogus"], "--bogus"),
    (synth_main, "python -m pipeline.synth", [], "Missing argument 'OUT'"),
    (synth_main, "python -m pipeline.synth", ["x", "--preset", "huge"], "'--preset'"),
    (synth_main, "python -m pipeline.synth", ["{tmp}/s", "--layers", "0"], "--layers"),
    (run_main, "mimo-run", [], "Missing argument 'OUT'"),
    (manifest_main, "mimo-manifest", ["show"], "Missing argument 'OUT'"),
]


@pytest.mark.parametrize(("cli", "prog", "args", "expected"), CASES)
def test_usage_errors_are_one_line(cli, prog, args, expected, tmp_path):
    name = prog.removesuffix(" plan-experts")  # the subcommand names itself after mimo-shard
    res = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args], prog_name=name)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], lines[0]


def test_synth_refuses_a_non_empty_out_in_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    res = CliRunner().invoke(synth_main, [str(tmp_path)], prog_name="python -m pipeline.synth")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "not empty (use --force" in res.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
