"""Partial rotary position embedding (NeoX rotate-half) on the first ``rotary_dim`` dims.

MiMo-V2-Flash rotates the first ``int(192 * 0.334) = 64`` of each q/k head's 192 dims; the rest
pass through. ``cos``/``sin`` are runtime inputs built on the host by :func:`rope_tables`, so no
position-dependent constant is baked into a compiled kernel.
"""

import numpy as np


def rope_tables(
    positions: np.ndarray, theta: float, rotary_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Host side: cos and sin (T, rotary_dim) float32 for absolute ``positions`` (T,)."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponent)  # (rot/2,)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, rot/2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (T, rot)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rope_partial(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, heads, D), cos/sin (T, rot) -> (T, heads, D): dims [0, rot) rotated, rest kept."""
    rot = cos.shape[-1]
    half = rot // 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)  # rotate_half
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, rot)
    return np.concatenate([x_rot * c + rotated * s, x_pass], axis=-1).astype(x.dtype)
