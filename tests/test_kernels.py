"""Each kernel against an independent reference written here; every kernel obeys nkipy's rules."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import ops
from runtime.comm import SingleRank, ThreadGroup
from runtime.kernels.attention_full import attention_full
from runtime.kernels.attention_swa import attention_swa
from runtime.kernels.dense_mlp import dense_mlp
from runtime.kernels.logits import logits
from runtime.kernels.moe_block import moe_block
from runtime.kernels.moe_router import moe_router
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.rope_partial import rope_partial, rope_tables
from runtime.kernels.sampling import greedy, sample
from runtime.kernels.softmax import softmax
from runtime.kernels.swiglu import swiglu
from runtime.kernels.token_embedding import token_embedding
from tests.nkipy_rules import check_kernel

KERNELS = Path(__file__).resolve().parent.parent / "runtime" / "kernels"
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_rmsnorm():
    x, w = randn(5, 64, scale=3), randn(64)
    want = torch.tensor(w) * (
        torch.tensor(x) * torch.rsqrt(torch.tensor(x).pow(2).mean(-1, keepdim=True) + 1e-5)
    )
    np.testing.assert_allclose(rmsnorm(x, w, 1e-5), want.numpy(), rtol=1e-5, atol=1e-6)


def test_softmax():
    x = randn(3, 7, 50, scale=10)
    np.testing.assert_allclose(
        softmax(x), torch.softmax(torch.tensor(x), -1).numpy(), rtol=1e-5, atol=1e-7
    )


def test_rope_partial_rotates_the_first_dims_only():
    x = randn(6, 3, 192)
    pos = np.array([0, 1, 2, 7, 100, 5000], np.int32)
    cos, sin = rope_tables(pos, 10_000.0, 64)
    out = rope_partial(x, cos, sin)
    np.testing.assert_array_equal(out[..., 64:], x[..., 64:])
    for t, p in enumerate(pos):  # pair (i, i+32) rotated by angle p / theta^(2i/64)
        for i in range(32):
            ang = p / 10_000.0 ** (2 * i / 64)
            a, b = x[t, :, i], x[t, :, i + 32]
            np.testing.assert_allclose(out[t, :, i], a * np.cos(ang) - b * np.sin(ang), atol=2e-3)
            np.testing.assert_allclose(
                out[t, :, i + 32], b * np.cos(ang) + a * np.sin(ang), atol=2e-3
            )


def test_token_embedding():
    table = randn(50, 8)
    ids = np.array([3, 0, 49, 3], np.int32)
    np.testing.assert_array_equal(token_embedding(ids, table), table[[3, 0, 49, 3]])


def ref_attention(q, k, v, allowed, sinks=None):
    """Per head and query, softmax over the allowed keys (plus the sink), written longhand."""
    t, h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros((t, h, v.shape[-1]), np.float64)
    for i in range(t):
        for j in range(h):
            keys = [s for s in range(k.shape[0]) if allowed(i, s)]
            logit = np.array([q[i, j] @ k[s, j // group] / np.sqrt(d) for s in keys])
            z = np.exp(logit - logit.max())
            denom = z.sum() + (np.exp(sinks[j] - logit.max()) if sinks is not None else 0.0)
            out[i, j] = sum(z[n] / denom * v[s, j // group] for n, s in enumerate(keys))
    return out.reshape(t, -1)


def _qkv(h, heads, kv, d, dv):
    return randn(h, heads * d + kv * d + kv * dv, scale=h**-0.5)


def _projected(x, w, pos, heads, kv, d, dv, theta=5e6):
    cos, sin = rope_tables(pos, theta, 64)
    qkv = x @ w
    q = rope_partial(qkv[:, : heads * d].reshape(-1, heads, d), cos, sin)
    k = rope_partial(qkv[:, heads * d : heads * d + kv * d].reshape(-1, kv, d), cos, sin)
    v = qkv[:, heads * d + kv * d :].reshape(-1, kv, dv) * np.float32(0.707)
    return q, k, v, cos, sin


@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_full_prefill_then_decode(with_sinks):
    """MiMo-V2-Flash's full layers have no sinks; a config may give them some."""
    h, heads, kv, d, dv, seq = 32, 4, 2, 192, 128, 12
    w, o = _qkv(h, heads, kv, d, dv), randn(heads * dv, h, scale=0.1)
    x = randn(seq, h)
    pos = np.arange(seq, dtype=np.int32)
    q, k, v, cos, sin = _projected(x, w, pos, heads, kv, d, dv)
    sinks = randn(heads) if with_sinks else None
    want = ref_attention(q, k, v, lambda i, s: s <= i, sinks) @ o
    ck, cv = np.zeros((16, kv, d), np.float32), np.zeros((16, kv, dv), np.float32)
    static = dict(
        heads=heads, kv_heads=kv, head_dim=d, v_head_dim=dv, value_scale=0.707, comm=SingleRank()
    )
    if with_sinks:
        static["sinks"] = sinks
    got = attention_full(x[:9], w, o, ck, cv, pos[:9], cos[:9], sin[:9], **static)
    for t in range(9, seq):  # decode: one token at a time against the cache
        got = np.concatenate(
            [
                got,
                attention_full(
                    x[t : t + 1],
                    w,
                    o,
                    ck,
                    cv,
                    pos[t : t + 1],
                    cos[t : t + 1],
                    sin[t : t + 1],
                    **static,
                ),
            ]
        )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ck[:seq], k, rtol=1e-4, atol=1e-5)  # the cache holds every k


