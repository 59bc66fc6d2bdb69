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


def dequant_parts(
    codes: np.ndarray, scales: np.ndarray, parts: int, block: int = 128
) -> np.ndarray:
    """An expert array of ``parts`` side-by-side weights, each with its own block grid.

    codes (..., K, parts*N) float8; scales (..., ceil(K/block), parts*ceil(N/block)) f32 ->
    (..., K, parts*N) f32. ``gate_up`` is ``[gate | up]`` (2 parts: each of gate and up was
    quantised on its own, so up's blocks start at column N even when N is not a multiple of
    ``block``); ``down`` is 1 part.
    """
    if parts == 1:
        return dequant_blocks(codes, scales, block)
    n, nb = codes.shape[-1] // parts, scales.shape[-1] // parts
    pieces = [
        dequant_blocks(codes[..., p * n : (p + 1) * n], scales[..., p * nb : (p + 1) * nb], block)
        for p in range(parts)
    ]
    return np.concatenate(pieces, axis=-1)
