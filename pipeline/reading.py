"""What a transform sees: reads of a unit's sources in kernel layout, and its output writers.

Reads are bounded: rows are read in chunks of about ``CHUNK_BYTES`` of output. FP8 weights are
read as codes and dequantised and transposed in one pass straight into the destination
(:mod:`pipeline.fp8_kernel`) with the scale rule of :mod:`mimo.fp8` (the full-attention fused
K/V grid is recognised by its shape).

Non-finite values are counted as they are produced, never by reading again: the FP8 kernel
returns its count, transposed float rows are counted on their bits by the copy that transposes
them (:func:`pipeline.fp8_codes.transpose_floats_into`), rows written as read by their writer.
:meth:`UnitContext.transposed_rows` returns the count and ``UnitContext.tensor_nonfinite`` keeps
it per source tensor, so a failure can name the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loader.format import LOGICAL_DTYPES
from mimo import names
from mimo.config import MiMoConfig
from mimo.fp8 import ceil_div, fused_kv_row_scales, kv_grid_rows, reads_fused, standard_row_scales
from mimo.names import scale_name
from pipeline.buffers import scratch
from pipeline.errors import InputError
from pipeline.fp8_codes import transpose_floats_into
from pipeline.fp8_kernel import dequantise_into
from pipeline.inventory import F8, ITEMSIZE
from pipeline.plan import OutputArray
from pipeline.safetensors_io import NUMPY_DTYPE
from pipeline.source import Reader
from pipeline.store import ArrayWriter, create_array_metadata

CHUNK_BYTES = 2 << 20  # source rows read per step, as output bytes (a step's FP8 codes fit in L2)
ROW_PAD = 64  # bytes between source rows in the read buffer (avoids cache-set conflicts)


def rows_per_step(shape: tuple[int, ...], itemsize: int, nbytes: int | None = None) -> int:
    """Rows of a ``shape`` tensor giving about ``nbytes`` (default ``CHUNK_BYTES``) of output of
    ``itemsize`` bytes per value per step: a multiple of 128 rows, at least 128."""
    row = math.prod(shape[1:]) * itemsize if len(shape) > 1 else 1
    return max(128, (nbytes or CHUNK_BYTES) // max(row, 1) // 128 * 128)


class UnitContext:
    """What a transform sees: dequantising reads of the unit's sources, and its output writers."""

    def __init__(
        self,
        reader: Reader,
        cfg: MiMoConfig,
        out: Path,
        on_bytes: Callable[[int], None] | None,
        allow_nonfinite: bool = False,
    ):
        """``allow_nonfinite``: NaN/infinite output values are recorded instead of failing."""
        self.reader = reader
        self.allow_nonfinite = allow_nonfinite
        self.tensor_nonfinite: dict[str, int] = {}  # source tensor -> non-finite values produced
        self.warnings: list[str] = []  # non-finite outputs recorded under allow_nonfinite
        self.cfg = cfg
        self.out = out
        self.on_bytes = on_bytes
        self._rules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.writers: list[ArrayWriter] = []
        self.extra: dict[int, dict] = {}  # writer index -> further manifest record fields

    def writer(self, spec: OutputArray) -> ArrayWriter:
        create_array_metadata(self.out, spec)
        w = ArrayWriter(self.out, spec, self.on_bytes)
        self.writers.append(w)
        return w

    def rows_per_chunk(self, name: str, dtype: str, nbytes: int | None = None) -> int:
        """:func:`rows_per_step` of ``name`` for ``dtype`` output."""
        return rows_per_step(self.reader.shape(name), LOGICAL_DTYPES[dtype].itemsize, nbytes)

    def weight(
        self,
        name: str,
        r0: int = 0,
        r1: int | None = None,
        dtype: str = "bfloat16",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows ``[r0, r1)`` of the float tensor ``name``, cast to ``dtype``.

        FP8 weights are only ever read transposed (:meth:`transposed_rows`).
        """
        entry = self.reader.checked.entry(name)
        if entry.dtype == F8:
            raise ValueError(f"{name}: FP8 tensors are read with transposed_rows")
        r1 = entry.shape[0] if r1 is None else r1
        stored = NUMPY_DTYPE[entry.dtype]
        same = out is not None and out.dtype == stored and out.flags.c_contiguous
        if same and out.shape == (r1 - r0, *entry.shape[1:]):
            self.reader.raw(name, r0, r1, out)  # no cast: straight into ``out``
            return out
        codes = self._raw(name, r0, r1)
        if out is None:
            return codes.astype(LOGICAL_DTYPES[dtype])
        out[...] = codes
        return out

    def scale_rule(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale grid, grid row of every weight row) of the FP8 weight ``name``.

        The per-head fused K/V rule applies when a k grid has ``kv_heads * ceil(head_dim/128)``
        rows and that differs from the standard count; k and v then index the stacked grid
        ``[k_scale; v_scale]``. Any other grid shape must be the standard one.
        """
        if name in self._rules:
            return self._rules[name]
        rows, cols = self.reader.shape(name)
        bm, bn = self.cfg.quant.block
        n = names.parse(name)
        rule = None
        if n is not None and n.role in ("k_proj", "v_proj"):
            spec = self.cfg.layer(n.layer)
            k_grid = self.reader.raw(scale_name(names.name("k_proj", n.layer)))
            if reads_fused(spec, bm, k_grid.shape[0]):
                v_scale = scale_name(names.name("v_proj", n.layer))
                v_grid = self.reader.raw(v_scale)
                want = (kv_grid_rows(spec, bm).fused_v, ceil_div(cols, bn))
                if v_grid.shape != want:
                    raise InputError(
                        f"tensor '{v_scale}' has shape {list(v_grid.shape)}; "
                        f"with the fused k grid it must be {list(want)}"
                    )
                k_map, v_map = fused_kv_row_scales(
                    spec.kv_heads, spec.head_dim, spec.v_head_dim, bm
                )
                grid = np.concatenate([k_grid, v_grid])
                rule = (grid, k_map if n.role == "k_proj" else v_map)
        if rule is None:
            scale = self.reader.raw(scale_name(name))
            want = (ceil_div(rows, bm), ceil_div(cols, bn))
            if scale.shape != want:
                raise InputError(
                    f"tensor '{scale_name(name)}' has shape {list(scale.shape)}; a {[rows, cols]} "
                    f"weight needs {list(want)}"
                )
            rule = (scale, standard_row_scales(rows, bm))
        self._rules[name] = rule
        return rule

    def fp8_weight(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes ``uint8 [R, C]``, scale grid ``float32``) of a standard-grid FP8 weight.

        The codes land in this thread's ``read`` buffer (valid until this thread's next read
        of any tensor), rows ``C + ROW_PAD`` bytes apart (a strided view).
        """
        if self.reader.checked.entry(name).dtype != F8:
            raise InputError(f"tensor '{name}' is not FP8: --expert-dtype float8_* needs FP8")
        grid, _ = self.scale_rule(name)
        codes = self._padded_rows(name, 0, self.reader.shape(name)[0])
        return codes.view(np.uint8), np.asarray(grid, np.float32)

    def is_fused_kv(self, name: str) -> bool:
        """Whether the FP8 weight ``name`` is read with the per-head fused K/V rule."""
        if self.reader.checked.entry(name).dtype != F8:
            return False
        grid, _ = self.scale_rule(name)
        return grid.shape[0] != ceil_div(self.reader.shape(name)[0], self.cfg.quant.block[0])

    def count(self, name: str, nonfinite: int) -> int:
        """Note ``nonfinite`` values produced from tensor ``name``; return ``nonfinite``."""
        if nonfinite:
            self.tensor_nonfinite[name] = self.tensor_nonfinite.get(name, 0) + nonfinite
        return nonfinite

    def transposed_rows(
        self,
        name: str,
        r0: int,
        r1: int,
        dtype: str,
        dst: np.ndarray,
        cols: tuple[int, int] | None = None,
    ) -> int:
        """``dst[:, :] = weight(name)[r0:r1, k0:k1].T`` in bounded chunks; ``dst`` is
        ``[k1-k0, r1-r0]``; ``cols`` ``(k0, k1)`` defaults to every column (for an FP8 weight
        ``k0`` must start a scale block).

        FP8 weights are dequantised and transposed in one pass straight into ``dst``. Returns how
        many values written are NaN or infinite.
        """
        nonfinite = 0
        dt = LOGICAL_DTYPES[dtype]
        step = self.rows_per_chunk(name, dtype)
        width = self.reader.shape(name)[1]
        k0, k1 = cols if cols is not None else (0, width)
        fp8 = self.reader.checked.entry(name).dtype == F8
        if fp8:
            grid, row_scale = self.scale_rule(name)
            block_cols = self.cfg.quant.block[1]
            if k0 % block_cols:
                raise ValueError(f"{name}: column {k0} does not start a scale block")
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            band = dst[:, c0 - r0 : c1 - r0]
            if fp8:
                codes = self._padded_rows(name, c0, c1)[:, k0:k1]
                nonfinite += dequantise_into(
                    codes, grid[:, k0 // block_cols :], row_scale[c0:c1], block_cols, band
                )
                continue
            raw = self._padded_rows(name, c0, c1)[:, k0:k1]
            rows = raw if raw.dtype == dt else raw.astype(dt)
            nonfinite += transpose_floats_into(rows, band)
        return self.count(name, nonfinite)

    def _padded_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the 2-D tensor ``name`` (FP8 codes or floats, its stored dtype) in
        this thread's ``read`` buffer, rows ``ROW_PAD`` bytes further apart than their width (a
        power-of-two row length would put every row of a transposed tile in the same cache sets:
        half the speed)."""
        entry = self.reader.checked.entry(name)
        dt, width = NUMPY_DTYPE[entry.dtype], entry.shape[1]
        buf = scratch("read", (r1 - r0, width * dt.itemsize + ROW_PAD), np.dtype(np.uint8))
        return self.reader.raw(name, r0, r1, buf[:, : width * dt.itemsize].view(dt))

    def _raw(self, name: str, r0: int, r1: int) -> np.ndarray:
        entry = self.reader.checked.entry(name)
        nraw = (r1 - r0) * math.prod(entry.shape[1:]) * ITEMSIZE[entry.dtype]
        return self.reader.raw(name, r0, r1, scratch("read", (nraw,), np.dtype(np.uint8)))
