"""One process per rank: a communicator over ``torch.distributed`` (gloo on CPU).

Ranks meet through ``env://`` rendezvous: ``MASTER_ADDR`` and ``MASTER_PORT`` (``torchrun`` sets
them, with ``RANK`` and ``WORLD_SIZE``). The all-reduce gathers every rank's part and sums in rank
order in float32, exactly as :class:`runtime.comm.ThreadGroup` does, so one-process-per-rank runs
give bit-identical results to all ranks in one process. torch is imported only here.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from runtime.comm import sum_in_rank_order


class RendezvousError(RuntimeError):
    """torch.distributed cannot start: the message says what to set."""


class TorchDistributed:
    """Rank ``rank`` of ``world_size`` processes joined by ``torch.distributed``."""

    def __init__(self, rank: int, world_size: int, timeout_s: float = 600.0) -> None:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RendezvousError(
                f"set {' and '.join(missing)} for the ranks to meet (e.g. MASTER_ADDR=127.0.0.1 "
                "MASTER_PORT=29500), or launch with torchrun"
            )
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise RendezvousError(
                "one process per rank needs torch: pip install 'mimo-shard[dist]'"
            ) from None
        self._torch, self._dist = torch, dist
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        self.rank = rank
        self.world_size = world_size

    @property
    def replica_groups(self) -> list[list[int]]:
        return [list(range(self.world_size))]

    def _gather(self, x: np.ndarray) -> list[np.ndarray]:
        t = self._torch.from_numpy(np.ascontiguousarray(x))
        parts = [self._torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t)
        return [p.numpy() for p in parts]

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return sum_in_rank_order(self._gather(x), x.dtype)

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.concatenate(self._gather(x), axis=axis)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