@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("split", [30, 3, 1])
def test_attention_swa_window_sinks_and_ring(split, with_sinks):
    """A window of 9 keys (ring of 8), a prompt of 30: prefill ``split`` tokens, decode the rest."""
    h, heads, kv, d, dv, seq, window = 32, 4, 2, 192, 128, 30, 9
    w, o = _qkv(h, heads, kv, d, dv), randn(heads * dv, h, scale=0.1)
    sinks = randn(heads) if with_sinks else None
    x = randn(seq, h)
    pos = np.arange(seq, dtype=np.int32)
    q, k, v, cos, sin = _projected(x, w, pos, heads, kv, d, dv, theta=1e4)
    want = ref_attention(q, k, v, lambda i, s: i - window < s <= i, sinks) @ o
    ring = window - 1
    rk, rv = np.zeros((ring, kv, d), np.float32), np.zeros((ring, kv, dv), np.float32)
    rp = np.full(ring, -1, np.int32)
    static = dict(
        heads=heads,
        kv_heads=kv,
        head_dim=d,
        v_head_dim=dv,
        value_scale=0.707,
        window=window,
        comm=SingleRank(),
    )
    outs, start = [], 0
    for stop in [split, *range(split + 1, seq + 1)]:
        p = pos[start:stop]
        slots = p[-min(len(p), ring) :] % ring
        outs.append(
            attention_swa(
                x[start:stop],
                w,
                o,
                rk,
                rv,
                rp,
                p,
                slots.astype(np.int32),
                cos[start:stop],
                sin[start:stop],
                **static,
                **({"sinks": sinks} if sinks is not None else {}),
            )
        )
        start = stop
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-4, atol=1e-5)
    assert sorted(rp.tolist()) == list(range(seq - ring, seq))  # the ring holds the last 8


def ref_router(x, w, bias, k):
    """transformers' MiMoV2FlashTopkRouter (n_group = 1), in torch."""
    s = torch.sigmoid(torch.tensor(x) @ torch.tensor(w))
    idx = torch.topk(s + torch.tensor(bias), k, dim=-1).indices
    wts = s.gather(1, idx)
    return wts / (wts.sum(-1, keepdim=True) + 1e-20), idx


def test_moe_router_bias_chooses_but_does_not_weigh():
    x, w, bias = randn(20, 16), randn(16, 12), randn(12, scale=0.5)
    got_w, got_i = moe_router(x, w, bias, top_k=3, norm_topk=True, scaling=1.0)
    want_w, want_i = ref_router(x, w, bias, 3)
    assert got_i.dtype == np.uint32
    for t in range(20):
        order = np.argsort(got_i[t])
        assert sorted(got_i[t].tolist()) == sorted(want_i[t].tolist())
        np.testing.assert_allclose(np.sort(got_w[t]), np.sort(want_w[t].numpy()), rtol=1e-5)
        assert order is not None
    np.testing.assert_allclose(got_w.sum(-1), 1.0, rtol=1e-5)
    # the bias changed the choice for some tokens (it is not a no-op in this test)
    plain = moe_router(x, w, np.zeros(12, np.float32), top_k=3, norm_topk=True, scaling=1.0)[1]
    assert any(set(a) != set(b) for a, b in zip(plain.tolist(), got_i.tolist(), strict=True))


