"""Softmax over the last axis, in float32."""

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """x (..., N) -> (..., N) float32, rows summing to 1."""
    xf = x.astype(np.float32)
    e = np.exp(xf - np.max(xf, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)
