"""MiMo-V2-Flash's router: sigmoid scores, top-k chosen with a correction bias, normalised.

The correction bias only affects which experts are chosen; the weights are the unbiased scores
of the chosen experts, normalised to sum to 1 and scaled by ``routed_scaling_factor``.
"""

import numpy as np

from runtime import ops


def moe_router(
    x: np.ndarray,
    router_w: np.ndarray,
    choice_bias: np.ndarray,
    *,
    top_k: int,
    norm_topk: bool,
    scaling: float,
) -> tuple[np.ndarray, np.ndarray]:
    """x (T, H), router_w (H, E), choice_bias (E,) -> weights (T, k) f32, ids (T, k) uint32."""
    logits = np.matmul(x.astype(np.float32), router_w.astype(np.float32))  # (T, E)
    scores = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))  # sigmoid
    _, idx = ops.topk(scores + choice_bias, top_k)  # (T, k) uint32
    weights = np.take_along_axis(scores, idx.astype(np.int32), axis=-1)  # (T, k), unbiased
    if norm_topk:
        weights = weights / (np.sum(weights, axis=-1, keepdims=True) + np.float32(1e-20))
    return (weights * np.float32(scaling)).astype(np.float32), idx
