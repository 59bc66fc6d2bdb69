"""Expert-parallel MoE on one rank: route, compute the local experts densely, all-reduce.

Every rank routes every token with the full router, then runs its own experts on all tokens and
weights each output by the token's routing weight for that expert (zero when not chosen). The
rank's global expert ids are an input array, so every rank runs the same kernel (one SPMD
compile); the all-reduce sums the ranks' partial outputs.

Replicas: an expert may sit in several slots (the expert map, see ``pipeline.placement``). Slot
``j`` then computes only the tokens ``t`` with ``t % replica_count[j] == replica_index[j]``
(replicas numbered in rank order of their slots), so each routed (token, expert) pair is
computed exactly once over all ranks. Without the two arrays every slot has one replica.
"""

import numpy as np

from runtime import ops
from runtime.kernels.fp8_dequant import dequant_parts
from runtime.kernels.moe_router import moe_router
from runtime.kernels.swiglu import swiglu


def moe_block(
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
    """x (T, H); expert_ids (E_l,) uint32; gate_up (E_l, H, 2I); down (E_l, I, H) -> (T, H).

    ``replica_index``/``replica_count`` (E_l,) uint32: slot ``j``'s replica of its expert and the
    expert's replica count (default: 0 and 1, no replicas); ``positions`` (T,) int32, the tokens'
    absolute positions, choose the replica (:func:`replica_owner`; default ``0..T-1``).

    FP8 experts come with their scales (``gate_up_scale`` (E_l, ceil(H/128), 2 ceil(I/128)),
    ``down_scale`` (E_l, ceil(I/128), ceil(H/128))) and are dequantised blockwise here.
    """
    if gate_up_scale is not None:
        gate_up = dequant_parts(gate_up, gate_up_scale, 2)
        down = dequant_parts(down, down_scale, 1)
    tokens, hidden = x.shape
    local = expert_ids.shape[0]
    weights, idx = moe_router(
        x, router_w, choice_bias, top_k=top_k, norm_topk=norm_topk, scaling=scaling
    )  # (T, k), (T, k)
    hit = idx[:, :, None] == expert_ids.astype(np.uint32)[None, None, :]  # (T, k, E_l)
    if replica_count is not None:
        pos = np.arange(tokens, dtype=np.int32) if positions is None else positions
        hit = hit & replica_owner(pos, replica_index, replica_count)[:, None, :]
    gate = np.sum(np.where(hit, weights[:, :, None], np.float32(0.0)), axis=1)  # (T, E_l)
    xs = np.broadcast_to(x[None, :, :], (local, tokens, hidden))  # (E_l, T, H)
    out = swiglu(xs, gate_up, down)  # (E_l, T, H)
    partial = np.sum(gate.T[:, :, None].astype(out.dtype) * out, axis=0)  # (T, H)
    return ops.all_reduce(partial.astype(x.dtype), comm)


def replica_owner(
    positions: np.ndarray, replica_index: np.ndarray, replica_count: np.ndarray
) -> np.ndarray:
    """(T, E_l) bool: whether slot ``j`` computes the token at absolute position ``positions[t]``
    (``positions[t] % count[j] == index[j]``). By position, not by index in the call, so single-
    token decode steps go round the replicas too."""
    t = positions.astype(np.uint32)[:, None]  # (T, 1)
    count = replica_count.astype(np.uint32)[None, :]
    return (t % count) == replica_index.astype(np.uint32)[None, :]
