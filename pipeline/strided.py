"""2-D arrays as the compiled loops take them: one flat unit-stride 1-D array and a row stride.

A numba loop over ``flat[i * ld : i * ld + cols]`` knows the element size and that every row is
contiguous, so it vectorises; a generic strided 2-D argument does not. Views only, no copy,
except :func:`flat_input` for an input whose rows are not unit-stride.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def unit_rows(a: np.ndarray) -> bool:
    """Whether a 2-D array's rows are unit-stride and do not overlap (:func:`flat_rows` holds)."""
    step = a.strides[0]
    return a.strides[1] == a.itemsize and step >= a.shape[1] * a.itemsize and step % a.itemsize == 0


def flat_rows(a: np.ndarray) -> tuple[np.ndarray, int]:
    """A non-empty 2-D array with unit-stride rows as a flat 1-D view, and its row stride
    (elements)."""
    rows, cols = a.shape
    ld = a.strides[0] // a.itemsize
    return as_strided(a, shape=((rows - 1) * ld + cols,), strides=(a.itemsize,)), ld


def flat_input(a: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`flat_rows` of a non-empty 2-D input, made contiguous first when its rows are not
    unit-stride (the copy is only read)."""
    return flat_rows(a if unit_rows(a) else np.ascontiguousarray(a))
