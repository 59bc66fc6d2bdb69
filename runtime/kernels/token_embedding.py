"""Token embedding lookup."""

import numpy as np


def token_embedding(ids: np.ndarray, table: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """ids (T,) int32/uint32, table (V, H) -> (T, H) in ``dtype``."""
    return np.take(table, ids.astype(np.int32), axis=0).astype(dtype)
