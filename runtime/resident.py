"""The device path: one fused kernel per layer, with every tensor resident on the device.

:class:`ResidentModel` runs a :class:`~runtime.model.RankModel`'s weights through the kernels of
:mod:`runtime.kernels.decoder` on a :class:`~runtime.neuron.NeuronBackend`. Per forward step the
host uploads the step's small inputs once (token ids, positions, cache rows, RoPE tables, padding
masks), shared by every layer; the hidden state goes from one kernel's ``output0`` to the next
kernel's ``x`` as a DeviceTensor (two buffers per bucket, used in turn); KV caches are bf16 device
tensors updated in place. The host reads back only the gathered logits (:meth:`prefill`,
:meth:`decode`), or, with :meth:`feed` and :meth:`pick`, only the chosen token id.

Prompt-length buckets: a step of ``T`` tokens runs at the smallest bucket ``B >= T``
(:func:`buckets`: powers of two from 16 up to ``max_seq_len``), padded and masked; a prompt longer
than the largest bucket runs in chunks of it. So the compiled kernels depend on the buckets, not on
the prompt lengths. Decode is its own bucket of one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from mimo.config import FULL
from runtime.kernels.decoder import LAYER, LAYER_STATE, final_logits, next_token
from runtime.kernels.rope_partial import rope_tables
from runtime.kernels.token_embedding import token_embedding
from runtime.model import RankModel, SequenceTooLong

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3)  # Trainium2's FP8: expert codes stored as uint8 bits
MIN_BUCKET = 16


def buckets(max_seq_len: int, smallest: int = MIN_BUCKET, largest: int | None = None) -> tuple:
    """Prefill lengths: powers of two from ``smallest``, then the top, ``min(largest,
    max_seq_len)`` (e.g. 16, 32, ..., 512 for 512)."""
    top = min(largest or max_seq_len, max_seq_len)
    sizes, b = [], smallest
    while b < top:
        sizes.append(b)
        b *= 2
    return (*sizes, top)


def chunks(tokens: int, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """(real tokens, bucket) per prefill call for a prompt of ``tokens``: chunks of the largest
    bucket, then the smallest bucket holding the rest."""
    largest, out = sizes[-1], []
    while tokens > largest:
        out.append((largest, largest))
        tokens -= largest
    out.append((tokens, next(b for b in sizes if b >= tokens)))
    return out


def ring_writes(start: int, count: int, bucket: int, ring: int) -> dict[str, np.ndarray]:
    """Which rows of a step enter a sliding layer's ring: ``src`` (W,) token rows, ``slots`` (W,)
    distinct ring slots, ``keep`` (W,) 1 for real writes, W = min(bucket, ring). The last
    ``min(count, ring)`` real tokens go to ``position % ring``; the other slots keep their value."""
    width, real = min(bucket, ring), min(count, ring)
    src = np.arange(count - real, count, dtype=np.int32)
    slots = (start + src) % ring
    rest = np.setdiff1d(np.arange(ring, dtype=np.int32), slots)[: width - real]
    return {
        "src": np.concatenate([src, np.zeros(width - real, np.int32)]).astype(np.int32),
        "slots": np.concatenate([slots, rest]).astype(np.int32),
        "keep": (np.arange(width) < real).astype(np.int32),
    }


@dataclass
class _Layer:
    kernel: Any
    weights: dict[str, Any]  # name -> DeviceTensor
    static: dict[str, Any]
    state: tuple[str, ...]
    cache: dict[str, Any] = field(default_factory=dict)  # name -> DeviceTensor
    rope: tuple[float, int] = (0.0, 0)
    ring: int | None = None


class ResidentModel:
    """A rank's model on the device (``prefill``/``decode`` as :class:`RankModel`)."""

    def __init__(
        self,
        model: RankModel,
        backend: Any,
        sizes: tuple[int, ...] | None = None,
        cache_dtype: np.dtype = BF16,
    ) -> None:
        self.model, self.backend = model, backend
        self.cfg, self.comm, self.notices = model.cfg, model.comm, model.notices
        self.max_seq_len = model.max_seq_len
        self.sizes = sizes or buckets(self.max_seq_len)
        if max(self.sizes) > self.max_seq_len:
            raise ValueError(f"bucket {max(self.sizes)} exceeds max_seq_len {self.max_seq_len}")
        self.cache_dtype = np.dtype(cache_dtype)
        b = backend
        self.embed = b.weight("embed", model.embed)
        self.norm, self.lm_head = b.weight("norm", model.norm), b.weight("lm_head", model.lm_head)
        self.layers = [self._layer(layer) for layer in model.layers]
        self._buffers: dict[tuple, Any] = {}
        self._last: tuple[Any, int] | None = None  # logits tensor, row of the last real token
        self.position = 0
        self.reset()

    def _layer(self, layer) -> _Layer:
        spec, b = layer.spec, self.backend
        kernel = LAYER[(spec.attention, spec.mlp)]
        weights = {}
        for name, a in layer.weights.items():
            if name in ("gate_up", "down") and a.dtype == np.uint8:  # FP8 codes
                a = a.view(FP8)
                layer.weights[name] = a  # keep the view alive: the device copy goes with it
            weights[name] = b.weight(name, a)
        static = {
            **layer.attn_static,
            **layer.mlp_static,
            "eps": self.cfg.rms_norm_eps,
            "comm": self.comm,
        }
        kv, d, dv = (layer.attn_static[k] for k in ("kv_heads", "head_dim", "v_head_dim"))
        full = spec.attention == FULL
        rows, prefix = (self.max_seq_len, "cache") if full else (spec.window - 1, "ring")
        cache = {
            f"{prefix}_k": np.zeros((rows, kv, d), self.cache_dtype),
            f"{prefix}_v": np.zeros((rows, kv, dv), self.cache_dtype),
        }
        if not full:
            cache["ring_pos"] = np.full((rows,), -1, np.int32)
        cache = {k: b.tensor(a, k) for k, a in cache.items()}
        return _Layer(
            kernel,
            weights,
            static,
            LAYER_STATE[kernel],
            cache,
            (spec.rope_theta, spec.rotary_dim),
            None if full else rows,
        )

    def reset(self) -> None:
        """Forget the sequence. Full caches need no clearing (keys after the last position are
        masked); each ring's positions are set to -1 (empty) on the device."""
        self.position = 0
        self._last = None
        for layer in self.layers:
            if layer.ring is not None:
                layer.cache["ring_pos"].write_from_numpy(np.full((layer.ring,), -1, np.int32))

    # --------------------------------------------------------------------------- forward
    def prefill(self, ids) -> np.ndarray:
        """Start a sequence with ``ids``; float32 logits (T, V) of every position."""
        self.reset()
        return np.concatenate(self._forward(np.asarray(ids), read=True), axis=0)

    def decode(self, token: int) -> np.ndarray:
        """Extend the sequence by one token; float32 logits (V,) of the next one."""
        return self._forward(np.asarray([token]), read=True)[0][0]

    def feed(self, ids, start: bool = False) -> None:
        """Run ``ids`` (a new sequence when ``start``) without reading anything back; then
        :meth:`pick` chooses the next token on the device."""
        if start:
            self.reset()
        self._forward(np.asarray(ids), read=False)

    def pick(
        self,
        temperature: float | None = None,
        top_k: int = 50,
        top_p: float = 1.0,
        u: float = 0.0,
    ) -> int:
        """The next token after the last step, chosen on the device (greedy when
        ``temperature`` is None; else sampled with the uniform draw ``u``): one int32 read."""
        if self._last is None:
            raise ValueError("pick before any step")
        logits_t, row = self._last
        b = self.backend
        top_k = min(top_k, self.cfg.vocab_size)
        static = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        arrays = {
            "logits": logits_t,
            "row": b.upload("row", np.array([row], np.int32)),
            "u": b.upload("u", np.array([u], np.float32)),
        }
        return int(b.read(b.run(next_token, arrays, static))[0])

    def _check(self, ids: np.ndarray) -> None:
        if ids.shape[0] == 0:
            raise ValueError("no tokens")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            bad = int(ids.max() if ids.max() >= self.cfg.vocab_size else ids.min())
            raise ValueError(
                f"token id {bad} is outside the vocabulary (0..{self.cfg.vocab_size - 1})"
            )
        if self.position + ids.shape[0] > self.max_seq_len:
            raise SequenceTooLong(
                f"sequence of {self.position + ids.shape[0]} tokens exceeds "
                f"max_seq_len {self.max_seq_len}"
            )

    def _forward(self, ids: np.ndarray, read: bool) -> list[np.ndarray]:
        self._check(ids)
        steps = (
            [(1, 1)] if ids.shape[0] == 1 and self.position > 0 else chunks(len(ids), self.sizes)
        )
        out, done = [], 0
        for count, bucket in steps:
            logits_t = self._step(ids[done : done + count], bucket)
            done += count
            if read:
                out.append(self.backend.read(logits_t)[:count])
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype) -> Any:
        key = (name, shape)
        if key not in self._buffers:
            self._buffers[key] = self.backend.tensor(np.zeros(shape, dtype), name)
        return self._buffers[key]

    def _step(self, chunk: np.ndarray, bucket: int) -> Any:
        """One kernel chain over ``chunk`` padded to ``bucket``; the logits DeviceTensor."""
        b, count, start = self.backend, chunk.shape[0], self.position
        inputs = self._step_inputs(chunk, bucket)
        hidden = (bucket, self.cfg.hidden_size)
        x = b.run(
            token_embedding,
            {"ids": inputs["ids"], "table": self.embed},
            {},
            out=self._buffer("x0", hidden, np.float32),
        )
        for i, layer in enumerate(self.layers):
            per_step = {
                "positions": inputs["positions"],
                "cos": inputs[("cos", layer.rope)],
                "sin": inputs[("sin", layer.rope)],
            }
            if layer.ring is None:
                per_step |= {"write": inputs["write"], "keep": inputs["keep"]}
            else:
                per_step |= {k: inputs[(k, layer.ring)] for k in ("src", "slots", "keep")}
            x = b.run(
                layer.kernel,
                {"x": x, **layer.weights, **layer.cache, **per_step},
                layer.static,
                layer.state,
                out=self._buffer(f"x{(i + 1) % 2}", hidden, np.float32),
            )
        vocab = self.cfg.vocab_size
        logits_t = b.run(
            final_logits,
            {"x": x, "norm_w": self.norm, "lm_head_w": self.lm_head},
            {"eps": self.cfg.rms_norm_eps, "comm": self.comm},
            out=self._buffer("logits", (bucket, vocab), np.float32),
        )
        self.position = start + count
        self._last = (logits_t, count - 1)
        return logits_t

    def _step_inputs(self, chunk: np.ndarray, bucket: int) -> dict[Any, Any]:
        """The step's inputs, each uploaded once into its reused device buffer."""
        b, count, start = self.backend, chunk.shape[0], self.position
        ids = np.zeros(bucket, np.int32)
        ids[:count] = chunk
        positions = np.arange(start, start + bucket, dtype=np.int32)
        host: dict[Any, np.ndarray] = {
            "ids": ids,
            "positions": positions,
            "write": (positions % self.max_seq_len).astype(np.int32),
            "keep": (np.arange(bucket) < count).astype(np.int32),
        }
        for layer in self.layers:
            if (("cos", layer.rope)) not in host:
                cos, sin = rope_tables(positions, *layer.rope)
                host[("cos", layer.rope)], host[("sin", layer.rope)] = cos, sin
            if layer.ring is not None and ("src", layer.ring) not in host:
                for k, v in ring_writes(start, count, bucket, layer.ring).items():
                    host[(k, layer.ring)] = v
        return {
            k: b.upload(k if isinstance(k, str) else "_".join(map(str, k)), a)
            for k, a in host.items()
        }
