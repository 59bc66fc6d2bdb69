"""The transforms a plan unit can name; each gets its inputs by name (``unit.inputs``).

Every transform turns hub tensors (``[out, in]``, FP8 or float) into kernel layout (``[in, out]``,
``x @ W``) in the output dtype, reading in row chunks so memory stays bounded by a few chunks and
the unit's own output (the largest in-memory output is a few hundred MB at real shapes; the
vocabulary-split ``lm_head`` streams in tiles).

==================  =========================================================================
transform           output(s)
==================  =========================================================================
copy                ``w``, cast (embedding, norms, router bias)
transpose           ``w[source_rows].T`` (router ``[H, E]``, ``lm_head`` vocabulary slices)
transpose_split     ``w.T`` cut at ``source_cols``, one array per device (``o``, dense ``down``)
split_rows          ``w[source_rows]`` per device (sinks)
qkv                 ``[q.T | k.T | v.T]`` rows of a device's heads (fused K/V rule)
gate_up             ``[gate[source_rows].T | up[source_rows].T]`` (dense MLP slice)
experts_gate_up     ``[E_local, H, 2*I]``: ``[gate_e.T | up_e.T]`` per local expert
experts_down        ``[E_local, I, H]``: ``down_e.T`` per local expert
==================  =========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from loader.format import LOGICAL_DTYPES
from pipeline.buffers import scratch
from pipeline.fp8 import fused_kv_saturation
from pipeline.plan import Unit
from pipeline.reading import UnitContext

IN_MEMORY_LIMIT = 256 << 20  # a transposed output larger than this is written in tiles


def _one(unit: Unit, key: str = "w") -> str:
    (name,) = unit.inputs[key]
    return name


def _copy(ctx: UnitContext, unit: Unit) -> None:
    (spec,), name = unit.outputs, _one(unit)
    w = ctx.writer(spec)
    total = spec.shape[0]
    step = ctx.rows_per_chunk(name, spec.dtype)
    tail = spec.shape[1:]
    for r0 in range(0, total, step):
        r1 = min(r0 + step, total)
        rows = scratch("copy", (r1 - r0, *tail), LOGICAL_DTYPES[spec.dtype])
        w.rows(r0, ctx.weight(name, r0, r1, spec.dtype, out=rows))


def _transpose(ctx: UnitContext, unit: Unit) -> None:
    (spec,), name = unit.outputs, _one(unit)
    r0, r1 = unit.params.get("source_rows", (0, ctx.reader.shape(name)[0]))
    w = ctx.writer(spec)
    dt = LOGICAL_DTYPES[spec.dtype]
    if spec.nbytes <= IN_MEMORY_LIMIT:
        out = scratch("out", spec.shape, dt)
        ctx.transposed_rows(name, r0, r1, spec.dtype, out)
        w.rows(0, out)
        return
    step = ctx.rows_per_chunk(name, spec.dtype)
    for c0 in range(r0, r1, step):  # tiles: a column band of the output per source chunk
        c1 = min(c0 + step, r1)
        band = scratch("band", (spec.shape[0], c1 - c0), dt)
        ctx.transposed_rows(name, c0, c1, spec.dtype, band)
        w.tile(0, c0 - r0, band)


def _transpose_split(ctx: UnitContext, unit: Unit) -> None:
    name = _one(unit)
    dtype = unit.outputs[0].dtype
    rows, cols = ctx.reader.shape(name)
    full = scratch("out", (cols, rows), LOGICAL_DTYPES[dtype])
    ctx.transposed_rows(name, 0, rows, dtype, full)
    for spec, (c0, c1) in zip(unit.outputs, unit.params["source_cols"], strict=True):
        ctx.writer(spec).rows(0, full[c0:c1])


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
    col = 0
    for name, r0, r1 in ((q, h0 * d, h1 * d), (k, g0 * d, g1 * d), (v, g0 * dv, g1 * dv)):
        ctx.transposed_rows(name, r0, r1, spec.dtype, out[:, col : col + r1 - r0])
        col += r1 - r0
    w = ctx.writer(spec)
    w.rows(0, out)
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
    ctx.transposed_rows(gate, i0, i1, spec.dtype, out[:, : i1 - i0])
    ctx.transposed_rows(up, i0, i1, spec.dtype, out[:, i1 - i0 :])
    ctx.writer(spec).rows(0, out)


def _experts_gate_up(ctx: UnitContext, unit: Unit) -> None:
    (spec,) = unit.outputs
    _, h, two_i = spec.shape
    w = ctx.writer(spec)
    slab = scratch("slab", (h, two_i), LOGICAL_DTYPES[spec.dtype])
    pairs = zip(unit.inputs["gate"], unit.inputs["up"], strict=True)
    for j, (gate, up) in enumerate(pairs):
        ctx.transposed_rows(gate, 0, two_i // 2, spec.dtype, slab[:, : two_i // 2])
        ctx.transposed_rows(up, 0, two_i // 2, spec.dtype, slab[:, two_i // 2 :])
        w.rows(j, slab[None])


def _experts_down(ctx: UnitContext, unit: Unit) -> None:
    (spec,) = unit.outputs
    _, i, h = spec.shape
    w = ctx.writer(spec)
    slab = scratch("slab", (i, h), LOGICAL_DTYPES[spec.dtype])
    for j, down in enumerate(unit.inputs["down"]):
        ctx.transposed_rows(down, 0, h, spec.dtype, slab)
        w.rows(j, slab[None])


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


def run_unit(ctx: UnitContext, unit: Unit) -> list[dict]:
    """Execute ``unit``; return one manifest record per output (bytes, checksum) in order."""
    try:
        TRANSFORMS[unit.transform](ctx, unit)
        return [w.finish() for w in ctx.writers]
    except BaseException:
        for w in ctx.writers:
            w.abort()
        raise
