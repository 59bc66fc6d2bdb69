"""One rank of MiMo-V2-Flash over its device slice (``loader.open_device``).

Per decoder layer: ``x + attention(rmsnorm(x))`` then ``+ mlp(rmsnorm(x))``. Attention is
tensor-parallel on the rank's heads (all-reduce after ``o``); layer 0's dense MLP is split over
the intermediate dimension (all-reduce); MoE layers run the rank's experts (all-reduce); the final
norm and the rank's vocabulary slice of ``lm_head`` give logits gathered over ranks.

State: a KV cache per layer — every position for full-attention layers, a ring of the previous
``window - 1`` tokens for sliding layers. :meth:`RankModel.prefill` starts a sequence,
:meth:`RankModel.decode` extends it one token; both run the same kernels. Activations and caches
are float32; weights stay in the store's dtype (memory maps, never copied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loader import Device
from mimo.config import FULL, MOE, LayerSpec
from mimo.layout import layer_arrays
from runtime.backends import Backend, CpuBackend
from runtime.comm import Communicator, SingleRank
from runtime.kernels.attention_full import attention_full
from runtime.kernels.attention_swa import attention_swa
from runtime.kernels.dense_mlp import dense_mlp
from runtime.kernels.logits import logits
from runtime.kernels.moe_block import moe_block
from runtime.kernels.moe_router import moe_router
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.rope_partial import rope_tables
from runtime.kernels.token_embedding import token_embedding

ABSENT = np.float32(-1e30)  # choice bias of an expert the output does not hold

# layout key (mimo.layout) -> the kernel argument the layer's array is passed as
KERNEL_ARG = {
    "input_norm": "input_norm",
    "post_attn_norm": "post_attn_norm",
    "attn/qkv": "qkv_w",
    "attn/o": "o_w",
    "attn/sinks": "sinks",
    "router": "router_w",
    "router_bias": "router_bias",
    "experts/gate_up": "gate_up",
    "experts/gate_up_scale": "gate_up_scale",
    "experts/down": "down",
    "experts/down_scale": "down_scale",
    "mlp/gate_up": "gate_up",
    "mlp/down": "down",
}


MOE_OPTIONAL = ("gate_up_scale", "down_scale", "replica_index", "replica_count")


def replicas(per_rank: list[list[int]], rank: int) -> dict[str, np.ndarray]:
    """``replica_index``/``replica_count`` (E_l,) uint32 of ``rank``'s slots on one layer, from
    the layer's expert map (replicas numbered in rank order, then slot order); empty when no
    expert of the layer has more than one slot (every rank then runs the plain kernel)."""
    count: dict[int, int] = {}
    index = []
    for r, slots in enumerate(per_rank):
        for e in slots:
            if r == rank:
                index.append(count.get(e, 0))
            count[e] = count.get(e, 0) + 1
    if all(c == 1 for c in count.values()):
        return {}
    return {
        "replica_index": np.asarray(index, np.uint32),
        "replica_count": np.asarray([count[e] for e in per_rank[rank]], np.uint32),
    }


class SequenceTooLong(ValueError):
    """The sequence would exceed the model's ``max_seq_len``."""


@dataclass
class Layer:
    """Everything one decoder layer needs on this rank."""

    spec: LayerSpec
    weights: dict[str, np.ndarray]
    attn_static: dict[str, Any]
    mlp_static: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, np.ndarray] = field(default_factory=dict)


