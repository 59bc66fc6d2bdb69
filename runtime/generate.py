"""Generation: prefill the prompt, then decode token by token, with timings.

Works with any model-like object (``prefill(ids) -> (T, V)``, ``decode(token) -> (V,)``): a
single :class:`~runtime.model.RankModel`, :class:`~runtime.ranks.InProcessRanks`, or one rank of a
multi-process run (every rank computes the same logits and, from the same seed, the same tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.kernels.sampling import greedy, sample


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is None; otherwise temperature / top-k / top-p sampling."""

    temperature: float | None = None
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if t is not None and not (math.isfinite(t) and t > 0):
            raise ValueError(f"--temperature {t}: must be a number > 0 (use --greedy for argmax)")
        if self.top_k < 1:
            raise ValueError(f"--top-k {self.top_k}: must be >= 1")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")


class NonFiniteLogits(ValueError):
    """The model produced NaN or Inf logits: its weights are damaged."""

    def __init__(self, position: int) -> None:
        super().__init__(
            f"non-finite logits at position {position}: the output's weights hold NaN/Inf "
            "(mimo-manifest verify; reconvert)"
        )
        self.position = position


def check_finite(logits: np.ndarray, first_position: int) -> None:
    """Raise NonFiniteLogits naming the first position whose logits ``(T, V)`` are not finite."""
    ok = np.isfinite(logits).all(axis=-1)
    if not ok.all():
        raise NonFiniteLogits(first_position + int(np.argmin(ok)))


@dataclass
class Generation:
    input_ids: list[int]
    output_ids: list[int]
    prompt_logits: np.ndarray  # (T, V) float32
    timings: dict[str, float] = field(default_factory=dict)
    stopped: str = "max_new_tokens"  # or "eos", "max_seq_len"


def generate(
    model,
    input_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_ids: frozenset[int] = frozenset(),
    max_seq_len: int | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``input_ids``; stops after any of ``eos_token_ids``.

    ``on_layer(done, total)`` is called after each decoder layer of the prefill (progress).
    Raises :class:`NonFiniteLogits` as soon as a position's logits hold NaN or Inf (on a device
    model, which samples decode steps itself, the prompt's logits are checked).
    """
    rng = np.random.default_rng(sampling.seed)
    vocab_top_k = None
    on_device = hasattr(model, "pick")  # a model resident on a device samples there

    def choose(logits: np.ndarray) -> int:
        nonlocal vocab_top_k
        if sampling.temperature is None:
            return int(greedy(logits))
        vocab_top_k = vocab_top_k or min(sampling.top_k, logits.shape[-1])
        u = np.float32(rng.random())
        return int(
            sample(
                logits, u, temperature=sampling.temperature, top_k=vocab_top_k, top_p=sampling.top_p
            )
        )

    t0 = time.perf_counter()
    prompt_logits = (
        model.prefill(input_ids) if on_layer is None else model.prefill(input_ids, on_layer)
    )
    t1 = time.perf_counter()
    check_finite(prompt_logits, 0)
    out: list[int] = []
    stopped = "max_new_tokens"
    decode_s = 0.0
    if max_new_tokens > 0:
        out.append(choose(prompt_logits[-1]))
        ttft = time.perf_counter() - t0
        # n tokens need n - 1 decode steps after the prompt: T + n - 1 positions
        limit = max_seq_len - len(input_ids) + 1 if max_seq_len is not None else max_new_tokens
        while len(out) < max_new_tokens:
            if out[-1] in eos_token_ids:
                stopped = "eos"
                break
            if len(out) >= limit:
                stopped = "max_seq_len"
                break
            t = time.perf_counter()
            if on_device:  # the device chooses: only the token id comes back
                model.feed([out[-1]])
                u = float(rng.random()) if sampling.temperature is not None else 0.0
                out.append(model.pick(sampling.temperature, sampling.top_k, sampling.top_p, u))
            else:
                step = model.decode(out[-1])
                check_finite(step[None], len(input_ids) + len(out) - 1)
                out.append(choose(step))
            decode_s += time.perf_counter() - t
        if out[-1] in eos_token_ids and stopped == "max_new_tokens":
            stopped = "eos"
    else:
        ttft = t1 - t0
    prefill_s = t1 - t0
    steps = max(len(out) - 1, 0)
    timings = {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(input_ids) / prefill_s if prefill_s else 0.0,
        "time_to_first_token_s": ttft,
        "decode_s": decode_s,
        "decode_tokens_per_s": steps / decode_s if decode_s else 0.0,
        "total_s": time.perf_counter() - t0,
    }
    return Generation(list(input_ids), out, prompt_logits, timings, stopped)
