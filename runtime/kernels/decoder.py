"""Fused device kernels: one call per decoder layer, composed from the per-op kernels.

A layer kernel runs ``x + attention(rmsnorm(x))`` then ``+ mlp(rmsnorm(x))`` with its collectives
inside, so the hidden state, the KV cache and the logits stay on the device between calls. The
four layer kinds (full or sliding attention, dense or MoE MLP) are four kernels (:data:`LAYER`);
every layer of a kind shares one compiled kernel per token count.

Dtypes (the device path, bf16 weights and caches):

- matmuls run in their weight's dtype (bf16): the activation is cast to it first, so both
  operands always share a dtype;
- float32: the residual stream ``x`` between kernels and the residual sums, norm statistics,
  RoPE, attention scores and softmax, the router (sigmoid, top-k, weights), the SwiGLU gate, the
  partial sums and their all-reduce, the logits;
- the KV caches are stored in their own dtype (bf16 on the device) and read in it.

On the CPU the same kernels run with float32 weights and caches and compute exactly what the
per-op kernels compute (``tests/test_device_layers.py``).

Padded prompts (prompt-length buckets): of the ``B`` tokens of a call only those with
``keep > 0`` are real; padding tokens follow the real ones. Writes of padding tokens into a cache
restore the slot's previous value, and their keys sit at positions after every real query, so
real outputs never see them; their own outputs are ignored by the host.
"""

import numpy as np

from runtime import ops
from runtime.kernels.attention_full import attend, project_qkv
from runtime.kernels.fp8_dequant import dequant_parts
from runtime.kernels.moe_router import moe_router
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.sampling import greedy, sample
from runtime.kernels.swiglu import swiglu

FP8_BLOCK = 128  # MiMo-V2-Flash's weight-scale blocks


# ------------------------------------------------------------------------------ attention
def _qkv(x, input_norm, qkv_w, cos, sin, eps, attn):
    h = rmsnorm(x, input_norm, eps).astype(qkv_w.dtype)  # float32 statistics, cast for the matmul
    return project_qkv(h, qkv_w, cos, sin, **attn)


def _out(out, o_w, comm):
    """:func:`project_out` with the matmul in ``o_w``'s dtype and a float32 all-reduce."""
    partial = np.matmul(out.astype(o_w.dtype), o_w).astype(np.float32)  # (T, H) partial
    return ops.all_reduce(partial, comm)


def _full_attention(
    x,
    input_norm,
    qkv_w,
    o_w,
    cache_k,
    cache_v,
    positions,
    write,
    keep,
    cos,
    sin,
    sinks,
    eps,
    attn,
    comm,
):
    """Attention of a full layer; cache rows ``write`` (T,) take the kept tokens' K/V."""
    q, k, v = _qkv(x, input_norm, qkv_w, cos, sin, eps, attn)
    kept = keep[:, None, None] > 0  # (T, 1, 1)
    new_k = np.where(kept, k.astype(cache_k.dtype), cache_k[write])
    new_v = np.where(kept, v.astype(cache_v.dtype), cache_v[write])
    cache_k[write] = new_k
    cache_v[write] = new_v
    key_pos = np.arange(cache_k.shape[0], dtype=np.int32)  # (S,)
    valid = key_pos[None, :] <= positions[:, None]  # (T, S) causal
    out = attend(q, cache_k, cache_v, valid, attn["head_dim"] ** -0.5, sinks=sinks)
    return _out(out, o_w, comm)  # (T, H) float32


