"""The fused layer kernels (runtime/kernels/decoder.py) against the per-op kernels, on NumPy.

With float32 weights and caches a fused layer computes what the model's per-op chain computes
(``x + attention(rmsnorm(x))``, then ``+ mlp(rmsnorm(x))``); padded to a bucket, the real rows
are unchanged and padding never reaches a cache. FP8 experts dequantise inside the MoE kernel.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from nkipy_rules import check_kernel

from runtime.comm import SingleRank
from runtime.kernels import decoder
from runtime.kernels.attention_full import attention_full
from runtime.kernels.attention_swa import attention_swa
from runtime.kernels.dense_mlp import dense_mlp
from runtime.kernels.moe_block import moe_block
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.rope_partial import rope_tables
from runtime.resident import buckets, chunks, ring_writes

H, HEADS, KV, D, DV, ROT, E, I_MOE, I_DENSE = 64, 4, 2, 16, 8, 8, 4, 24, 40
S, WINDOW, EPS = 32, 9, 1e-6
RING = WINDOW - 1
rng = np.random.default_rng(0)


def f32(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


ATTN = {"heads": HEADS, "kv_heads": KV, "head_dim": D, "v_head_dim": DV, "value_scale": 0.707}
ROUTING = {"top_k": 2, "norm_topk": True, "scaling": 2.5}
W = {
    "input_norm": 1 + f32(H),
    "post_attn_norm": 1 + f32(H),
    "qkv_w": f32(H, HEADS * D + KV * (D + DV)),
    "o_w": f32(HEADS * DV, H),
    "sinks": f32(HEADS),
}
DENSE = {"gate_up": f32(H, 2 * I_DENSE), "down": f32(I_DENSE, H)}
MOE = {
    "router_w": f32(H, 8),
    "choice_bias": f32(8, scale=0.01),
    "expert_ids": np.array([1, 3, 4, 6], np.uint32),
    "gate_up": f32(E, H, 2 * I_MOE),
    "down": f32(E, I_MOE, H),
}


def per_op(kind, x, positions, cache, mlp):
    """The model's per-op chain for one layer (runtime/model.py), float32."""
    cos, sin = rope_tables(positions, 10000.0, ROT)
    comm = SingleRank()
    h = rmsnorm(x, W["input_norm"], EPS)
    args = {
        "x": h,
        "qkv_w": W["qkv_w"],
        "o_w": W["o_w"],
        "positions": positions,
        "cos": cos,
        "sin": sin,
        "sinks": W["sinks"],
        **cache,
    }
    if kind == "full":
        a = attention_full(**args, **ATTN, comm=comm)
    else:
        args["slots"] = (positions[-min(len(positions), RING) :] % RING).astype(np.int32)
        a = attention_swa(**args, **ATTN, window=WINDOW, comm=comm)
    x = x + a
    h = rmsnorm(x, W["post_attn_norm"], EPS)
    if mlp == "moe":
        return x + moe_block(h, **MOE, **ROUTING, comm=comm)
    return x + dense_mlp(h, **DENSE, comm=comm)


def empty_cache(kind, dtype=np.float32):
    if kind == "full":
        return {"cache_k": np.zeros((S, KV, D), dtype), "cache_v": np.zeros((S, KV, DV), dtype)}
    return {
        "ring_k": np.zeros((RING, KV, D), dtype),
        "ring_v": np.zeros((RING, KV, DV), dtype),
        "ring_pos": np.full((RING,), -1, np.int32),
    }


def fused(kind, mlp, x, start, count, bucket, cache, weights=None):
    """One fused layer call over ``count`` real tokens of ``x`` padded to ``bucket``."""
    padded = np.zeros((bucket, H), np.float32)
    padded[:count] = x
    positions = np.arange(start, start + bucket, dtype=np.int32)
    cos, sin = rope_tables(positions, 10000.0, ROT)
    args = {
        "x": padded,
        **W,
        **(weights or (MOE if mlp == "moe" else DENSE)),
        **cache,
        "positions": positions,
        "cos": cos,
        "sin": sin,
    }
    if kind == "full":
        args |= {"write": positions % S, "keep": (np.arange(bucket) < count).astype(np.int32)}
    else:
        args |= ring_writes(start, count, bucket, RING)
    static = {**ATTN, "eps": EPS, "comm": SingleRank(), **(ROUTING if mlp == "moe" else {})}
    if kind == "sliding":
        static["window"] = WINDOW
    return decoder.LAYER[(kind, mlp)](**args, **static)[:count]


KINDS = [(a, m) for a in ("full", "sliding") for m in ("dense", "moe")]


@pytest.mark.parametrize("kind, mlp", KINDS)
def test_fused_layer_equals_per_op_chain(kind, mlp):
    """Prefill then decode steps, unpadded: the fused layer is the per-op chain, exactly."""
    ref_cache, cache = empty_cache(kind), empty_cache(kind)
    steps = [(0, 12), (12, 1), (13, 1)]
    for start, count in steps:
        x = f32(count, H, scale=1.0)
        positions = np.arange(start, start + count, dtype=np.int32)
        want = per_op(kind, x, positions, ref_cache, mlp)
        got = fused(kind, mlp, x, start, count, count, cache)
        np.testing.assert_array_equal(got, want)
    for name in cache:
        np.testing.assert_array_equal(cache[name], ref_cache[name])


@pytest.mark.parametrize("kind, mlp", KINDS)
def test_padding_to_a_bucket_changes_no_real_row_and_no_cache_slot(kind, mlp):
    ref_cache, cache = empty_cache(kind), empty_cache(kind)
    for start, count, bucket in [(0, 5, 16), (5, 1, 1), (6, 11, 16), (17, 3, 8)]:
        x = f32(count, H, scale=1.0)
        want = fused(kind, mlp, x, start, count, count, ref_cache)
        got = fused(kind, mlp, x, start, count, bucket, cache)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for name in cache:
            np.testing.assert_allclose(cache[name], ref_cache[name], rtol=1e-4, atol=1e-5)


