"""The transforms a plan unit can name; each gets its inputs by name (``unit.inputs``).

Every transform turns hub tensors (``[out, in]``, FP8 or float) into kernel layout (``[in, out]``,
``x @ W``) in the output dtype, reading in row chunks so memory stays bounded by a few chunks and
the unit's own output (the largest in-memory output is a few hundred MB at real shapes; the
vocabulary-split ``lm_head`` streams in tiles).

==================  =========================================================================
transform           output(s)
==================  =========================================================================
copy                ``w``, cast (embedding, norms, router bias)
transpose           ``w[source_rows].T`` (router ``[H, E]``, ``lm_head`` vocabulary slices; one
                    larger than ``IN_MEMORY_LIMIT`` in bands of output rows, the source read
                    once per band)
transpose_split     ``w.T`` cut at ``source_cols``, one array per device (``o``, dense ``down``);
                    built in passes of whole device slices of about ``SPLIT_BYTES``, the
                    source read once per pass
split_rows          ``w[source_rows]`` per device (sinks)
qkv                 ``[q.T | k.T | v.T]`` rows of a device's heads (fused K/V rule)
gate_up             ``[gate[source_rows].T | up[source_rows].T]`` (dense MLP slice)
experts_gate_up     ``[E_local, H, 2*I]``: ``[gate_e.T | up_e.T]`` per local expert
experts_down        ``[E_local, I, H]``: ``down_e.T`` per local expert
==================  =========================================================================

With FP8 experts the two ``experts_*`` transforms also write the ``*_scale`` array and copy codes
instead of dequantising them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loader.format import LOGICAL_DTYPES
from pipeline.buffers import scratch
from pipeline.e4m3 import ocp_to_trn
from pipeline.errors import InputError
from pipeline.fp8 import fused_kv_saturation
from pipeline.fp8_codes import transpose_codes_into
from pipeline.nonfinite import count_nan_codes
from pipeline.plan import Unit
from pipeline.reading import UnitContext

FP8_ENCODINGS = ("float8_e4m3fn", "float8_e4m3")

IN_MEMORY_LIMIT = 128 << 20  # a transposed output larger than this is written in row bands
COPY_BYTES = 32 << 20  # a copy's step: no kernel to keep in cache, and one direct write per step
SPLIT_BYTES = 64 << 20  # a transpose_split pass: whole device slices up to this much output
BAND_ALIGN = 128  # band rows: a multiple of the FP8 scale block (and of 8: 4 KiB-aligned offsets)


def _one(unit: Unit, key: str = "w") -> str:
    (name,) = unit.inputs[key]
    return name


def band_rows(rows: int, row_bytes: int) -> int:
    """Output rows per band of a transposed output of ``rows`` rows of ``row_bytes`` larger than
    ``IN_MEMORY_LIMIT``: the fewest bands of at most ``IN_MEMORY_LIMIT`` (or ``BAND_ALIGN`` rows),
    as even as multiples of ``BAND_ALIGN`` rows allow (the same passes, the least memory)."""
    most = max(BAND_ALIGN, IN_MEMORY_LIMIT // row_bytes // BAND_ALIGN * BAND_ALIGN)
    if rows <= most:
        return most
    per_band = -(-rows // -(-rows // most))  # rows over the fewest bands, rounded up
    return -(-per_band // BAND_ALIGN) * BAND_ALIGN


def split_passes(
    cols: list[tuple[int, int]], row_bytes: int, align: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """The passes of a ``transpose_split``: ``((g0, g1), slices)`` each, the source columns one
    pass transposes and the device slices (indices into ``cols``) cut from them.

    ``cols`` are the slices' source columns (output rows of ``row_bytes`` each), in order. A pass
    holds consecutive slices up to ``SPLIT_BYTES`` of output (at least one slice) and starts at
    the multiple of ``align`` (an FP8 scale block) at or before its first slice.
    """
    passes: list[tuple[tuple[int, int], list[int]]] = []
    for i, (c0, c1) in enumerate(cols):
        if passes and (c1 - passes[-1][0][0]) * row_bytes <= SPLIT_BYTES:
            (g0, _), slices = passes[-1]
            passes[-1] = ((g0, c1), [*slices, i])
        else:
            passes.append(((c0 - c0 % align, c1), [i]))
    return passes


def _copy(ctx: UnitContext, unit: Unit) -> None:
    (spec,), name = unit.outputs, _one(unit)
    w = ctx.writer(spec)
    total = spec.shape[0]
    step = ctx.rows_per_chunk(name, spec.dtype, COPY_BYTES)
    tail = spec.shape[1:]
    for r0 in range(0, total, step):
        r1 = min(r0 + step, total)
        rows = scratch("out", (r1 - r0, *tail), LOGICAL_DTYPES[spec.dtype])
        w.rows(r0, ctx.weight(name, r0, r1, spec.dtype, out=rows))


def _transpose(ctx: UnitContext, unit: Unit) -> None:
    (spec,), name = unit.outputs, _one(unit)
    r0, r1 = unit.params.get("source_rows", (0, ctx.reader.shape(name)[0]))
    w = ctx.writer(spec)
    dt = LOGICAL_DTYPES[spec.dtype]
    if spec.nbytes <= IN_MEMORY_LIMIT:
        out = scratch("out", spec.shape, dt)
        w.rows(0, out, ctx.transposed_rows(name, r0, r1, spec.dtype, out))
        return
    # bands of whole output rows (source columns), each read from all source rows: every band is
    # one contiguous, block-aligned piece of the chunk file, written with direct I/O
    rows = band_rows(spec.shape[0], (r1 - r0) * dt.itemsize)
    for k0 in range(0, spec.shape[0], rows):
        k1 = min(k0 + rows, spec.shape[0])
        band = scratch("out", (k1 - k0, r1 - r0), dt)
        w.rows(k0, band, ctx.transposed_rows(name, r0, r1, spec.dtype, band, cols=(k0, k1)))


def _transpose_split(ctx: UnitContext, unit: Unit) -> None:
    name = _one(unit)
    dtype = unit.outputs[0].dtype
    dt = LOGICAL_DTYPES[dtype]
    rows = ctx.reader.shape(name)[0]
    cols = [tuple(c) for c in unit.params["source_cols"]]
    passes = split_passes(cols, rows * dt.itemsize, ctx.cfg.quant.block[1])
    largest = scratch("out", (max(g1 - g0 for (g0, g1), _ in passes), rows), dt)
    for (g0, g1), slices in passes:
        band = largest[: g1 - g0]  # one buffer for every pass: the largest, asked for once
        clean = ctx.transposed_rows(name, 0, rows, dtype, band, cols=(g0, g1)) == 0
        for i in slices:
            c0, c1 = cols[i]
            ctx.writer(unit.outputs[i]).rows(0, band[c0 - g0 : c1 - g0], 0 if clean else None)


def _split_rows(ctx: UnitContext, unit: Unit) -> None:
    name = _one(unit)
    for spec, (r0, r1) in zip(unit.outputs, unit.params["source_rows"], strict=True):
        ctx.writer(spec).rows(0, ctx.weight(name, r0, r1, spec.dtype))


def _qkv(ctx: UnitContext, unit: Unit) -> None:
    (spec,) = unit.outputs
    layer = ctx.cfg.layer(unit.params["layer"])
    (h0, h1), (g0, g1) = unit.params["q_heads"], unit.params["kv_heads"]
    q, k, v = (_one(unit, key) for key in ("q", "k", "v"))
    d, dv = layer.head_dim, layer.v_head_dim
    out = scratch("out", spec.shape, LOGICAL_DTYPES[spec.dtype])
    col = nonfinite = 0
    for name, r0, r1 in ((q, h0 * d, h1 * d), (k, g0 * d, g1 * d), (v, g0 * dv, g1 * dv)):
        nonfinite += ctx.transposed_rows(name, r0, r1, spec.dtype, out[:, col : col + r1 - r0])
        col += r1 - r0
    w = ctx.writer(spec)
    w.rows(0, out, nonfinite)
    if ctx.is_fused_kv(k):  # the fused reading is inferred: measure the evidence for it
        w.checks["fused_kv"] = fused_kv_saturation(
            ctx.reader.raw(k, g0 * d, g1 * d),
            ctx.reader.raw(v, g0 * dv, g1 * dv),
            d,
            dv,
            ctx.cfg.quant.block,
        )


def _gate_up(ctx: UnitContext, unit: Unit) -> None:
    (spec,) = unit.outputs
    gate, up = _one(unit, "gate"), _one(unit, "up")
    i0, i1 = unit.params["source_rows"]
    out = scratch("out", spec.shape, LOGICAL_DTYPES[spec.dtype])
    nonfinite = ctx.transposed_rows(gate, i0, i1, spec.dtype, out[:, : i1 - i0])
    nonfinite += ctx.transposed_rows(up, i0, i1, spec.dtype, out[:, i1 - i0 :])
    ctx.writer(spec).rows(0, out, nonfinite)


def _experts_gate_up(ctx: UnitContext, unit: Unit) -> None:
    if unit.outputs[0].dtype in FP8_ENCODINGS:
        return _experts_fp8(ctx, unit, ("gate", "up"))
    (spec,) = unit.outputs
    _, h, two_i = spec.shape
    w = ctx.writer(spec)
    slab = scratch("out", (h, two_i), LOGICAL_DTYPES[spec.dtype])
    pairs = zip(unit.inputs["gate"], unit.inputs["up"], strict=True)
    for j, (gate, up) in enumerate(pairs):
        nonfinite = ctx.transposed_rows(gate, 0, two_i // 2, spec.dtype, slab[:, : two_i // 2])
        nonfinite += ctx.transposed_rows(up, 0, two_i // 2, spec.dtype, slab[:, two_i // 2 :])
        w.rows(j, slab[None], nonfinite)


def _experts_down(ctx: UnitContext, unit: Unit) -> None:
    if unit.outputs[0].dtype in FP8_ENCODINGS:
        return _experts_fp8(ctx, unit, ("down",))
    (spec,) = unit.outputs
    _, i, h = spec.shape
    w = ctx.writer(spec)
    slab = scratch("out", (i, h), LOGICAL_DTYPES[spec.dtype])
    for j, down in enumerate(unit.inputs["down"]):
        w.rows(j, slab[None], ctx.transposed_rows(down, 0, h, spec.dtype, slab))


def _experts_fp8(ctx: UnitContext, unit: Unit, keys: tuple[str, ...]) -> None:
    """FP8 experts: codes transposed byte for byte, the scale grid transposed with them.

    The code array's ``nonfinite`` is its NaN codes, the scale array's its non-finite scales (both
    also in the ``encoding`` counts).

    Per expert, the inputs ``keys`` (gate then up, or down) are laid side by side along the
    output's last axis, codes and grids alike. ``float8_e4m3`` re-encodes each block for
    Trainium2 first (:func:`pipeline.e4m3.ocp_to_trn`: halved codes, doubled scale).
    """
    codes_spec, scale_spec = unit.outputs
    encoding = codes_spec.dtype
    block = ctx.cfg.quant.block
    wc, ws = ctx.writer(codes_spec), ctx.writer(scale_spec)
    slab = scratch("out", codes_spec.shape[1:], np.dtype(np.uint8))
    grid_slab = scratch("grid", scale_spec.shape[1:], np.dtype(np.float32))
    stats = {"halved_blocks": 0, "inexact": 0, "nan_codes": 0, "nonfinite_scales": 0}
    for j, tensors in enumerate(zip(*(unit.inputs[k] for k in keys), strict=True)):
        col = grid_col = 0
        for name in tensors:
            codes, grid = ctx.fp8_weight(name)  # [R, C] in the hub's [out, in] orientation
            bad_scales = int(np.count_nonzero(~np.isfinite(grid)))
            rows = codes.shape[0]
            if encoding == "float8_e4m3":
                nan_codes = count_nan_codes(codes)  # of the checkpoint's e4m3fn codes
                codes, grid, halving = ocp_to_trn(codes, grid, block, name=name)
                stats["halved_blocks"] += halving.halved_blocks
                stats["inexact"] += halving.inexact
                transpose_codes_into(codes, slab[:, col : col + rows])
            else:
                nan_codes = transpose_codes_into(codes, slab[:, col : col + rows])
            grid_slab[:, grid_col : grid_col + grid.shape[0]] = grid.T
            stats["nan_codes"] += nan_codes
            stats["nonfinite_scales"] += bad_scales
            ctx.count(name, nan_codes + bad_scales)
            col, grid_col = col + rows, grid_col + grid.shape[0]
        wc.rows(j, slab[None], nonfinite=0)  # counted per tensor below
        ws.rows(j, grid_slab[None], nonfinite=0)
    wc.nonfinite, ws.nonfinite = stats["nan_codes"], stats["nonfinite_scales"]
    scale_path = scale_spec.path
    ctx.extra[len(ctx.writers) - 2] = {
        "encoding": {"format": encoding, "block": list(block), "scale": scale_path, **stats}
    }
    ctx.extra[len(ctx.writers) - 1] = {"scale_of": codes_spec.path}


TRANSFORMS: dict[str, Callable[[UnitContext, Unit], None]] = {
    "copy": _copy,
    "transpose": _transpose,
    "transpose_split": _transpose_split,
    "split_rows": _split_rows,
    "qkv": _qkv,
    "gate_up": _gate_up,
    "experts_gate_up": _experts_gate_up,
    "experts_down": _experts_down,
}


def nonfinite_message(array: str, tensors: list[str], count: int) -> str:
    """How a non-finite output is reported: the array, the source tensor(s), the count."""
    return (
        f"array '{array}' holds {count} non-finite value(s) (NaN or infinity) from tensor "
        + ", ".join(f"'{t}'" for t in tensors)
    )


def run_unit(ctx: UnitContext, unit: Unit) -> list[dict]:
    """Execute ``unit``; return one manifest record per output (bytes, checksum) in order.

    An output holding NaN or infinite values is an InputError naming the array, its source
    tensor(s) and the count (the unit's pieces are removed), unless ``ctx.allow_nonfinite``:
    then the record carries the count as ``nonfinite`` and ``ctx.warnings`` says so.
    """
    try:
        TRANSFORMS[unit.transform](ctx, unit)
        for w in ctx.writers:
            if w.nonfinite:
                tensors = [t for t in unit.sources if ctx.tensor_nonfinite.get(t)]
                line = nonfinite_message(
                    f"{w.spec.store}/{w.spec.path}", tensors or list(unit.sources), w.nonfinite
                )
                if not ctx.allow_nonfinite:
                    raise InputError(f"{line}; --allow-nonfinite converts it anyway")
                ctx.warnings.append(line)
        return [w.finish() | ctx.extra.get(i, {}) for i, w in enumerate(ctx.writers)]
    except BaseException:
        for w in ctx.writers:
            w.abort()
        raise
