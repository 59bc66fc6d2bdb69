"""Backends: how the model executes a kernel.

The model calls every kernel through ``backend.call(kernel, arrays, static, state)``:

- ``arrays``: runtime inputs and weights (NumPy arrays or memory maps);
- ``static``: compile-time values (head counts, eps, the communicator);
- ``state``: names among ``arrays`` that the kernel updates in place (KV caches).

:class:`CpuBackend` runs the NumPy kernels. ``runtime.neuron.NeuronBackend`` compiles each
distinct (kernel, shapes, static) once with nkipy and keeps weights and caches on device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from runtime import ops
from runtime.buffers import thread_buffer
from runtime.cpu_fp8 import dequant_expert
from runtime.kernels.moe_block import moe_block, replica_owner
from runtime.kernels.moe_router import moe_router
from runtime.kernels.swiglu import swiglu
from runtime.kernels.token_embedding import token_embedding

BF16 = np.dtype(ml_dtypes.bfloat16)


class Backend(Protocol):
    name: str

    def call(
        self,
        kernel: Callable[..., Any],
        arrays: dict[str, np.ndarray],
        static: dict[str, Any],
        state: tuple[str, ...] = (),
    ) -> Any: ...


class CpuBackend:
    """Run the NumPy kernels on the host.

    NumPy has no bfloat16 matrix multiply: a float32 x bfloat16 ``matmul`` converts the whole weight
    into a fresh float32 array on every call. This backend converts bfloat16 weights into reused
    per-thread buffers before calling a kernel instead, and (unless ``exact``) runs MoE through
    :func:`moe_block_routed`, which computes each expert only on the tokens routed to it rather than
    densely on all tokens as the device kernel must. Both give the same function.
    """

    name = "cpu"

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact

    def call(
        self,
        kernel: Callable[..., Any],
        arrays: dict[str, np.ndarray],
        static: dict[str, Any],
        state: tuple[str, ...] = (),
    ) -> Any:
        if not self.exact:
            kernel = CPU_VARIANTS.get(kernel, kernel)
        keep = LAZY_ARGS.get(kernel, ())
        args = {
            k: (as_f32(k, v) if v.dtype == BF16 and k not in keep else v) for k, v in arrays.items()
        }
        return kernel(**args, **static)


def as_f32(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` as float32, in this thread's buffer called ``name`` (reused call after call).

    The result is only valid until the next call with the same name on the same thread.
    """
    out = thread_buffer(name, a.shape)
    np.copyto(out, a, casting="unsafe")
    return out


def moe_block_routed(
    x: np.ndarray,
    router_w: np.ndarray,
    choice_bias: np.ndarray,
    expert_ids: np.ndarray,
    gate_up: np.ndarray,
    down: np.ndarray,
    *,
    top_k: int,
    norm_topk: bool,
    scaling: float,
    comm,
    gate_up_scale: np.ndarray | None = None,
    down_scale: np.ndarray | None = None,
    replica_index: np.ndarray | None = None,
    replica_count: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`runtime.kernels.moe_block.moe_block` computing each local expert on its routed
    tokens only (data-dependent shapes: host only). x (T, H) -> (T, H) summed over ranks.
    FP8 experts are dequantised one routed expert at a time; a replicated expert's slot takes
    only its share of the tokens (the same rule as the device kernel)."""
    weights, idx = moe_router(
        x, router_w, choice_bias, top_k=top_k, norm_topk=norm_topk, scaling=scaling
    )  # (T, k), (T, k)
    partial = np.zeros(x.shape, np.float32)
    pos = np.arange(x.shape[0], dtype=np.int32) if positions is None else positions
    owner = (
        replica_owner(pos, replica_index, replica_count) if replica_count is not None else None
    )  # (T, E_l)
    for j, expert in enumerate(expert_ids.tolist()):
        hit = idx == expert  # (T, k)
        if owner is not None:
            hit &= owner[:, j : j + 1]
        rows = np.flatnonzero(hit.any(axis=1))
        if rows.size == 0:
            continue
        gate = np.sum(np.where(hit[rows], weights[rows], 0.0), axis=1, dtype=np.float32)  # (t,)
        if gate_up_scale is not None:
            gu = dequant_expert("expert_gate_up", gate_up[j], gate_up_scale[j], 2)
            dn = dequant_expert("expert_down", down[j], down_scale[j], 1)
        else:
            gu = as_f32("expert_gate_up", gate_up[j]) if gate_up.dtype == BF16 else gate_up[j]
            dn = as_f32("expert_down", down[j]) if down.dtype == BF16 else down[j]
        partial[rows] += gate[:, None] * swiglu(x[rows], gu, dn)
    return ops.all_reduce(partial.astype(x.dtype), comm)


CPU_VARIANTS: dict[Callable[..., Any], Callable[..., Any]] = {moe_block: moe_block_routed}
# arguments a kernel converts itself (only the rows or experts it touches)
LAZY_ARGS: dict[Callable[..., Any], tuple[str, ...]] = {
    moe_block_routed: ("gate_up", "down", "gate_up_scale", "down_scale"),
    token_embedding: ("table",),
}
