"""Layer 0's dense MLP, intermediate dimension split over ranks: local SwiGLU, then all-reduce."""

import numpy as np

from runtime import ops
from runtime.kernels.swiglu import swiglu


def dense_mlp(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray, *, comm) -> np.ndarray:
    """x (T, H), gate_up (H, 2I/N), down (I/N, H) -> (T, H) summed over ranks."""
    return ops.all_reduce(swiglu(x, gate_up, down), comm)
