"""The conversion plan: the layout table (:mod:`mimo.layout`) expanded into work units.

A *unit* is one read of some source tensors producing one or more output arrays with a named
transform (see :mod:`pipeline.transforms`). Units are journaled; a unit's arrays become durable
together. The converter executes the units, ``--dry-run`` prints them, the manifest records them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from loader.format import SHARED, device_store, nbytes
from mimo import names
from mimo.config import MOE, MiMoConfig
from mimo.fp8 import ceil_div
from mimo.layout import (
    EXPERT_DTYPE,
    EXPERTS,
    F32,
    HEADS,
    INTERMEDIATE,
    SHARED_STORE,
    VOCAB,
    WHOLE,
    ArrayKind,
    attention_heads,
    contiguous_expert_map,
    divisibility,
    even_split,
    layer_arrays,
    model_arrays,
)
from pipeline.errors import InputError
from pipeline.inventory import HubTensor, hub_inventory

DTYPES = ("bfloat16", "float32")
EXPERT_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e4m3")  # FP8: the checkpoint's codes


@dataclass(frozen=True)
class OutputArray:
    """One output array."""

    store: str  # "shared" or "device-007"
    path: str  # "layers/5/attn/qkv"
    shape: tuple[int, ...]
    dtype: str  # logical dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class Unit:
    """One read of source tensors producing ``outputs`` through ``transform`` with ``params``.

    ``inputs`` maps the transform's input names (``q``, ``gate``, ...) to hub tensor names (one,
    or one per expert); ``sources`` lists every tensor read, FP8 scale grids included.
    """

    id: str
    transform: str
    sources: tuple[str, ...]
    outputs: tuple[OutputArray, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def out_bytes(self) -> int:
        return sum(a.nbytes for a in self.outputs)


@dataclass(frozen=True)
class Options:
    """What the user asked for; part of the output's identity (resume refuses other options)."""

    devices: int
    dtype: str = "bfloat16"
    layers: tuple[int, ...] | None = None  # None: every layer
    experts: tuple[int, ...] | None = None  # None: every expert
    expert_dtype: str = "bfloat16"  # routed experts: bfloat16, or FP8 codes with block scales
    # multi-host: this output holds the stores of ``host_devices`` (None: every device), as host
    # ``host_rank`` of ``host_count`` (see :mod:`pipeline.hosts`)
    host_count: int = 1
    host_rank: int = 0
    host_devices: tuple[int, ...] | None = None
    # --expert-map: (layer, per-rank expert ids) pairs (pipeline.placement); None: contiguous
    expert_map: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] | None = None

    @property
    def fp8_experts(self) -> bool:
        return self.expert_dtype.startswith("float8")

    def custom_map(self) -> dict[int, list[list[int]]]:
        """The ``--expert-map`` layers as {layer: per-rank expert ids} (empty: none given)."""
        return {layer: [list(b) for b in blocks] for layer, blocks in self.expert_map or ()}

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``options``; ``expert_dtype`` appears only when it is not bfloat16, so
        outputs written before the option existed keep their identity."""
        out = {
            "devices": self.devices,
            "dtype": self.dtype,
            "layers": list(self.layers) if self.layers is not None else None,
            "experts": list(self.experts) if self.experts is not None else None,
        }
        if self.expert_dtype != "bfloat16":
            out["expert_dtype"] = self.expert_dtype
        if self.expert_map is not None:
            from pipeline.placement import map_digest

            out["expert_map_sha256"] = map_digest(self.custom_map())
        if self.host_devices is not None:
            out["hosts"] = self.hosts_dict()
        return out

    def hosts_dict(self) -> dict[str, Any]:
        """``{"count", "rank", "devices"}`` of a multi-host output (the manifest's ``hosts``)."""
        held = self.held_devices
        return {"count": self.host_count, "rank": self.host_rank, "devices": list(held)}

    @property
    def held_devices(self) -> tuple[int, ...]:
        """Device ranks whose stores this output holds."""
        return self.host_devices if self.host_devices is not None else tuple(range(self.devices))


@dataclass
class Plan:
    config: MiMoConfig
    options: Options
    layout: dict[str, Any]
    units: list[Unit]
    inventory: dict[str, HubTensor]

    def arrays(self) -> Iterator[tuple[Unit, OutputArray]]:
        for u in self.units:
            for a in u.outputs:
                yield u, a

    def store_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, a in self.arrays():
            out[a.store] = out.get(a.store, 0) + a.nbytes
        return out

    @property
    def stores(self) -> list[str]:
        """The stores this output holds: shared, then each held device's."""
        return [SHARED] + [device_store(r) for r in self.options.held_devices]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.options.layers or tuple(range(self.config.num_hidden_layers))

    def source_bytes(self) -> int:
        """Bytes of the distinct source tensors the plan reads."""
        tensors = {s for u in self.units for s in u.sources}
        return sum(self.inventory[n].nbytes for n in tensors)


# ------------------------------------------------------------------------------ option parsing
def parse_indices(spec: str | None, limit: int, option: str) -> tuple[int, ...] | None:
    """``"0-3,7"`` -> (0, 1, 2, 3, 7); ``None``/``"all"`` -> None. Values must lie in [0, limit).

    Ranges are clipped to ``[0, limit)`` before they are expanded, so a huge range costs nothing.
    """
    if spec is None or spec.strip() == "all":
        return None
    out: list[int] = []
    bad: list[int] = []  # the first out-of-range value
    n_bad = 0
    for part in spec.split(","):
        part = part.strip()
        try:
            a, b = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
        except ValueError:
            raise InputError(f"{option} {spec!r}: {part!r} is not an index or a range") from None
        if b < a:
            raise InputError(f"{option} {spec!r}: range {part!r} runs backwards")
        below, above = max(0, min(b, -1) - a + 1), max(0, b - max(a, limit) + 1)
        if below or above:
            bad = bad or [a if below else max(a, limit)]
            n_bad += below + above
        out.extend(range(max(a, 0), min(b, limit - 1) + 1))
        if len(out) > limit:
            break  # a repeat, reported below
    if n_bad:
        more = f" and {n_bad - 1} more are" if n_bad > 1 else " is"
        raise InputError(f"{option} {spec!r}: {bad[0]}{more} out of range (valid: 0-{limit - 1})")
    if len(set(out)) != len(out):
        raise InputError(f"{option} {spec!r}: repeated values")
    return tuple(sorted(out))


def make_options(
    cfg: MiMoConfig,
    devices: int,
    dtype: str = "bfloat16",
    layers: str | None = None,
    experts: str | None = None,
    expert_dtype: str = "bfloat16",
    expert_map: dict[int, list[list[int]]] | None = None,
) -> Options:
    """Options from command-line values; ``--layers``/``--experts`` are checked against ``cfg``;
    ``expert_map`` is a validated ``--expert-map`` (:func:`pipeline.placement.read_map`)."""
    return Options(
        devices=devices,
        dtype=dtype,
        layers=parse_indices(layers, cfg.num_hidden_layers, "--layers"),
        experts=parse_indices(experts, cfg.n_routed_experts, "--experts"),
        expert_dtype=expert_dtype,
        expert_map=(
            tuple((k, tuple(tuple(b) for b in v)) for k, v in sorted(expert_map.items()))
            if expert_map
            else None
        ),
    )


def check_devices(cfg: MiMoConfig, options: Options) -> None:
    """``--devices`` must divide heads, experts, the dense MLP and the vocabulary."""
    n = options.devices
    if n < 1:
        raise InputError(f"--devices {n}: must be >= 1")
    experts = len(options.experts) if options.experts is not None else cfg.n_routed_experts
    for total, what in divisibility(cfg, experts):
        if options.experts is not None and what == "routed experts":
            what = "--experts subset"
        if total % n:
            raise InputError(f"--devices {n} does not divide the {total} {what}")
    if options.dtype not in DTYPES:
        raise InputError(f"--dtype {options.dtype!r}: choose from {', '.join(DTYPES)}")
    if options.expert_dtype not in EXPERT_DTYPES:
        raise InputError(
            f"--expert-dtype {options.expert_dtype!r}: choose from {', '.join(EXPERT_DTYPES)}"
        )
    if options.fp8_experts and cfg.quant is None:
        raise InputError(
            f"--expert-dtype {options.expert_dtype}: the checkpoint's experts are not FP8 "
            "(its config has no quantization_config)"
        )


def expert_map(
    cfg: MiMoConfig, options: Options, layers: tuple[int, ...]
) -> dict[int, list[list[int]]]:
    """Global expert ids held by each rank's slots, per MoE layer: the ``--expert-map`` layers,
    else contiguous blocks of present experts."""
    present = list(options.experts or range(cfg.n_routed_experts))
    blocks = contiguous_expert_map(present, options.devices)
    custom = options.custom_map()
    return {
        layer: [list(b) for b in custom.get(layer, blocks)]
        for layer in layers
        if cfg.mlp_types[layer] == MOE
    }


# ----------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class Part:
    """What rank ``rank`` holds of one array kind (the fields its split uses)."""

    rank: int
    q_heads: tuple[int, int] = (0, 0)
    kv_heads: tuple[int, int] = (0, 0)
    intermediate: tuple[int, int] = (0, 0)
    experts: tuple[int, ...] = ()
    vocab: tuple[int, int] = (0, 0)


def _sizes(cfg: MiMoConfig, layer: int | None, part: Part) -> dict[str, int]:
    """Values of the layout's shape symbols for ``part`` (see :mod:`mimo.layout`)."""
    h0, h1 = part.q_heads
    g0, g1 = part.kv_heads
    i0, i1 = part.intermediate
    spec = cfg.layer(layer) if layer is not None else None
    d, dv = (spec.head_dim, spec.v_head_dim) if spec else (0, 0)
    bm, bn = cfg.quant.block if cfg.quant else (128, 128)
    return {
        "⌈H/b⌉": ceil_div(cfg.hidden_size, bn),  # blocks along H (the weight's columns)
        "⌈I/b⌉": ceil_div(cfg.moe_intermediate_size, bm),
        "2·⌈I/b⌉": 2 * ceil_div(cfg.moe_intermediate_size, bm),
        "H": cfg.hidden_size,
        "V": cfg.vocab_size,
        "E": cfg.n_routed_experts,
        "I": cfg.moe_intermediate_size,
        "2I": 2 * cfg.moe_intermediate_size,
        "heads": h1 - h0,
        "qkv": (h1 - h0) * d + (g1 - g0) * (d + dv),
        "heads·d_v": (h1 - h0) * dv,
        "E/N": len(part.experts),
        "I_d/N": i1 - i0,
        "2·I_d/N": 2 * (i1 - i0),
        "V/N": part.vocab[1] - part.vocab[0],
    }


class _Builder:
    """Expands layout rows into units for one config and options."""

    def __init__(self, cfg: MiMoConfig, options: Options, layers: tuple[int, ...]) -> None:
        self.cfg, self.options = cfg, options
        self.inventory = {s.name: s for s in hub_inventory(cfg)}
        self.emap = expert_map(cfg, options, layers)
        # bf16 experts follow --dtype (float32 output: float32 experts too)
        self.expert_dtype = options.expert_dtype if options.fp8_experts else options.dtype

    def rows(self, kinds: Iterator[ArrayKind], layer: int | None) -> list[Unit]:
        """Units of ``kinds``; a ``unit_with`` row becomes a second output of its partner's units
        (one read writes codes and scales together)."""
        kinds = list(kinds)
        units = {k.key: self.units(k, layer) for k in kinds if not k.unit_with}
        for k in kinds:
            if k.unit_with:
                extra = self.units(k, layer)
                units[k.unit_with] = [
                    replace(u, outputs=u.outputs + e.outputs)
                    for u, e in zip(units[k.unit_with], extra, strict=True)
                ]
        return [u for us in units.values() for u in us]


    def parts(self, split: str, layer: int | None) -> list[Part]:
        n, cfg = self.options.devices, self.cfg
        if split == WHOLE:
            return [Part(0)]
        if split == HEADS:
            return [
                Part(r, q_heads=q, kv_heads=kv)
                for r, (q, kv) in enumerate(attention_heads(cfg, layer, n))
            ]
        if split == INTERMEDIATE:
            slices = even_split(cfg.intermediate_size, n)
            return [Part(r, intermediate=x) for r, x in enumerate(slices)]
        if split == EXPERTS:
            return [Part(r, experts=tuple(e)) for r, e in enumerate(self.emap[layer])]
        if split == VOCAB:
            return [Part(r, vocab=x) for r, x in enumerate(even_split(cfg.vocab_size, n))]
        raise ValueError(f"unknown split {split!r}")

    def inputs(self, kind: ArrayKind, layer: int | None, part: Part) -> dict[str, tuple[str, ...]]:
        """Tensor names per transform input (``expert.*`` roles: one per held expert)."""
        out = {}
        for key, role in kind.inputs.items():
            if role.startswith("expert."):
                out[key] = tuple(names.name(role, layer, e) for e in part.experts)
            else:
                out[key] = (names.name(role, layer),)
        return out

    def sources(self, inputs: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        """Every tensor the inputs read, each FP8 weight followed by its scale grid; experts
        interleaved (expert 0's inputs, then expert 1's), in file order."""
        out: list[str] = []
        for group in zip(*inputs.values(), strict=True):
            for tensor in group:
                out.append(tensor)
                scale = names.scale_name(tensor)
                if tensor.endswith(".weight") and scale in self.inventory:
                    out.append(scale)
        return tuple(out)

    def array(self, kind: ArrayKind, layer: int | None, part: Part) -> OutputArray:
        sizes = _sizes(self.cfg, layer, part)
        store = SHARED if kind.store == SHARED_STORE else device_store(part.rank)
        dtype = {F32: F32, EXPERT_DTYPE: self.expert_dtype}.get(kind.dtype, self.options.dtype)
        return OutputArray(store, kind.at(layer), tuple(sizes[s] for s in kind.shape), dtype)

    def units(self, kind: ArrayKind, layer: int | None) -> list[Unit]:
        parts = self.parts(kind.split, layer)
        path = kind.at(layer)
        if not kind.unit_per_rank:  # one read of the source, one piece per rank
            inputs = self.inputs(kind, layer, parts[0])
            outputs = tuple(self.array(kind, layer, p) for p in parts)
            size = outputs[0].shape[0]  # each rank's slice of the split source dimension
            ranges = [[p.rank * size, (p.rank + 1) * size] for p in parts]
            key = "source_cols" if kind.transform == "transpose_split" else "source_rows"
            return [
                Unit(path, kind.transform, self.sources(inputs), outputs, {key: ranges}, inputs)
            ]
        units = []
        for p in parts:
            inputs = self.inputs(kind, layer, p)
            uid = path if kind.split == WHOLE else f"{path}@{device_store(p.rank)}"
            units.append(
                Unit(
                    uid,
                    kind.transform,
                    self.sources(inputs),
                    (self.array(kind, layer, p),),
                    _params(kind, layer, p),
                    inputs,
                )
            )
        return units


def _params(kind: ArrayKind, layer: int | None, p: Part) -> dict[str, Any]:
    """Transform parameters of a per-rank unit."""
    if kind.split == HEADS:
        return {"layer": layer, "q_heads": list(p.q_heads), "kv_heads": list(p.kv_heads)}
    if kind.split == EXPERTS:
        return {"layer": layer, "experts": list(p.experts)}
    if kind.split == INTERMEDIATE:
        return {"source_rows": list(p.intermediate)}
    if kind.split == VOCAB:
        return {"source_rows": list(p.vocab)}
    return {}


def build_plan(cfg: MiMoConfig, options: Options) -> Plan:
    """The full plan for ``cfg`` and ``options`` (validated): every layout row, in table order,
    model rows first and last, layer rows for each converted layer."""
    check_devices(cfg, options)
    n = options.devices
    layers = options.layers or tuple(range(cfg.num_hidden_layers))
    b = _Builder(cfg, options, layers)
    units = b.rows(model_arrays("first"), None)
    for layer in layers:
        units += b.rows(layer_arrays(cfg.layer(layer), options.fp8_experts), layer)
    units += b.rows(model_arrays("last"), None)
    layout = {
        "devices": n,
        "attention": {
            str(layer): [
                {"q_heads": list(q), "kv_heads": list(kv)}
                for q, kv in attention_heads(cfg, layer, n)
            ]
            for layer in layers
        },
        "expert_map": {str(layer): blocks for layer, blocks in b.emap.items()},
        "vocab": [list(x) for x in even_split(cfg.vocab_size, n)],
        "mlp_intermediate": [list(x) for x in even_split(cfg.intermediate_size, n)],
    }
    return Plan(cfg, options, layout, units, b.inventory)
