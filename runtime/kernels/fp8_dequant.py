"""FP8 block dequantisation: each code (float8_e4m3fn or float8_e4m3) times its block's scale."""

import numpy as np


def dequant_blocks(codes: np.ndarray, scales: np.ndarray, block: int = 128) -> np.ndarray:
    """codes (..., K, N) float8; scales (..., ceil(K/block), ceil(N/block)) f32 -> (..., K, N) f32.

    ``out[..., k, n] = float32(codes[..., k, n]) * scales[..., k // block, n // block]``, as for
    experts' ``gate_up (E, H, 2I)`` and ``down (E, I, H)``. Ragged K or N need no padding: the
    scale grid is repeated to whole blocks and sliced back to (K, N), so every shape is static.
    """
    k, n = codes.shape[-2], codes.shape[-1]
    rows = np.repeat(scales, block, axis=-2)[..., :k, :]  # (..., K, ceil(N/block))
    per_code = np.repeat(rows, block, axis=-1)[..., :n]  # (..., K, N)
    return codes.astype(np.float32) * per_code