def _sliding_attention(
    x,
    input_norm,
    qkv_w,
    o_w,
    ring_k,
    ring_v,
    ring_pos,
    positions,
    src,
    slots,
    keep,
    cos,
    sin,
    sinks,
    eps,
    attn,
    window,
    comm,
):
    """Attention of a sliding layer; ring ``slots`` (W,) take token rows ``src`` (W,) where
    ``keep`` (W,) > 0 and keep their contents elsewhere."""
    q, k, v = _qkv(x, input_norm, qkv_w, cos, sin, eps, attn)
    keys = np.concatenate([ring_k, k.astype(ring_k.dtype)], axis=0)  # (R+T, kv, D)
    values = np.concatenate([ring_v, v.astype(ring_v.dtype)], axis=0)  # (R+T, kv, Dv)
    key_pos = np.concatenate([ring_pos, positions], axis=0)  # (R+T,)
    kp, qp = key_pos[None, :], positions[:, None]
    valid = (kp >= 0) & (kp <= qp) & (kp > qp - window)  # (T, R+T)
    out = attend(q, keys, values, valid, attn["head_dim"] ** -0.5, sinks=sinks)
    kept = keep > 0  # (W,)
    new_k = np.where(
        kept[:, None, None], np.take(k, src, axis=0).astype(ring_k.dtype), ring_k[slots]
    )
    new_v = np.where(
        kept[:, None, None], np.take(v, src, axis=0).astype(ring_v.dtype), ring_v[slots]
    )
    new_pos = np.where(kept, np.take(positions, src, axis=0), ring_pos[slots])
    ring_k[slots] = new_k
    ring_v[slots] = new_v
    ring_pos[slots] = new_pos
    return _out(out, o_w, comm)


# ------------------------------------------------------------------------------------ MLP
def expert_weights(codes, scale, dtype, parts):
    """Expert weights as matmul operands of ``dtype``: as stored, or FP8 codes (E_l, K, N)
    times their block scales (``gate_up``: 2 parts, gate's grid then up's; ``down``: 1)."""
    if scale is None:
        return codes
    return dequant_parts(codes, scale, parts, FP8_BLOCK).astype(dtype)


def moe_mlp(
    h,
    router_w,
    choice_bias,
    expert_ids,
    gate_up,
    down,
    *,
    top_k,
    norm_topk,
    scaling,
    comm,
    dtype,
    gate_up_scale=None,
    down_scale=None,
    replica_index=None,
    replica_count=None,
    positions=None,
):
    """:func:`runtime.kernels.moe_block.moe_block` with optional FP8 experts and a float32
    partial sum and all-reduce. h (T, H) -> (T, H) float32 summed over ranks. Replicated
    experts (``replica_index``/``replica_count`` (E_l,) uint32) split the tokens by their
    absolute ``positions`` (T,) int32, as there."""
    tokens, hidden = h.shape
    local = expert_ids.shape[0]
    weights, idx = moe_router(
        h, router_w, choice_bias, top_k=top_k, norm_topk=norm_topk, scaling=scaling
    )  # (T, k) float32, (T, k) uint32
    hit = idx[:, :, None] == expert_ids.astype(np.uint32)[None, None, :]  # (T, k, E_l)
    if replica_count is not None:
        pos = np.arange(tokens, dtype=np.int32) if positions is None else positions
        t = pos.astype(np.uint32)[:, None]  # (T, 1)
        mine = (t % replica_count.astype(np.uint32)[None, :]) == replica_index.astype(np.uint32)
        hit = hit & mine[:, None, :]
    gate = np.sum(np.where(hit, weights[:, :, None], np.float32(0.0)), axis=1)  # (T, E_l)
    gu = expert_weights(gate_up, gate_up_scale, dtype, 2)
    dn = expert_weights(down, down_scale, dtype, 1)
    xs = np.broadcast_to(h.astype(gu.dtype)[None, :, :], (local, tokens, hidden))  # (E_l, T, H)
    out = swiglu(xs, gu, dn).astype(np.float32)  # (E_l, T, H)
    partial = np.sum(gate.T[:, :, None] * out, axis=0)  # (T, H) float32
    return ops.all_reduce(partial, comm)


def _mlp_dense(x, post_attn_norm, gate_up, down, eps, comm):
    """:func:`runtime.kernels.dense_mlp.dense_mlp` with the matmuls in the weights' dtype and a
    float32 all-reduce."""
    h = rmsnorm(x, post_attn_norm, eps).astype(gate_up.dtype)
    return ops.all_reduce(swiglu(h, gate_up, down).astype(np.float32), comm)


