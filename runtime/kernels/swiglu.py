"""One SwiGLU expert (or the dense MLP): ``down(silu(gate(x)) * up(x))`` on fused ``gate_up``."""

import numpy as np


def swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """x (..., T, H), gate_up (..., H, 2I) as [gate | up], down (..., I, H) -> (..., T, H)."""
    inter = down.shape[-2]
    h = np.matmul(x, gate_up).astype(np.float32)  # (..., T, 2I)
    gate, up = h[..., :inter], h[..., inter:]
    act = gate / (np.float32(1.0) + np.exp(-gate)) * up  # silu(gate) * up
    return np.matmul(act.astype(x.dtype), down).astype(x.dtype)  # (..., T, H)
