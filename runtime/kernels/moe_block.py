"""Expert-parallel MoE on one rank: route, compute the local experts densely, all-reduce.

Every rank routes every token with the full router, then runs its own experts on all tokens and
weights each output by the token's routing weight for that expert (zero when not chosen). The
rank's global expert ids are an input array, so every rank runs the same kernel (one SPMD
compile); the all-reduce sums the ranks' partial outputs.
"""

import numpy as np

from runtime import ops
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
) -> np.ndarray:
    """x (T, H); expert_ids (E_l,) uint32; gate_up (E_l, H, 2I); down (E_l, I, H) -> (T, H)."""
    tokens, hidden = x.shape
    local = expert_ids.shape[0]
    weights, idx = moe_router(
        x, router_w, choice_bias, top_k=top_k, norm_topk=norm_topk, scaling=scaling
    )  # (T, k), (T, k)
    hit = idx[:, :, None] == expert_ids.astype(np.uint32)[None, None, :]  # (T, k, E_l)
    gate = np.sum(np.where(hit, weights[:, :, None], np.float32(0.0)), axis=1)  # (T, E_l)
    xs = np.broadcast_to(x[None, :, :], (local, tokens, hidden))  # (E_l, T, H)
    out = swiglu(xs, gate_up, down)  # (E_l, T, H)
    partial = np.sum(gate.T[:, :, None].astype(out.dtype) * out, axis=0)  # (T, H)
    return ops.all_reduce(partial.astype(x.dtype), comm)
