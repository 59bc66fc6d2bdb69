"""Communicators: how ranks exchange partial results (all-reduce, all-gather).

- :class:`SingleRank`: one rank, collectives are identities.
- :class:`ThreadGroup`: every rank in this process, one thread each; sums run in rank order in
  float32, so results are deterministic and independent of thread timing.
- ``runtime.dist.TorchDistributed``: one process per rank over ``torch.distributed``.

Kernels only read ``replica_groups`` while traced for Trainium; on CPU they call the methods.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Protocol

import numpy as np


class Communicator(Protocol):
    rank: int
    world_size: int

    @property
    def replica_groups(self) -> list[list[int]]: ...

    def all_reduce(self, x: np.ndarray) -> np.ndarray: ...

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray: ...


def sum_in_rank_order(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The ranks' parts summed in rank order in float32: the same bits whatever the timing."""
    out = parts[0].astype(np.float32, copy=True)
    for p in parts[1:]:
        out += p
    return out.astype(dtype, copy=False)


class SingleRank:
    """World of one."""

    rank = 0
    world_size = 1

    @property
    def replica_groups(self) -> list[list[int]]:
        return [[0]]

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x


class _Shared:
    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[np.ndarray | None] = [None] * world
        self.barrier = threading.Barrier(world)


class ThreadGroup:
    """Rank ``rank`` of a group of threads in one process (build them with :meth:`create`)."""

    def __init__(self, shared: _Shared, rank: int) -> None:
        self._s = shared
        self.rank = rank
        self.world_size = shared.world

    @classmethod
    def create(cls, world: int) -> list[ThreadGroup]:
        shared = _Shared(world)
        return [cls(shared, r) for r in range(world)]

    @property
    def replica_groups(self) -> list[list[int]]:
        return [list(range(self.world_size))]

    def _exchange(self, x: np.ndarray) -> list[np.ndarray]:
        s = self._s
        s.slots[self.rank] = x
        s.barrier.wait()  # every rank has posted
        parts = list(s.slots)
        s.barrier.wait()  # every rank has read; slots may be reused
        return parts

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return sum_in_rank_order(self._exchange(x), x.dtype)

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.concatenate(self._exchange(x), axis=axis)

    def abort(self) -> None:
        """Release every rank blocked in a collective (they raise BrokenBarrierError)."""
        self._s.barrier.abort()


class RanksDisagree(ValueError):
    """The ranks were started with different inputs or options; the message names the first."""


DIGEST_BYTES = 32


def _digest(value: object) -> np.ndarray:
    data = json.dumps(value, sort_keys=True, default=str).encode()
    return np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)


def agree(comm: Communicator, fields: dict[str, object]) -> None:
    """Every rank checks that all ranks hold the same ``fields`` (name -> JSON-able value).

    Each rank contributes one sha256 per field (a ``(len(fields), 32)`` uint8 array, gathered
    over ``comm``); every rank must call this with the same field names in the same order. Raises
    :class:`RanksDisagree` naming the first field and the ranks that differ from rank 0.
    """
    if comm.world_size == 1:
        return
    names = list(fields)
    mine = np.stack([_digest(fields[n]) for n in names])
    every = comm.all_gather(mine[None], axis=0)  # (world, fields, 32)
    for i, name in enumerate(names):
        others = [r for r in range(comm.world_size) if not np.array_equal(every[r, i], every[0, i])]
        if others:
            ranks = ", ".join(map(str, others))
            raise RanksDisagree(
                f"ranks disagree on {name}: rank{'s' if len(others) > 1 else ''} {ranks} "
                "differ from rank 0 (start every rank with the same output and options)"
            )
