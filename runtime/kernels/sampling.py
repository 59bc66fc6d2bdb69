"""Next-token selection: greedy, or temperature / top-k / top-p sampling from a given uniform.

The random draw ``u`` in [0, 1) is an input (the host's seeded generator), so every rank picks the
same token and a seed reproduces a generation. Top-k uses the ``ops.topk`` shim (sorted,
descending); top-p keeps the smallest prefix of those whose probability reaches ``top_p``.
"""

import numpy as np

from runtime import ops
from runtime.kernels.softmax import softmax


def greedy(logits: np.ndarray) -> np.ndarray:
    """logits (V,) -> () int32: the most likely token."""
    return np.argmax(logits, axis=-1).astype(np.int32)


def sample(
    logits: np.ndarray, u: np.ndarray, *, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """logits (V,), u () float32 in [0, 1) -> () int32."""
    values, ids = ops.topk(logits.astype(np.float32), top_k)  # (k,), (k,) descending
    probs = softmax(values / np.float32(temperature))  # (k,)
    ranks = np.arange(top_k, dtype=np.int32)
    # (k, k) lower-triangular, built on the host: a compile-time constant, which a traced matmul
    # only accepts once ops.constant has made it a tensor (a plain array is no HLO operand)
    tri = ops.constant((ranks[:, None] >= ranks[None, :]).astype(np.float32))
    cum = np.matmul(tri, probs)  # (k,) inclusive cumulative probability
    keep = (cum - probs) < np.float32(top_p)  # the first token is always kept
    kept = np.where(keep, probs, np.float32(0.0))
    cum_kept = np.matmul(tri, kept / np.sum(kept))  # (k,)
    choice = np.sum((cum_kept <= u).astype(np.int32))  # inverse CDF
    choice = np.minimum(choice, np.sum(keep.astype(np.int32)) - 1)
    return np.take(ids, choice).astype(np.int32)
