"""FP8 experts on the CPU backend: one expert's codes times their block scales, fast.

The device kernel dequantises with static-shape NumPy (``runtime/kernels/fp8_dequant.py``); on
the host the CPU backend dequantises each routed expert into a reused float32 buffer with one
numba loop (a 256-entry table of code values, the block's scale), several times faster than
the repeat-and-multiply the device kernel needs. Values are identical: ``float32(code) * scale``.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np

from runtime.buffers import thread_buffer

_VALUES = {
    np.dtype(d): np.arange(256, dtype=np.uint8).view(d).astype(np.float32)
    for d in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3)
}


@numba.njit(nogil=True, cache=True)
def _dequant(codes, scales, values, block, parts, out):  # pragma: no cover - compiled
    rows, cols = codes.shape
    width = cols // parts
    per_part = scales.shape[1] // parts
    for r in range(rows):
        sr = r // block
        for p in range(parts):
            for b in range(per_part):
                scale = scales[sr, p * per_part + b]
                c0 = p * width + b * block
                c1 = min(c0 + block, (p + 1) * width)
                for c in range(c0, c1):
                    out[r, c] = values[codes[r, c]] * scale


def dequant_expert(
    name: str, codes: np.ndarray, scales: np.ndarray, parts: int, block: int = 128
) -> np.ndarray:
    """codes (K, parts*N) float8; scales (ceil(K/block), parts*ceil(N/block)) -> (K, parts*N)
    float32 in this thread's buffer ``name`` (valid until the next call with that name)."""
    out = thread_buffer(name, codes.shape)
    values = _VALUES[np.dtype(codes.dtype)]
    grid = np.ascontiguousarray(scales, np.float32)
    _dequant(codes.view(np.uint8), grid, values, block, parts, out)
    return out