def e4m3_case(weight, block=128):
    """FP8 e4m3 codes and per-block scales of ``weight`` (E, K, N), and their exact value."""
    e, k, n = weight.shape
    gk, gn = -(-k // block), -(-n // block)
    scales = np.empty((e, gk, gn), np.float32)
    for i in range(gk):
        for j in range(gn):
            blk = weight[:, i * block : (i + 1) * block, j * block : (j + 1) * block]
            scales[:, i, j] = np.abs(blk).max(axis=(1, 2)) / 240 + 1e-12
    per = np.repeat(np.repeat(scales, block, 1)[:, :k], block, 2)[:, :, :n]
    codes = (weight / per).astype(ml_dtypes.float8_e4m3)
    return codes, scales, codes.astype(np.float32) * per


def test_moe_kernel_takes_fp8_experts_with_block_scales():
    """Hand-built FP8 experts (ragged 128-blocks: K=130, N=200): the fused MoE layer with codes
    and scales equals the same layer with the dequantised weights given as float32."""
    big_h, inter = 130, 100
    x = f32(3, big_h, scale=1.0)
    h = rmsnorm(x, np.ones(big_h, np.float32), EPS)
    # the store's layout: gate and up quantised apart, their grids side by side
    parts = [e4m3_case(f32(E, big_h, inter)) for _ in ("gate", "up")]
    gu, gu_scale, gu_exact = (np.concatenate(p, axis=-1) for p in zip(*parts, strict=True))
    dn, dn_scale, dn_exact = e4m3_case(f32(E, inter, big_h))
    router = {
        "router_w": f32(big_h, 8),
        "choice_bias": MOE["choice_bias"],
        "expert_ids": MOE["expert_ids"],
    }
    comm = SingleRank()
    args = {**ROUTING, "comm": comm, "dtype": np.dtype(np.float32)}
    got = decoder.moe_mlp(
        h, **router, gate_up=gu, down=dn, gate_up_scale=gu_scale, down_scale=dn_scale, **args
    )
    want = decoder.moe_mlp(h, **router, gate_up=gu_exact, down=dn_exact, **args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        want,
        moe_block(h, **router, gate_up=gu_exact, down=dn_exact, **ROUTING, comm=comm),
        rtol=1e-5,
        atol=1e-6,
    )


def test_gate_up_scale_grid_of_gate_then_up():
    """The store's gate_up_scale holds gate's grid then up's grid (E, ceil(H/b), 2 ceil(I/b)):
    with I = 130 that is 4 columns, not ceil(260 / 128) = 3."""
    inter = 130
    gate, g_scale, g_exact = e4m3_case(f32(2, 64, inter))
    up, u_scale, u_exact = e4m3_case(f32(2, 64, inter))
    codes = np.concatenate([gate, up], axis=-1)
    scales = np.concatenate([g_scale, u_scale], axis=-1)
    assert scales.shape == (2, 1, 4)
    got = decoder.expert_weights(codes, scales, np.dtype(np.float32), 2)
    np.testing.assert_array_equal(got, np.concatenate([g_exact, u_exact], axis=-1))


@pytest.mark.parametrize("kind, mlp", KINDS)
def test_fused_kernels_follow_nkipy_tracing_rules(kind, mlp, monkeypatch):
    positions = np.arange(4, dtype=np.int32)
    cos, sin = rope_tables(positions, 10000.0, ROT)
    bf = ml_dtypes.bfloat16
    cache = empty_cache(kind, bf)
    arrays = {
        "x": f32(4, H),
        **{k: v.astype(bf) if v.ndim > 1 else v for k, v in W.items()},
        **{
            k: v.astype(bf) if v.dtype == np.float32 and v.ndim == 3 else v
            for k, v in (MOE if mlp == "moe" else DENSE).items()
        },
        **cache,
        "positions": positions,
        "cos": cos,
        "sin": sin,
    }
    static = {**ATTN, "eps": EPS, "comm": None, **(ROUTING if mlp == "moe" else {})}
    if kind == "full":
        arrays |= {"write": positions, "keep": np.ones(4, np.int32)}
    else:
        arrays |= ring_writes(0, 3, 4, RING)
        static["window"] = WINDOW
    assert check_kernel(decoder.LAYER[(kind, mlp)], arrays, static, monkeypatch) == []


def test_buckets_and_chunks():
    assert buckets(512) == (16, 32, 64, 128, 256, 512)
    assert buckets(100) == (16, 32, 64, 100)
    assert buckets(4096, largest=1024)[-1] == 1024
    sizes = buckets(512)
    assert [chunks(n, sizes) for n in (5, 37, 300)] == [[(5, 16)], [(37, 64)], [(300, 512)]]
    assert chunks(70, (16, 32)) == [(32, 32), (32, 32), (6, 16)]


def test_ring_writes_are_distinct_slots_with_the_last_tokens():
    for start, count, bucket in [(0, 3, 16), (10, 8, 8), (5, 20, 32), (7, 1, 1)]:
        w = ring_writes(start, count, bucket, RING)
        width = min(bucket, RING)
        assert all(v.shape == (width,) and v.dtype == np.int32 for v in w.values())
        assert len(set(w["slots"].tolist())) == width
        real = w["keep"] > 0
        last = np.arange(count)[-min(count, RING) :]
        assert w["src"][real].tolist() == last.tolist()
        assert (w["slots"][real] == (start + last) % RING).all()
