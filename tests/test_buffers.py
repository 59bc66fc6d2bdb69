"""Per-thread scratch pool: the buffer handed out survives eviction; views keep their contract;
one name is one buffer whatever the dtype asked."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import numpy as np

from pipeline import buffers
from pipeline.buffers import ALIGN, scratch

MIB = 1 << 20


def _in_fresh_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on a new thread (whose pool starts empty) and re-raise anything it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed back to the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _pool() -> dict:
    return buffers._local.pool


def test_growing_the_oldest_buffer_keeps_it(monkeypatch) -> None:
    monkeypatch.setattr(buffers, "POOL_BYTES", 300 * MIB)

    def sequence() -> None:
        scratch("a", (100 * MIB,), np.uint8)
        scratch("b", (200 * MIB,), np.uint8)
        a = scratch("a", (250 * MIB,), np.uint8)  # "a" is the oldest; room is made by dropping "b"
        assert a.shape == (250 * MIB,)
        assert list(_pool()) == ["a"]
        assert np.shares_memory(a, _pool()["a"])

    _in_fresh_thread(sequence)


def test_random_sequence_keeps_view_and_pool_contracts(monkeypatch) -> None:
    monkeypatch.setattr(buffers, "POOL_BYTES", MIB)
    names = ["read", "out", "grid", "idx"]
    dtypes = [np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)]

    def sequence() -> None:
        rng = random.Random(18)
        for _ in range(3000):
            name, dtype = rng.choice(names), rng.choice(dtypes)
            if rng.random() < 0.02:  # now and then one buffer alone is larger than the pool
                shape: tuple[int, ...] = (rng.randint(MIB // dtype.itemsize, MIB),)
            else:
                shape = tuple(rng.randint(0, 300) for _ in range(rng.randint(0, 3)))
            view = scratch(name, shape, dtype)

            assert view.shape == shape and view.dtype == dtype
            assert view.flags.c_contiguous
            assert view.ctypes.data % ALIGN == 0
            pool = _pool()
            assert list(pool)[-1] == name  # handed out as the most recently used buffer
            assert np.shares_memory(view, pool[name]) or view.size == 0
            others = sum(b.nbytes for k, b in pool.items() if k != name)
            assert len(pool) == 1 or others + pool[name].nbytes <= buffers.POOL_BYTES
            assert others <= buffers.POOL_BYTES

            view[...] = 1  # the whole view is writable memory of the requested size

    _in_fresh_thread(sequence)


def test_a_name_is_one_buffer_for_every_dtype() -> None:
    def sequence() -> None:
        codes = scratch("read", (4 * MIB,), np.uint8)
        rows = scratch("read", (MIB, 2), np.uint16)  # same bytes: no second allocation
        assert np.shares_memory(codes, rows)
        assert list(_pool()) == ["read"] and _pool()["read"].nbytes == 4 * MIB
        words = scratch("read", (2 * MIB,), np.float32)  # larger: the buffer is replaced
        assert _pool()["read"].nbytes == 8 * MIB and words.dtype == np.float32
        assert not np.shares_memory(words, codes)

    _in_fresh_thread(sequence)


def test_a_slightly_larger_request_reuses_the_touched_buffer() -> None:
    def sequence() -> None:
        gate = scratch("read", (2048, 4096 + 64), np.uint8)  # a routed expert's gate codes
        down = scratch("read", (4096, 2048 + 64), np.uint8)  # then its down codes: 1.6% larger
        assert np.shares_memory(gate, down)
        assert _pool()["read"].nbytes % buffers.GROW == 0
        small = scratch("idx", (1000,), np.uint8)  # up to GROW: exactly what is asked
        assert _pool()["idx"].nbytes == small.nbytes == 1000

    _in_fresh_thread(sequence)
