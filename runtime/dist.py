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


class StartupTimeout(RendezvousError):
    """Some ranks did not arrive within the start-up timeout; the message names them."""


ARRIVED = "mimo-run/arrived/"  # store key prefix: one key per rank that reached start-up


class TorchDistributed:
    """Rank ``rank`` of ``world_size`` processes joined by ``torch.distributed``.

    Start-up: rank 0 hosts a ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` (under ``torchrun`` the
    launcher's store is used); every rank posts an arrival key and waits up to
    ``startup_timeout_s`` for the others, then raises :class:`StartupTimeout` naming the ranks
    that never arrived. The gloo group is built on that store; collectives wait ``timeout_s``.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 60.0,
    ) -> None:
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
        self.rank = rank
        self.world_size = world_size
        if not dist.is_initialized():
            store = self._meet(rank, world_size, startup_timeout_s)
            dist.init_process_group(
                "gloo",
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )

    def _meet(self, rank: int, world: int, timeout_s: float):
        """The store every rank has reached, or StartupTimeout naming the ranks that did not."""
        dist = self._dist
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        try:
            port_n = int(port)
        except ValueError:
            raise RendezvousError(f"MASTER_PORT={port!r} is not a port number") from None
        wait = datetime.timedelta(seconds=timeout_s)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        host = rank == 0 and not agent
        try:
            base = dist.TCPStore(addr, port_n, None, host, timeout=wait, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            if host:
                raise RendezvousError(
                    f"rank 0 cannot listen on MASTER_ADDR={addr} MASTER_PORT={port}: "
                    f"{str(e).splitlines()[0]}"
                ) from None
            raise StartupTimeout(
                f"rank 0 never arrived: no rank 0 at MASTER_ADDR={addr} MASTER_PORT={port} "
                f"within --startup-timeout {timeout_s:g} s"
            ) from None
        self._store = base  # rank 0 serves the store for as long as this object lives
        run = os.environ.get("TORCHELASTIC_RUN_ID", "")
        store = dist.PrefixStore(f"mimo-run/{run}/", base)
        store.set(f"{ARRIVED}{rank}", "1")
        keys = [f"{ARRIVED}{r}" for r in range(world)]
        try:
            store.wait(keys, wait)
        except (RuntimeError, OSError):
            absent = [r for r in range(world) if not _has(store, keys[r])]
            if not absent:
                raise
            names = ", ".join(map(str, absent))
            raise StartupTimeout(
                f"rank{'s' if len(absent) > 1 else ''} {names} of {world} never arrived within "
                f"--startup-timeout {timeout_s:g} s (start every rank with the same "
                "MASTER_ADDR and MASTER_PORT)"
            ) from None
        return store

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


def _has(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except (RuntimeError, OSError):  # the store itself is gone
        return False
