"""The on-disk contract of a mimo-shard output, shared by the writer and every reader.

```
OUT/
  manifest.json        written last, atomically: the commit point of the whole output
  manifest.d/          one array table per store (records of its arrays), hashed in manifest.json
  config.json          the source config, verbatim (plus tokenizer files when the source has them)
  shared.zarr/         arrays every device reads (embedding, norms, routers)
  device-000.zarr/ ... one store per device (its heads, its experts, its vocabulary slice)
```

Stores are zarr v3, one chunk per array, ``bytes`` codec little-endian, no compression: the chunk
file ``<store>/<path>/c/0/0...`` holds the array's raw C-order bytes, so it can be memory-mapped.
bfloat16 and float8 arrays are stored as ``uint16``/``uint8`` with a ``logical_dtype`` attribute
(stock zarr-python cannot open bfloat16 arrays).
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np

FORMAT = "mimo-shard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = "manifest.d"  # manifest.d/<store>.json: the store's array records
TABLE_FORMAT = "mimo-shard/arrays"
SHARED = "shared"
STATE_DIR = ".mimo-shard"  # journal, run state; removed when the output is complete

LOGICAL_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),  # OCP e4m3 (the checkpoint's)
    "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3),  # IEEE-style e4m3 (Trainium2's)
    "float32": np.dtype(np.float32),
}
_RAW = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}
CORE_DTYPES = {"float32"}  # stored as themselves; the others as raw bits


def table_path(store: str) -> str:
    """Path of a store's array table, relative to the output folder."""
    return f"{TABLES}/{store}.json"


def device_store(rank: int) -> str:
    """Store name of device ``rank``: ``device-007``."""
    return f"device-{rank:03d}"


def store_dir(out: Path, store: str) -> Path:
    return Path(out) / f"{store}.zarr"


def storage_dtype(logical: str) -> np.dtype:
    """The zarr ``data_type`` used to store a logical dtype (raw bits for bf16/fp8)."""
    if logical in CORE_DTYPES:
        return LOGICAL_DTYPES[logical]
    return _RAW[LOGICAL_DTYPES[logical].itemsize]


def chunk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One chunk holds the whole array; zero-length dimensions get chunk length 1."""
    return tuple(max(1, d) for d in shape)


def chunk_path(out: Path | str, store: str, path: str, shape: tuple[int, ...]) -> str:
    """The file holding the single chunk of array ``path`` (``c/0/0`` for 2-D, ``c`` for 0-d)."""
    return f"{out}/{store}.zarr/{path}/c" + "/0" * len(shape)


def nbytes(shape: tuple[int, ...], logical: str) -> int:
    return math.prod(shape) * LOGICAL_DTYPES[logical].itemsize