# ------------------------------------------------------------------------------- layers
def _moe_residual(x, post_attn_norm, experts, positions, eps, comm, dtype, **moe):
    """``x + moe_mlp(rmsnorm(x))``, the MoE half of a layer kernel: ``experts`` the router and
    expert arrays in :func:`moe_mlp`'s order, ``moe`` its keyword arguments."""
    h = rmsnorm(x, post_attn_norm, eps)
    return x + moe_mlp(h, *experts, positions=positions, comm=comm, dtype=dtype, **moe)


def _attn_static(heads, kv_heads, head_dim, v_head_dim, value_scale):
    return {
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "v_head_dim": v_head_dim,
        "value_scale": value_scale,
    }


def layer_full_dense(
    x,
    input_norm,
    post_attn_norm,
    qkv_w,
    o_w,
    gate_up,
    down,
    cache_k,
    cache_v,
    positions,
    write,
    keep,
    cos,
    sin,
    *,
    heads,
    kv_heads,
    head_dim,
    v_head_dim,
    value_scale,
    eps,
    comm,
    sinks=None,
):
    """A full-attention layer with the dense MLP. x (T, H) float32 -> (T, H) float32.

    positions (T,) int32 absolute; write (T,) int32 cache rows; keep (T,) int32 1 for real
    tokens; cos/sin (T, rot) float32; cache_k (S, kv, D), cache_v (S, kv, Dv) updated in place.
    """
    attn = _attn_static(heads, kv_heads, head_dim, v_head_dim, value_scale)
    x = x.astype(np.float32)
    x = x + _full_attention(
        x,
        input_norm,
        qkv_w,
        o_w,
        cache_k,
        cache_v,
        positions,
        write,
        keep,
        cos,
        sin,
        sinks,
        eps,
        attn,
        comm,
    )
    return x + _mlp_dense(x, post_attn_norm, gate_up, down, eps, comm)


def layer_full_moe(
    x,
    input_norm,
    post_attn_norm,
    qkv_w,
    o_w,
    router_w,
    choice_bias,
    expert_ids,
    gate_up,
    down,
    cache_k,
    cache_v,
    positions,
    write,
    keep,
    cos,
    sin,
    *,
    heads,
    kv_heads,
    head_dim,
    v_head_dim,
    value_scale,
    eps,
    top_k,
    norm_topk,
    scaling,
    comm,
    sinks=None,
    gate_up_scale=None,
    down_scale=None,
    replica_index=None,
    replica_count=None,
):
    """A full-attention layer with the MoE MLP (inputs as :func:`layer_full_dense`, plus the
    router and the rank's experts, optionally FP8 with block scales)."""
    attn = _attn_static(heads, kv_heads, head_dim, v_head_dim, value_scale)
    x = x.astype(np.float32)
    x = x + _full_attention(
        x,
        input_norm,
        qkv_w,
        o_w,
        cache_k,
        cache_v,
        positions,
        write,
        keep,
        cos,
        sin,
        sinks,
        eps,
        attn,
        comm,
    )
    experts = (router_w, choice_bias, expert_ids, gate_up, down)
    return _moe_residual(
        x, post_attn_norm, experts, positions, eps, comm, qkv_w.dtype,
        top_k=top_k, norm_topk=norm_topk, scaling=scaling,
        gate_up_scale=gate_up_scale, down_scale=down_scale,
        replica_index=replica_index, replica_count=replica_count,
    )


def layer_swa_dense(
    x,
    input_norm,
    post_attn_norm,
    qkv_w,
    o_w,
    gate_up,
    down,
    ring_k,
    ring_v,
    ring_pos,
    positions,
    src,
    slots,
    keep,
    cos,
    sin,
    *,
    heads,
    kv_heads,
    head_dim,
    v_head_dim,
    value_scale,
    window,
    eps,
    comm,
    sinks=None,
):
    """A sliding-window layer with the dense MLP. x (T, H) float32 -> (T, H) float32.

    ring_k (R, kv, D), ring_v (R, kv, Dv), ring_pos (R,) int32 updated in place: ring slots
    ``slots`` (W,) take token rows ``src`` (W,) where ``keep`` (W,) > 0, W = min(T, R).
    """
    attn = _attn_static(heads, kv_heads, head_dim, v_head_dim, value_scale)
    x = x.astype(np.float32)
    x = x + _sliding_attention(
        x,
        input_norm,
        qkv_w,
        o_w,
        ring_k,
        ring_v,
        ring_pos,
        positions,
        src,
        slots,
        keep,
        cos,
        sin,
        sinks,
        eps,
        attn,
        window,
        comm,
    )
    return x + _mlp_dense(x, post_attn_norm, gate_up, down, eps, comm)


