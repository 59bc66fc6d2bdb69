"""Runs a conversion's units on worker threads, committing them in batches.

Units run in plan order while a source is still downloading (its files arrive in that order);
when every source file is already on disk, the largest units run first, so the end of the run
is not one worker finishing a large unit while the others idle.

A few units wait queued beyond the running ones so workers stay busy while the main thread
journals. A unit starts only once its source files are on disk (a downloading source says so
through ``Source.ready``), so no worker waits for a download while others could run. Finished
units are handed to ``commit`` at most every ``COMMIT_SECONDS`` or ``COMMIT_BYTES``, and once
more at the end, error or not: whatever finished is durable and journaled. The first error stops
new work, closes the source (a unit waiting for a download gives up) and is re-raised after the
running units drain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pipeline.plan import Unit
from pipeline.source import Source

COMMIT_SECONDS = float(os.environ.get("MIMO_SHARD_COMMIT_SECONDS", "1.0"))  # journal this often
COMMIT_BYTES = 1 << 30  # ... or after this many output bytes
QUEUED_AHEAD = 2  # units submitted beyond the running ones (they hold no memory until they start)
SOURCE_POLL_SECONDS = 0.05  # how often to look for downloaded files

Records = list[dict[str, Any]]


def run_units(
    pending: list[Unit],
    work: Callable[[Unit], Records],
    commit: Callable[[list[tuple[Unit, Records]]], None],
    source: Source,
    file_of: dict[str, str],
    workers: int,
) -> None:
    """Execute ``pending`` with ``workers`` threads; ``commit`` receives finished units."""
    finished: list[tuple[Unit, Records]] = []
    last_commit, uncommitted = time.monotonic(), 0

    def flush() -> None:
        nonlocal last_commit, uncommitted
        commit(list(finished))
        finished.clear()
        last_commit, uncommitted = time.monotonic(), 0

    def startable(u: Unit) -> bool:
        return all(source.ready(file_of[s]) for s in u.sources)

    queue = list(reversed(pending))  # popped from the end: plan order (a download's order)
    if all(startable(u) for u in pending):  # every file on disk: largest first, so the last
        queue.sort(key=lambda u: u.out_bytes)  # units to finish are small ones (stable sort)
    running: dict[Future, Unit] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unit") as pool:
        try:
            while queue or running:
                while queue and len(running) < workers + QUEUED_AHEAD and error is None:
                    if not startable(queue[-1]):
                        if running:
                            break  # its files are downloading: look again shortly
                        flush()  # nothing runs: release finished files, then wait in the unit
                    u = queue.pop()
                    running[pool.submit(work, u)] = u
                if not running:
                    break
                ready, _ = wait(running, timeout=SOURCE_POLL_SECONDS, return_when=FIRST_COMPLETED)
                for fut in ready:
                    u = running.pop(fut)
                    try:
                        finished.append((u, fut.result()))
                        uncommitted += u.out_bytes
                    except BaseException as e:  # noqa: BLE001 - re-raised after draining
                        error = error or e
                due = time.monotonic() - last_commit >= COMMIT_SECONDS
                if error is None and (due or uncommitted >= COMMIT_BYTES):
                    flush()
                if error is not None:
                    queue.clear()
                    source.close()
        except BaseException as e:
            error = error or e
            queue.clear()
            for fut in running:
                fut.cancel()
        finally:
            if error is not None:
                source.close()
    flush()
    if error is not None:
        raise error
