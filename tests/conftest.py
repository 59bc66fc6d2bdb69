"""Shared fixtures: synthetic checkpoints written once per test session; a full-disk fault."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
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


def disk_full_after(writes: int) -> Callable[[int, object, int], int]:
    """An ``os.pwrite`` that writes the first ``writes`` calls, then fails with ENOSPC."""
    real, calls = os.pwrite, [0]

    def pwrite(fd: int, data, offset: int) -> int:
        calls[0] += 1
        if calls[0] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    return pwrite
