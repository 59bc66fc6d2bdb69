"""What the README tells a new user holds: its options exist, its sizes are the plan's, and the
demo path runs without torch or transformers installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loader.cli import main as manifest_main
from pipeline.cli import main as shard_main
from runtime.cli import main as run_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS = {"mimo-shard": shard_main, "mimo-manifest": manifest_main, "mimo-run": run_main}

# Makes torch and transformers unimportable, then runs a module as ``python -m`` would.
NO_TORCH = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
for m in ("torch", "transformers"):
    sys.modules.pop(m, None)
mod = sys.argv[1]
sys.argv = [mod] + sys.argv[2:]
runpy.run_module(mod, run_name="__main__", alter_sys=True)
"""


def usage_blocks() -> list[str]:
    """Fenced blocks without a language tag (the README's usage blocks)."""
    blocks, current, tag = [], None, ""
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if not tag:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_options(command: str) -> set[str]:
    """``--options`` on the README's usage lines of ``command`` (and their continuation lines)."""
    found: set[str] = set()
    for block in usage_blocks():
        current = None
        for line in block.splitlines():
            words = line.split()
            if words and words[0] in COMMANDS:
                current = words[0]
            elif words and not line.startswith(" "):
                current = None
            if current == command:
                found |= set(re.findall(r"--[a-z][a-z-]*", line.split("#")[0]))
    return found


def help_options(command: str, sub: str | None = None) -> set[str]:
    args = ([sub] if sub else []) + ["--help"]
    result = CliRunner().invoke(COMMANDS[command], args)
    assert result.exit_code == 0, result.output
    return set(re.findall(r"--[a-z][a-z-]*", result.output))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_in_the_readme_usage_exists(command):
    documented = readme_options(command)
    assert documented, f"no usage block for {command}"
    subcommands = {
        "mimo-manifest": ("show", "list", "verify", "diff", "audit", "experts"),
        "mimo-shard": (None, "plan-experts"),
    }.get(command, (None,))
    offered = set().union(*(help_options(command, s) for s in subcommands))
    assert documented - offered == set()


def test_the_option_parser_sees_continuation_lines():
    assert {"--force", "--delete-source-files", "--dry-run"} <= readme_options("mimo-shard")
    assert "--all-ranks" in readme_options("mimo-run")


def test_real_model_sizes_are_the_checked_in_plan():
    plan = json.loads((ROOT / "manifests/mimo-v2-flash/dry-run-32.json").read_text())
    b = plan["bytes"]
    per_device, shared = (f"{b[k] / 1e9:.2f} GB" for k in ("per_device_max", "shared"))
    assert plan["options"]["devices"] == 32
    claim = f"{per_device} per device at 32 devices,\n{shared} shared, {b['total'] / 1e9:.1f} GB"
    assert claim in README
    row = f"{per_device} per device + {shared} shared = {b['total'] / 1e9:.1f} GB"
    assert row in README


def test_demo_path_runs_without_torch_or_transformers(tmp_path):
    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", NO_TORCH, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    ckpt, out = str(tmp_path / "checkpoint"), str(tmp_path / "out")
    run("pipeline.synth", ckpt, "--preset", "tiny")
    run("pipeline.cli", ckpt, out, "--devices", "4", "--quiet")
    assert "devices 4" in run("loader.cli", "show", out)
    run("loader.cli", "verify", out)
    last = (
        run(
            "runtime.cli",
            out,
            "--all-ranks",
            "--prompt",
            "The river",
            "--max-new-tokens",
            "3",
            "--seed",
            "1",
            "--json",
        )
        .strip()
        .splitlines()[-1]
    )
    doc = json.loads(last)
    assert len(doc["output_ids"]) == 3 and doc["ranks"]["world_size"] == 4


def test_the_blocker_really_blocks_torch():
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH.replace("runpy.run_module", "import torch  #"), "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
