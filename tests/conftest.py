"""Shared fixtures: synthetic checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synth import preset_config, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIG = ROOT / "manifests" / "mimo-v2-flash" / "config.json"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny preset (7 layers, 16 experts), seed 0. Read-only: copy it before damaging it."""
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny"), preset_config("tiny"), seed=0, progress=False
    )


@pytest.fixture(scope="session")
def tiny_mtp_ckpt(tmp_path_factory) -> Path:
    """The tiny preset with the 3 MTP layers."""
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny-mtp"), preset_config("tiny"), seed=0, mtp=True, progress=False
    )