class RankModel:
    """The model as one rank sees it. Every rank of the output must run it in step."""

    def __init__(
        self,
        dev: Device,
        comm: Communicator | None = None,
        max_seq_len: int = 4096,
        backend: Backend | None = None,
    ) -> None:
        self.dev = dev
        self.cfg = dev.config
        self.comm = comm or SingleRank()
        if self.comm.world_size != dev.devices or self.comm.rank != dev.rank:
            raise ValueError(
                f"communicator is rank {self.comm.rank} of {self.comm.world_size}, the device is "
                f"rank {dev.rank} of {dev.devices}"
            )
        self.backend = backend or CpuBackend()
        self.max_seq_len = max_seq_len
        self.notices: list[str] = []
        # called as on_routing(layer, weights (T, k) f32, idx (T, k) uint32) for each MoE layer
        self.on_routing: Callable[[int, np.ndarray, np.ndarray], None] | None = None
        self.embed, self.norm, self.lm_head = dev["embed"], dev["norm"], dev["lm_head"]
        self.layers = [self._layer(i) for i in dev.layers]
        total = self.cfg.num_hidden_layers
        if len(dev.layers) < total:
            self.notices.append(
                f"{total - len(dev.layers)} of {total} layers are missing (the output holds "
                f"layers {_ranges(dev.layers)}); outputs are not the model's"
            )
        self.position = 0
        self.reset()

    # ----------------------------------------------------------------------------- set-up
    def _layer(self, index: int) -> Layer:
        dev, cfg = self.dev, self.cfg
        spec = cfg.layer(index)
        (h0, h1), (g0, g1) = dev.heads(index)
        fp8 = "expert_dtype" in dev.manifest["options"]
        w = {KERNEL_ARG[k.key]: dev[k.at(index)] for k in layer_arrays(spec, fp8)}
        static = {
            "heads": h1 - h0,
            "kv_heads": g1 - g0,
            "head_dim": spec.head_dim,
            "v_head_dim": spec.v_head_dim,
            "value_scale": cfg.attention_value_scale,
        }
        if spec.window is not None:
            static["window"] = spec.window
        layer = Layer(spec, w, static)
        if spec.mlp == MOE:
            w["choice_bias"], top_k = self._choice_bias(w.pop("router_bias"))
            w["expert_ids"] = np.asarray(dev.expert_map[index], dtype=np.uint32)
            w.update(replicas(dev.manifest["layout"]["expert_map"][str(index)], dev.rank))
            layer.mlp_static = {
                "top_k": top_k,
                "norm_topk": cfg.norm_topk_prob,
                "scaling": cfg.routed_scaling_factor,
            }
        return layer

    def _choice_bias(self, bias: np.ndarray) -> tuple[np.ndarray, int]:
        """The correction bias, with experts the output lacks made unchoosable."""
        cfg, present = self.cfg, self.dev.experts_subset
        out = np.array(bias, dtype=np.float32)
        if present is None:
            return out, cfg.num_experts_per_tok
        mask = np.ones(cfg.n_routed_experts, bool)
        mask[present] = False
        out[mask] = ABSENT
        top_k = min(cfg.num_experts_per_tok, len(present))
        note = (
            f"routing restricted to the {len(present)} converted experts of "
            f"{cfg.n_routed_experts} (top {top_k}); outputs differ from the full model"
        )
        if note not in self.notices:
            self.notices.append(note)
        return out, top_k

    def reset(self) -> None:
        """Forget the sequence: empty every KV cache."""
        self.position = 0
        for layer in self.layers:
            kv, d, dv = (layer.attn_static[k] for k in ("kv_heads", "head_dim", "v_head_dim"))
            if layer.spec.attention == FULL:
                layer.cache = {
                    "cache_k": np.zeros((self.max_seq_len, kv, d), np.float32),
                    "cache_v": np.zeros((self.max_seq_len, kv, dv), np.float32),
                }
            else:
                ring = layer.spec.window - 1
                layer.cache = {
                    "ring_k": np.zeros((ring, kv, d), np.float32),
                    "ring_v": np.zeros((ring, kv, dv), np.float32),
                    "ring_pos": np.full((ring,), -1, np.int32),
                }

    # ---------------------------------------------------------------------------- forward
    def prefill(
        self,
        ids: list[int] | np.ndarray,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Start a sequence with ``ids``; float32 logits (T, V) of every position.

        ``on_layer(done, total)`` is called after each decoder layer (progress reporting).
        """
        self.reset()
        return self._forward(np.asarray(ids), on_layer)

    def decode(self, token: int) -> np.ndarray:
        """Extend the sequence by one token; float32 logits (V,) of the next one."""
        return self._forward(np.asarray([token]))[0]

    def _forward(
        self, ids: np.ndarray, on_layer: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """Run ``ids`` (T,) at the next positions through every layer; logits (T, V)."""
        self._check(ids)
        run, eps, comm = self.backend.call, self.cfg.rms_norm_eps, self.comm
        positions = np.arange(self.position, self.position + ids.shape[0], dtype=np.int32)
        tables: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}
        x = run(token_embedding, {"ids": ids.astype(np.int32), "table": self.embed}, {})
        for done, layer in enumerate(self.layers, 1):
            s = layer.spec
            key = (s.rope_theta, s.rotary_dim)
            if key not in tables:
                tables[key] = rope_tables(positions, s.rope_theta, s.rotary_dim)
            h = run(rmsnorm, {"x": x, "weight": layer.weights["input_norm"]}, {"eps": eps})
            x = x + self._attention(layer, h, positions, *tables[key])
            h = run(rmsnorm, {"x": x, "weight": layer.weights["post_attn_norm"]}, {"eps": eps})
            x = x + self._mlp(layer, h, positions)
            if on_layer is not None:
                on_layer(done, len(self.layers))
        out = run(
            logits,
            {"h": x, "norm_w": self.norm, "lm_head_w": self.lm_head},
            {"eps": eps, "comm": comm},
        )
        self.position += ids.shape[0]
        return out

    def _check(self, ids: np.ndarray) -> None:
        tokens = ids.shape[0]
        if tokens == 0:
            raise ValueError("no tokens")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            bad = int(ids.max() if ids.max() >= self.cfg.vocab_size else ids.min())
            raise ValueError(
                f"token id {bad} is outside the vocabulary (0..{self.cfg.vocab_size - 1})"
            )
        if self.position + tokens > self.max_seq_len:
            raise SequenceTooLong(
                f"sequence of {self.position + tokens} tokens exceeds "
                f"max_seq_len {self.max_seq_len}"
            )

    def _attention(
        self, layer: Layer, h: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray
    ) -> np.ndarray:
        """The layer's attention on ``h`` (T, H), its KV cache updated in place; (T, H)."""
        w = layer.weights
        args = {
            **({"sinks": w["sinks"]} if "sinks" in w else {}),
            "x": h,
            "qkv_w": w["qkv_w"],
            "o_w": w["o_w"],
            "positions": positions,
            "cos": cos,
            "sin": sin,
            **layer.cache,
        }
        static = {**layer.attn_static, "comm": self.comm}
        if layer.spec.attention == FULL:
            return self.backend.call(attention_full, args, static, ("cache_k", "cache_v"))
        ring = layer.cache["ring_k"].shape[0]
        args["slots"] = (positions[-min(len(positions), ring) :] % ring).astype(np.int32)
        return self.backend.call(attention_swa, args, static, ("ring_k", "ring_v", "ring_pos"))

    def _mlp(self, layer: Layer, h: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The layer's dense MLP or MoE on ``h`` (T, H) at absolute ``positions`` (T,) (they
        choose among replicated experts); (T, H) summed over ranks."""
        w, comm = layer.weights, self.comm
        if layer.spec.mlp != MOE:
            args = {"x": h, "gate_up": w["gate_up"], "down": w["down"]}
            return self.backend.call(dense_mlp, args, {"comm": comm})
        if self.on_routing is not None:
            routed = moe_router(h, w["router_w"], w["choice_bias"], **layer.mlp_static)
            self.on_routing(layer.spec.index, *routed)
        args = {
            "x": h,
            "router_w": w["router_w"],
            "choice_bias": w["choice_bias"],
            "expert_ids": w["expert_ids"],
            "gate_up": w["gate_up"],
            "down": w["down"],
            **{k: w[k] for k in MOE_OPTIONAL if k in w},
        }
        if "replica_count" in args:
            args["positions"] = positions
        return self.backend.call(moe_block, args, {**layer.mlp_static, "comm": comm})


def _ranges(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    parts: list[list[int]] = []
    for i in indices:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
