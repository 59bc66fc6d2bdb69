"""Sliding-window attention with attention sinks, on one rank's heads, with a ring-buffer cache.

A query at position p sees keys at positions ``(p - window, p]`` (``window`` keys, itself
included: 129 for MiMo-V2-Flash). The cache is a ring of ``window - 1`` slots holding the
previous tokens; slot ``j`` holds the absolute position ``ring_pos[j]`` (-1 when empty). The new
tokens attend over ring + themselves, then the last of them are written to the ring at host-
computed ``slots`` (``position % ring size``). Each head's sink logit (``sinks``, when the layer
has them: every sliding layer of MiMo-V2-Flash) takes probability mass.
"""

import numpy as np

from runtime.kernels.attention_full import attend, project_out, project_qkv


def attention_swa(
    x: np.ndarray,
    qkv_w: np.ndarray,
    o_w: np.ndarray,
    ring_k: np.ndarray,
    ring_v: np.ndarray,
    ring_pos: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    value_scale: float,
    window: int,
    comm,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """x (T, H) normed; ring_k (R, kv, D), ring_v (R, kv, Dv), ring_pos (R,) int32 updated in
    place; slots (min(T, R),) int32 -> (T, H)."""
    q, k, v = project_qkv(
        x,
        qkv_w,
        cos,
        sin,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        value_scale=value_scale,
    )
    keys = np.concatenate([ring_k.astype(np.float32), k], axis=0)  # (R+T, kv, D)
    values = np.concatenate([ring_v.astype(np.float32), v], axis=0)  # (R+T, kv, Dv)
    key_pos = np.concatenate([ring_pos, positions], axis=0)  # (R+T,)
    kp, qp = key_pos[None, :], positions[:, None]
    valid = (kp >= 0) & (kp <= qp) & (kp > qp - window)  # (T, R+T)
    out = attend(q, keys, values, valid, head_dim**-0.5, sinks=sinks)  # (T, heads*Dv)
    written = slots.shape[0]  # the last min(T, R) tokens enter the ring
    ring_k[slots] = k[-written:].astype(ring_k.dtype)
    ring_v[slots] = v[-written:].astype(ring_v.dtype)
    ring_pos[slots] = positions[-written:]
    return project_out(out, o_w, x.dtype, comm)
