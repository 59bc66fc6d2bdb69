"""Full (global) causal attention on one rank's heads, with a KV cache of every position.

Tensor-parallel: the rank holds ``heads`` query heads and the ``kv_heads`` KV heads they read;
its slice of ``o`` turns their outputs into a partial hidden state, summed over ranks.
Prefill and decode share this kernel: new K/V are written at ``positions`` (a runtime input),
then the queries attend over the whole cache, masked causally by position.
"""

import numpy as np

from runtime import ops
from runtime.kernels.rope_partial import rope_partial
from runtime.kernels.softmax import softmax

NEG = np.float32(-1e30)  # masked logits; exp() of them is exactly 0


def project_qkv(x, qkv_w, cos, sin, *, heads, kv_heads, head_dim, v_head_dim, value_scale):
    """x (T, H), qkv_w (H, heads*D + kv*D + kv*Dv) -> q (T, heads, D), k (T, kv, D), v (T, kv, Dv).

    RoPE is applied to q and k; v is multiplied by ``value_scale`` (0.707).
    """
    tokens = x.shape[0]
    qkv = np.matmul(x, qkv_w).astype(np.float32)  # (T, q+k+v)
    nq, nk = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :nq].reshape(tokens, heads, head_dim)
    k = qkv[:, nq : nq + nk].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, nq + nk :].reshape(tokens, kv_heads, v_head_dim) * np.float32(value_scale)
    return rope_partial(q, cos, sin), rope_partial(k, cos, sin), v


def project_out(out, o_w, dtype, comm):
    """out (T, heads*Dv) through this rank's rows of ``o`` (heads*Dv, H), summed over ranks."""
    partial = np.matmul(out.astype(dtype), o_w).astype(dtype)  # (T, H) partial
    return ops.all_reduce(partial, comm)


def attend(q, keys, values, valid, scale, sinks=None):
    """q (T, h, D), keys (K, h_kv, D), values (K, h_kv, Dv), valid (T, K) -> (T, h*Dv).

    Query heads read KV head ``h // (h / h_kv)``. With ``sinks`` (h,), each head's sink logit is an
    extra softmax column that carries no value. Both matmuls run in the keys' / values' dtype
    (q and the probabilities are cast to it); scores and softmax are float32.
    """
    tokens, heads, _ = q.shape
    group = heads // keys.shape[1]
    k = np.repeat(keys, group, axis=1).transpose(1, 2, 0)  # (h, D, K)
    v = np.repeat(values, group, axis=1).transpose(1, 0, 2)  # (h, K, Dv)
    qt = q.transpose(1, 0, 2).astype(keys.dtype)
    scores = np.matmul(qt, k).astype(np.float32) * np.float32(scale)  # (h, T, K)
    scores = np.where(valid[None, :, :], scores, NEG)
    if sinks is None:
        probs = softmax(scores)
    else:
        sink = sinks.astype(np.float32)[:, None, None]  # (h, 1, 1)
        m = np.maximum(np.max(scores, axis=-1, keepdims=True), sink)
        e = np.exp(scores - m)
        probs = e / (np.sum(e, axis=-1, keepdims=True) + np.exp(sink - m))
    out = np.matmul(probs.astype(values.dtype), v).astype(np.float32)  # (h, T, Dv)
    return out.transpose(1, 0, 2).reshape(tokens, -1)


def attention_full(
    x: np.ndarray,
    qkv_w: np.ndarray,
    o_w: np.ndarray,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    positions: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    value_scale: float,
    comm,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """x (T, H) normed; cache_k (S, kv, D), cache_v (S, kv, Dv) updated in place -> (T, H).

    ``sinks`` (heads,): per-head sink logits, when the config gives full layers sinks (MiMo-V2-Flash
    does not).
    """
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
    cache_k[positions] = k.astype(cache_k.dtype)  # scatter (T, kv, D)
    cache_v[positions] = v.astype(cache_v.dtype)
    key_pos = np.arange(cache_k.shape[0], dtype=np.int32)  # (S,)
    valid = key_pos[None, :] <= positions[:, None]  # (T, S) causal
    out = attend(q, cache_k, cache_v, valid, head_dim**-0.5, sinks=sinks)  # (T, heads*Dv)
    return project_out(out, o_w, x.dtype, comm)
