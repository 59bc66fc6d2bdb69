"""The few operations whose implementation differs between plain NumPy and an nkipy trace.

Kernels call these instead of NumPy for top-k, collectives and constants. On CPU they are
NumPy (and the project's communicators); while nkipy traces a kernel for Trainium they emit
nkipy's ops. nkipy is never imported unless a trace is already running, so kernels import on
any machine.
"""

from __future__ import annotations

import sys

import numpy as np


def is_tracing() -> bool:
    """True while nkipy traces a kernel (its backend is then not ``"cpu"``)."""
    backend = sys.modules.get("nkipy.core.backend")
    return backend is not None and backend.get_backend() != "cpu"


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of the last axis, descending, and their ``uint32`` indices.

    Ties resolve to the lower index on CPU (a stable sort); the device's order may differ.
    """
    if is_tracing():
        from nkipy.core import tensor_apis

        return tensor_apis.topk(x, k=k, axis=-1)
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx.astype(np.uint32)


def all_reduce(x: np.ndarray, comm) -> np.ndarray:
    """Sum of ``x`` over the ranks of ``comm`` (every rank gets the sum)."""
    if is_tracing():
        import nkipy.distributed.collectives as cc

        return cc.all_reduce(x, replica_groups=comm.replica_groups, reduce_op=np.add)
    return comm.all_reduce(x)


def all_gather(x: np.ndarray, comm, axis: int) -> np.ndarray:
    """The ranks' ``x`` concatenated along ``axis``, in rank order."""
    if is_tracing():
        import nkipy.distributed.collectives as cc

        return cc.all_gather(x, all_gather_dim=axis % x.ndim, replica_groups=comm.replica_groups)
    return comm.all_gather(x, axis)


def constant(x: np.ndarray) -> np.ndarray:
    """A host array used inside a kernel (a compile-time constant when traced)."""
    if is_tracing():
        from nkipy.core import tensor_apis

        return tensor_apis.constant(x)
    return x
