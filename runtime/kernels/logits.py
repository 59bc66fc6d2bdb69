"""Final norm and the vocabulary-split ``lm_head``, gathered into full logits on every rank."""

import numpy as np

from runtime import ops
from runtime.kernels.rmsnorm import rmsnorm


def logits(
    h: np.ndarray, norm_w: np.ndarray, lm_head_w: np.ndarray, *, eps: float, comm
) -> np.ndarray:
    """h (T, H), lm_head_w (H, V/N) -> (T, V) float32, vocabulary in rank order."""
    local = np.matmul(rmsnorm(h, norm_w, eps), lm_head_w).astype(np.float32)  # (T, V/N)
    return ops.all_gather(local, comm, axis=-1)