def test_moe_expert_is_swiglu():
    x, gu, dn = randn(4, 16), randn(16, 2 * 10, scale=0.3), randn(10, 16, scale=0.3)
    g, u = torch.tensor(x @ gu[:, :10]), torch.tensor(x @ gu[:, 10:])
    want = (torch.nn.functional.silu(g) * u).numpy() @ dn
    np.testing.assert_allclose(swiglu(x, gu, dn), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_moe_block_expert_parallel_equals_dense_reference(world):
    tokens, h, inter, experts, k = 6, 16, 8, 8, 3
    x, rw, bias = randn(tokens, h), randn(h, experts), randn(experts, scale=0.3)
    gu, dn = randn(experts, h, 2 * inter, scale=0.3), randn(experts, inter, h, scale=0.3)
    wts, idx = ref_router(x, rw, bias, k)
    want = np.zeros((tokens, h), np.float32)
    for t in range(tokens):  # only the chosen experts, weighted
        for j in range(k):
            e = int(idx[t, j])
            want[t] += wts[t, j].item() * swiglu(x[t : t + 1], gu[e], dn[e])[0]
    comms = ThreadGroup.create(world)
    per = experts // world
    got = [None] * world

    def rank(r):
        ids = np.arange(r * per, (r + 1) * per, dtype=np.uint32)[::-1].copy()  # any stored order
        sl = ids.astype(np.int64)
        got[r] = moe_block(
            x, rw, bias, ids, gu[sl], dn[sl], top_k=k, norm_topk=True, scaling=1.0, comm=comms[r]
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in range(world):
        np.testing.assert_allclose(got[r], want, rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(got[0], g) for g in got)  # every rank holds the same sum


def test_logits_gather_vocabulary_in_rank_order():
    h, v, world = 8, 12, 3
    x, norm, head = randn(2, h), randn(h), randn(h, v)
    comms = ThreadGroup.create(world)
    got = [None] * world

    def rank(r):
        got[r] = logits(x, norm, head[:, r * 4 : (r + 1) * 4], eps=1e-5, comm=comms[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    np.testing.assert_allclose(got[1], rmsnorm(x, norm, 1e-5) @ head, rtol=1e-5)


def test_greedy_and_sampling():
    lg = np.array([0.1, 3.0, -1.0, 2.5, 0.0], np.float32)
    assert greedy(lg) == 1
    probs = softmax(lg / 0.7)
    # u scans the cumulative distribution of the top-3
    top = np.argsort(-lg)[:3]
    p = probs[top] / probs[top].sum()
    cuts = np.cumsum(p)
    for u, want in (
        (0.0, top[0]),
        (cuts[0] - 1e-4, top[0]),
        (cuts[0] + 1e-4, top[1]),
        (cuts[1] + 1e-4, top[2]),
        (0.99999, top[2]),
    ):
        assert sample(lg, np.float32(u), temperature=0.7, top_k=3, top_p=1.0) == want
    # top-p 0.5: only the most likely token survives (its probability is above 0.5)
    assert p[0] > 0.5
    assert {
        int(sample(lg, np.float32(u), temperature=0.7, top_k=3, top_p=0.5))
        for u in np.linspace(0, 0.999, 50)
    } == {int(top[0])}
    # frequencies follow the probabilities
    draws = [
        int(sample(lg, np.float32(u), temperature=0.7, top_k=5, top_p=1.0))
        for u in (np.arange(4000) + 0.5) / 4000
    ]
    freq = np.bincount(draws, minlength=5) / 4000
    np.testing.assert_allclose(freq, probs, atol=2e-3)


def test_topk_shim():
    x = np.array([[1.0, 5.0, 3.0, 5.0]], np.float32)
    v, i = ops.topk(x, 3)
    assert i.dtype == np.uint32 and i.tolist() == [[1, 3, 2]] and v.tolist() == [[5.0, 5.0, 3.0]]


def _kernel_cases():
    h, heads, kv, d, dv, t = 16, 2, 1, 192, 128, 3
    pos = np.arange(t, dtype=np.int32)
    cos, sin = rope_tables(pos, 1e4, 64)
    attn = dict(heads=heads, kv_heads=kv, head_dim=d, v_head_dim=dv, value_scale=0.707, comm=None)
    x, w, o = randn(t, h), _qkv(h, heads, kv, d, dv), randn(heads * dv, h)
    return {
        "rmsnorm": (rmsnorm, {"x": x, "weight": randn(h)}, {"eps": 1e-5}),
        "softmax": (softmax, {"x": x}, {}),
        "rope_partial": (rope_partial, {"x": randn(t, 2, d), "cos": cos, "sin": sin}, {}),
        "token_embedding": (token_embedding, {"ids": pos, "table": randn(5, h)}, {}),
        "attention_full": (
            attention_full,
            {
                "x": x,
                "qkv_w": w,
                "o_w": o,
                "cache_k": np.zeros((8, kv, d), np.float32),
                "cache_v": np.zeros((8, kv, dv), np.float32),
                "positions": pos,
                "cos": cos,
                "sin": sin,
            },
            attn,
        ),
        "attention_swa": (
            attention_swa,
            {
                "x": x,
                "qkv_w": w,
                "o_w": o,
                "sinks": randn(heads),
                "ring_k": np.zeros((4, kv, d), np.float32),
                "ring_v": np.zeros((4, kv, dv), np.float32),
                "ring_pos": np.full(4, -1, np.int32),
                "positions": pos,
                "slots": pos % 4,
                "cos": cos,
                "sin": sin,
            },
            {**attn, "window": 5},
        ),
        "moe_router": (
            moe_router,
            {"x": x, "router_w": randn(h, 8), "choice_bias": randn(8)},
            {"top_k": 2, "norm_topk": True, "scaling": 1.0},
        ),
        "swiglu": (swiglu, {"x": x, "gate_up": randn(h, 12), "down": randn(6, h)}, {}),
        "moe_block": (
            moe_block,
            {
                "x": x,
                "router_w": randn(h, 8),
                "choice_bias": randn(8),
                "expert_ids": np.array([2, 3], np.uint32),
                "gate_up": randn(2, h, 12),
                "down": randn(2, 6, h),
            },
            {"top_k": 2, "norm_topk": True, "scaling": 1.0, "comm": None},
        ),
        "dense_mlp": (
            dense_mlp,
            {"x": x, "gate_up": randn(h, 12), "down": randn(6, h)},
            {"comm": None},
        ),
        "logits": (
            logits,
            {"h": x, "norm_w": randn(h), "lm_head_w": randn(h, 10)},
            {"eps": 1e-5, "comm": None},
        ),
        "greedy": (greedy, {"logits": randn(10)}, {}),
        "sample": (
            sample,
            {"logits": randn(10), "u": np.float32(0.3)},
            {"temperature": 0.8, "top_k": 4, "top_p": 0.9},
        ),
    }


@pytest.mark.parametrize("name", list(_kernel_cases()))
def test_kernels_follow_nkipy_tracing_rules(name, monkeypatch):
    kernel, arrays, static = _kernel_cases()[name]
    assert check_kernel(kernel, arrays, static, monkeypatch) == []


def test_rules_checker_catches_violations(monkeypatch):
    def bad(x):
        if x[0] > 0:  # control flow on a value
            pass
        y = x[x > 0]  # boolean mask
        return np.sort(y) * np.float64(2.0)  # sort, float64

    v = check_kernel(bad, {"x": randn(5)}, {}, monkeypatch)
    assert any("control flow" in s for s in v) and any("boolean" in s for s in v)
    assert any("sort" in s for s in v) and any("float64" in s for s in v)


def test_kernel_files_do_not_import_nkipy_or_torch():
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("nkipy", "torch", "neuronxcc") for n in names), path