def layer_swa_moe(
    x,
    input_norm,
    post_attn_norm,
    qkv_w,
    o_w,
    router_w,
    choice_bias,
    expert_ids,
    gate_up,
    down,
    ring_k,
    ring_v,
    ring_pos,
    positions,
    src,
    slots,
    keep,
    cos,
    sin,
    *,
    heads,
    kv_heads,
    head_dim,
    v_head_dim,
    value_scale,
    window,
    eps,
    top_k,
    norm_topk,
    scaling,
    comm,
    sinks=None,
    gate_up_scale=None,
    down_scale=None,
    replica_index=None,
    replica_count=None,
):
    """A sliding-window layer with the MoE MLP (inputs as :func:`layer_swa_dense` and
    :func:`layer_full_moe`)."""
    attn = _attn_static(heads, kv_heads, head_dim, v_head_dim, value_scale)
    x = x.astype(np.float32)
    x = x + _sliding_attention(
        x,
        input_norm,
        qkv_w,
        o_w,
        ring_k,
        ring_v,
        ring_pos,
        positions,
        src,
        slots,
        keep,
        cos,
        sin,
        sinks,
        eps,
        attn,
        window,
        comm,
    )
    experts = (router_w, choice_bias, expert_ids, gate_up, down)
    return _moe_residual(
        x, post_attn_norm, experts, positions, eps, comm, qkv_w.dtype,
        top_k=top_k, norm_topk=norm_topk, scaling=scaling,
        gate_up_scale=gate_up_scale, down_scale=down_scale,
        replica_index=replica_index, replica_count=replica_count,
    )


# (attention kind, MLP kind) -> the layer kernel; kinds as in mimo.config
LAYER = {
    ("full", "dense"): layer_full_dense,
    ("full", "moe"): layer_full_moe,
    ("sliding", "dense"): layer_swa_dense,
    ("sliding", "moe"): layer_swa_moe,
}
# state each layer kernel updates in place
LAYER_STATE = {
    layer_full_dense: ("cache_k", "cache_v"),
    layer_full_moe: ("cache_k", "cache_v"),
    layer_swa_dense: ("ring_k", "ring_v", "ring_pos"),
    layer_swa_moe: ("ring_k", "ring_v", "ring_pos"),
}


def final_logits(x, norm_w, lm_head_w, *, eps, comm):
    """The final norm and ``lm_head`` of the device path (:func:`runtime.kernels.logits.logits`
    with the matmul in ``lm_head_w``'s dtype): x (T, H) float32 -> (T, V) float32, gathered
    over ranks."""
    normed = rmsnorm(x, norm_w, eps).astype(lm_head_w.dtype)
    local = np.matmul(normed, lm_head_w).astype(np.float32)  # (T, V/N)
    return ops.all_gather(local, comm, axis=-1)


def next_token(logits, row, u, *, temperature, top_k, top_p):
    """The next token from row ``row`` (1,) int32 of logits (T, V) float32: greedy when
    ``temperature`` is None, else :func:`runtime.kernels.sampling.sample` with ``u`` (1,)
    float32 in [0, 1). -> (1,) int32."""
    chosen = np.take(logits, row, axis=0)[0]  # (V,)
    if temperature is None:
        token = greedy(chosen)
    else:
        token = sample(chosen, u[0], temperature=temperature, top_k=top_k, top_p=top_p)
    return np.reshape(token, (1,)).astype(np.int32)
