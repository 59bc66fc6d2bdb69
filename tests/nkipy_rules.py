"""A checker for the tracing rules of nkipy (docs/nkipy.md §2), usable without nkipy.

Kernel inputs are wrapped in :class:`Strict`, an ndarray subclass that watches every NumPy call
made on them while the kernel runs, and records a violation for:

- a float64 result (nkipy's tracer rejects any float64 operand) or an int64 result;
- ``sort``/``argsort``/``einsum``/``searchsorted``/``nonzero`` and friends (no lowering);
- boolean-mask indexing, or more than one tensor index in a subscript;
- Python control flow on a tensor value (``bool(array)``).

Top-k and collectives go through ``runtime.ops``, which the checker swaps for plain versions (on
the device they are nkipy ops, not NumPy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from runtime import ops

BANNED = {
    np.sort,
    np.argsort,
    np.einsum,
    np.searchsorted,
    np.nonzero,
    np.argwhere,
    np.unique,
    np.flatnonzero,
    np.lexsort,
    np.partition,
    np.argpartition,
}


class Strict(np.ndarray):
    violations: list[str] = []

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        args = [_plain(i) for i in inputs]
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        _check(result, f"np.{ufunc.__name__}.{method}")
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if func in BANNED:
            Strict.violations.append(f"np.{func.__name__} is not traceable")
        result = func(*_tree(args), **{k: _tree(v) for k, v in kwargs.items()})
        _check(result, f"np.{func.__name__}")
        return _wrap(result)

    def astype(self, dtype, *args, **kwargs):
        if np.dtype(dtype) in (np.float64, np.int64):
            Strict.violations.append(f"astype({np.dtype(dtype)})")
        return _wrap(np.asarray(self).astype(dtype, *args, **kwargs))

    def _check_index(self, idx) -> None:
        items = idx if isinstance(idx, tuple) else (idx,)
        arrays = [i for i in items if isinstance(i, np.ndarray)]
        if any(a.dtype == np.bool_ for a in arrays):
            Strict.violations.append("boolean-mask indexing")
        if len(arrays) > 1:
            Strict.violations.append("more than one tensor index in a subscript")

    def __getitem__(self, idx):
        self._check_index(idx)
        return _wrap(np.asarray(self)[_tree(idx)])

    def __setitem__(self, idx, value):
        self._check_index(idx)
        np.asarray(self)[_tree(idx)] = _tree(value)

    def __bool__(self):
        Strict.violations.append("Python control flow on a tensor value")
        return bool(np.asarray(self))


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, Strict) else x


def _tree(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(i) for i in x)
    return _plain(x)


def _wrap(x):
    if isinstance(x, tuple):
        return tuple(_wrap(i) for i in x)
    if isinstance(x, np.generic):  # an element of a tensor is still a tensor when traced
        return np.asarray(x).view(Strict)
    if isinstance(x, np.ndarray) and not isinstance(x, Strict):
        return x.view(Strict)
    return x


def _check(result, where: str) -> None:
    for r in result if isinstance(result, tuple) else (result,):
        if isinstance(r, np.ndarray) and r.dtype in (np.float64, np.int64):
            Strict.violations.append(f"{where} produced {r.dtype}")


class _Comm:
    rank, world_size, replica_groups = 0, 1, [[0]]

    def all_reduce(self, x):
        return x

    def all_gather(self, x, axis):
        return x


def check_kernel(
    kernel: Callable[..., Any], arrays: dict[str, np.ndarray], static: dict[str, Any], monkeypatch
) -> list[str]:
    """Run ``kernel`` on Strict inputs; return the violations it made."""

    def topk(x, k):
        x = np.asarray(x)
        idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return _wrap(np.take_along_axis(x, idx, axis=-1)), _wrap(idx.astype(np.uint32))

    monkeypatch.setattr(ops, "topk", topk)
    Strict.violations = []
    wrapped = {k: np.array(v).view(Strict) for k, v in arrays.items()}
    static = {k: (_Comm() if k == "comm" else v) for k, v in static.items()}
    kernel(**wrapped, **static)
    return list(dict.fromkeys(Strict.violations))
