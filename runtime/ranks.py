"""Every rank of an output in one process: one thread per rank, joined by a ThreadGroup.

Each rank thread owns its :class:`~runtime.model.RankModel` (its own memory maps and caches);
:class:`InProcessRanks` sends every call to all of them and returns rank 0's result. Ranks meet
in the kernels' collectives, so they must all run every call; an error in one rank aborts the
group's barrier so the others fail instead of waiting forever.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loader import open_device
from loader.manifest import read_manifest
from runtime.backends import Backend
from runtime.comm import ThreadGroup, agree
from runtime.model import RankModel


class InProcessRanks:
    """All ranks of ``out`` as one model-like object (``prefill``, ``decode``, ``reset``)."""

    def __init__(
        self,
        out: str | Path,
        max_seq_len: int = 4096,
        backend_factory: Callable[[int], Backend] | None = None,
        verify: bool = False,
    ):
        manifest = read_manifest(Path(out))
        self.world = manifest["options"]["devices"]
        comms = ThreadGroup.create(self.world)
        self._comms = comms
        self._inbox = [queue.Queue() for _ in range(self.world)]
        self._outbox = [queue.Queue() for _ in range(self.world)]
        self._threads = []
        for r in range(self.world):
            t = threading.Thread(
                target=self._serve,
                name=f"rank-{r}",
                daemon=True,
                args=(r, out, manifest, comms[r], max_seq_len, backend_factory, verify),
            )
            t.start()
            self._threads.append(t)
        results = [self._outbox[r].get() for r in range(self.world)]
        for ok, value in results:
            if not ok:
                self.close()
                raise value
        self.model: RankModel = results[0][1]  # rank 0's model, for config and notices

    def _serve(self, rank, out, manifest, comm, max_seq_len, backend_factory, verify) -> None:
        try:
            dev = open_device(out, rank, verify=verify, manifest=manifest)
            backend = backend_factory(rank) if backend_factory else None
            model = RankModel(dev, comm, max_seq_len=max_seq_len, backend=backend)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            self._outbox[rank].put((False, e))
            return
        self._outbox[rank].put((True, model))
        while True:
            item = self._inbox[rank].get()
            if item is None:
                return
            name, args = item
            try:
                fn = (lambda *a: agree(comm, *a)) if name == "agree" else getattr(model, name)
                self._outbox[rank].put((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                comm.abort()
                self._outbox[rank].put((False, e))

    def _all(self, name: str, *args: Any, rank0_args: tuple = ()) -> Any:
        """Run ``name(*args)`` on every rank (rank 0 gets ``rank0_args`` too); rank 0's result."""
        for r, q in enumerate(self._inbox):
            q.put((name, args + rank0_args if r == 0 else args))
        results = [q.get() for q in self._outbox]
        errors = [v for ok, v in results if not ok]
        if errors:
            # the first error that is not another rank's broken barrier is the cause
            cause = next(
                (e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0]
            )
            raise cause
        return results[0][1]

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def notices(self) -> list[str]:
        return self.model.notices

    @property
    def position(self) -> int:
        return self.model.position

    def prefill(self, ids, on_layer: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Every rank prefills ``ids``; ``on_layer`` (progress) is called from rank 0's thread."""
        return self._all("prefill", np.asarray(ids), rank0_args=(on_layer,) if on_layer else ())

    def agree(self, fields: dict[str, Any]) -> None:
        """:func:`runtime.comm.agree` over the ranks' ThreadGroup (RanksDisagree if not)."""
        self._all("agree", fields)

    def decode(self, token: int) -> np.ndarray:
        return self._all("decode", int(token))

    def reset(self) -> None:
        self._all("reset")

    def close(self) -> None:
        for q in self._inbox:
            q.put(None)

    def __enter__(self) -> InProcessRanks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
