"""``open_device``: one device's slice of a mimo-shard output as read-only memory maps.

    from loader import open_device
    dev = open_device(OUT, rank)
    w = dev["layers/5/experts/gate_up"]      # read-only mmap view, bfloat16 [E_local, H, 2*I]
    dev.config, dev.expert_map[5], dev.manifest

Opening reads the manifest, two array tables and two consolidated ``zarr.json`` files, checks
every array of the device against the manifest, and maps each chunk file read-only (``mmap`` viewed
by ``np.frombuffer``; zarr is not imported: it has no zero-copy read path). No array byte is read
unless ``verify=True``, which recomputes every checksum.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import stat
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from loader.format import LOGICAL_DTYPES, SHARED, chunk_path, device_store
from loader.manifest import (
    LoaderError,
    held_elsewhere,
    read_arrays,
    read_manifest,
    store_metadata,
)
from loader.verify import Problem, check_array, metadata_problem
from mimo.config import MiMoConfig


def _ensure_fd_budget(n: int) -> None:
    """Each mapping holds a file descriptor (CPython dups it); raise the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Device(Mapping[str, np.ndarray]):
    """Read-only mapping of array path -> memmap for one device (its arrays and the shared ones)."""

    def __init__(
        self, out: Path, rank: int, manifest: dict[str, Any], arrays: dict[str, np.ndarray]
    ):
        self.out = out
        self.rank = rank
        self.manifest = manifest
        self._arrays = arrays

    def __getitem__(self, path: str) -> np.ndarray:
        try:
            return self._arrays[path]
        except KeyError:
            raise KeyError(
                f"{path!r} is not an array of device {self.rank} or the shared store"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def devices(self) -> int:
        return self.manifest["options"]["devices"]

    @cached_property
    def config(self) -> MiMoConfig:
        return MiMoConfig.from_dict(self.manifest["model"]["config"])

    @property
    def layers(self) -> tuple[int, ...]:
        """The converted layers, in order (a subset when ``--layers`` was used)."""
        sub = self.manifest["options"]["layers"]
        return tuple(sub) if sub is not None else tuple(range(self.config.num_hidden_layers))

    @cached_property
    def expert_map(self) -> dict[int, list[int]]:
        """MoE layer -> the global expert ids this device holds, in stored order."""
        return {int(k): v[self.rank] for k, v in self.manifest["layout"]["expert_map"].items()}

    @property
    def experts_subset(self) -> list[int] | None:
        """The converted expert subset (every MoE layer), or None when all experts are present."""
        return self.manifest["options"]["experts"]

    def heads(self, layer: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(query-head range, KV-head range) this device holds on ``layer``."""
        a = self.manifest["layout"]["attention"][str(layer)][self.rank]
        return tuple(a["q_heads"]), tuple(a["kv_heads"])

    @property
    def vocab_range(self) -> tuple[int, int]:
        return tuple(self.manifest["layout"]["vocab"][self.rank])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())


def open_device(
    out: str | Path, rank: int, verify: bool = False, manifest: dict[str, Any] | None = None
) -> Device:
    """Map device ``rank`` of the output ``out``; raise LoaderError on any inconsistency.

    ``manifest`` may pass an already-read manifest (several ranks in one process).
    """
    out = Path(out)
    m = manifest if manifest is not None else read_manifest(out)
    n = m["options"]["devices"]
    if not isinstance(rank, int) or not 0 <= rank < n:
        raise LoaderError(
            f"{out}: device rank {rank} is outside 0..{n - 1} (the output has {n} devices)"
        )
    elsewhere = held_elsewhere(m, rank)  # one host's part of a multi-host output
    if elsewhere:
        raise LoaderError(f"{out}: {elsewhere}")
    stores = (SHARED, device_store(rank))
    meta = {s: store_metadata(out, s) for s in stores}
    records = read_arrays(out, m, list(stores))
    expected = {(a["store"], a["path"]) for a in records}
    for s in stores:
        extra = sorted(p for p in meta[s] if (s, p) not in expected)
        if extra:
            raise LoaderError(
                f"{out}: {s}.zarr holds arrays the manifest does not list: {extra[:5]}"
            )
    _ensure_fd_budget(len(records))
    arrays: dict[str, np.ndarray] = {}
    for rec in records:
        if verify:
            problem = check_array(out, rec, meta[rec["store"]].get(rec["path"]), checksum=True)
        else:
            why = metadata_problem(rec, meta[rec["store"]].get(rec["path"]))
            problem = Problem(rec["store"], rec["path"], "metadata", why) if why else None
        if problem:
            raise LoaderError(f"{out}: {problem}")
        arrays[rec["path"]] = _map(out, rec)
    return Device(out, rank, m, arrays)


def _map(out: Path, rec: dict[str, Any]) -> np.ndarray:
    """A read-only array over the chunk file of ``rec`` (its size checked against the manifest)."""
    shape = tuple(rec["shape"])
    path = chunk_path(out, rec["store"], rec["path"], shape)
    store, name = rec["store"], rec["path"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as e:
        why = f"chunk file {path} does not exist" if e.errno == errno.ENOENT else f"{path}: {e}"
        raise LoaderError(f"{out}: {Problem(store, name, 'missing', why)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = f"chunk file {path} is not a regular file"
            raise LoaderError(f"{out}: {Problem(store, name, 'missing', why)}")
        size = st.st_size
        if size != rec["bytes"]:
            why = f"chunk file has {size} bytes, manifest says {rec['bytes']}"
            raise LoaderError(f"{out}: {Problem(store, name, 'size', why)}")
        dtype = LOGICAL_DTYPES[rec["dtype"]]
        if size == 0:
            return np.empty(shape, dtype)
        buf = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
