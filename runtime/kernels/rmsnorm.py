"""RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))``, computed in float32."""

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H), weight (H,) -> (T, H) in x's dtype."""
    xf = x.astype(np.float32)
    variance = np.mean(xf * xf, axis=-1, keepdims=True)  # (T, 1)
    normed = (xf / np.sqrt(variance + eps)).astype(x.dtype)
    return (weight.astype(np.float32) * normed).astype(x.dtype)
