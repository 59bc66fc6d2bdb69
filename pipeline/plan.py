"""The conversion plan: one table of output arrays, grouped into work units.

A *unit* is one read of some source tensors producing one or more output arrays with a named
transform (see :mod:`pipeline.transforms`). Units are journaled; a unit's arrays become durable
together. The converter executes the units, ``--dry-run`` prints them, the manifest records them.

Layout for ``N`` devices (``x @ W`` kernel layout, ``W`` stored ``[in, out]``):

- attention, tensor-parallel: rank r holds query heads ``[r*Q/N, (r+1)*Q/N)``, the KV heads they
  read (replicated when N exceeds the KV heads), their sinks, and the matching rows of ``o``;
- experts, expert-parallel: rank r holds whole experts per MoE layer, listed in the expert map
  (contiguous blocks by default);
- layer-0 dense MLP: intermediate dimension split over N; ``lm_head``: vocabulary split over N;
- ``shared``: embedding, every norm, routers and correction biases, written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from loader.config import MOE, MiMoConfig
from loader.format import SHARED, device_store, nbytes
from pipeline.errors import InputError
from pipeline.inventory import TensorSpec, hub_inventory, scale_name

DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class ArraySpec:
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
    """One read of ``sources`` producing ``outputs`` through ``transform`` with ``params``."""

    id: str
    transform: str
    sources: tuple[str, ...]
    outputs: tuple[ArraySpec, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "dtype": self.dtype,
            "layers": list(self.layers) if self.layers is not None else None,
            "experts": list(self.experts) if self.experts is not None else None,
        }


@dataclass
class Plan:
    config: MiMoConfig
    options: Options
    layout: dict[str, Any]
    units: list[Unit]
    inventory: dict[str, TensorSpec]

    def arrays(self) -> Iterator[tuple[Unit, ArraySpec]]:
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
        return [SHARED] + [device_store(r) for r in range(self.options.devices)]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.options.layers or tuple(range(self.config.num_layers))

    def source_bytes(self) -> int:
        """Bytes of the distinct source tensors the plan reads."""
        names = {s for u in self.units for s in u.sources}
        return sum(self.inventory[n].nbytes for n in names)


# ------------------------------------------------------------------------------ option parsing
def parse_spec(spec: str | None, limit: int, option: str) -> tuple[int, ...] | None:
    """``"0-3,7"`` -> (0, 1, 2, 3, 7); ``None``/``"all"`` -> None. Values must lie in [0, limit)."""
    if spec is None or spec.strip() == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise InputError(f"{option} {spec!r}: range {part!r} runs backwards")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"{option} {spec!r}: {part!r} is not an index or a range") from None
    bad = [i for i in out if not 0 <= i < limit]
    if bad:
        more = f" and {len(bad) - 1} more are" if len(bad) > 1 else " is"
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
) -> Options:
    """Options from command-line values; ``--layers``/``--experts`` are checked against ``cfg``."""
    return Options(
        devices=devices,
        dtype=dtype,
        layers=parse_spec(layers, cfg.num_layers, "--layers"),
        experts=parse_spec(experts, cfg.n_routed_experts, "--experts"),
    )


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    step = total // parts
    return [(r * step, (r + 1) * step) for r in range(parts)]


def check_devices(cfg: MiMoConfig, options: Options) -> None:
    """``--devices`` must divide heads, experts, the dense MLP and the vocabulary."""
    n = options.devices
    if n < 1:
        raise InputError(f"--devices {n}: must be >= 1")
    experts = len(options.experts) if options.experts is not None else cfg.n_routed_experts
    which = "--experts subset" if options.experts is not None else "routed experts"
    checks = [
        (cfg.num_attention_heads, "attention heads (num_attention_heads)"),
        (cfg.swa_num_attention_heads, "sliding-window attention heads"),
        (experts, which),
        (cfg.intermediate_size, "dense MLP intermediate size"),
        (cfg.vocab_size, "vocabulary"),
    ]
    for total, what in checks:
        if total % n:
            raise InputError(f"--devices {n} does not divide the {total} {what}")
    if options.dtype not in DTYPES:
        raise InputError(f"--dtype {options.dtype!r}: choose from {', '.join(DTYPES)}")


def expert_map(
    cfg: MiMoConfig, options: Options, layers: tuple[int, ...]
) -> dict[int, list[list[int]]]:
    """Global expert ids held by each rank, per MoE layer: contiguous blocks of present experts."""
    present = (
        list(options.experts) if options.experts is not None else list(range(cfg.n_routed_experts))
    )
    per = len(present) // options.devices
    blocks = [present[r * per : (r + 1) * per] for r in range(options.devices)]
    return {layer: [list(b) for b in blocks] for layer in layers if cfg.mlp_types[layer] == MOE}


def attention_heads(
    cfg: MiMoConfig, layer: int, n: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per rank: (query-head range, KV-head range) on ``layer``."""
    spec = cfg.layer(layer)
    group = spec.q_heads // spec.kv_heads
    out = []
    for h0, h1 in _split(spec.q_heads, n):
        out.append(((h0, h1), (h0 // group, (h1 - 1) // group + 1)))
    return out


# ----------------------------------------------------------------------------------- building
def build_plan(cfg: MiMoConfig, options: Options) -> Plan:
    """The full plan for ``cfg`` and ``options`` (validated)."""
    check_devices(cfg, options)
    n, dt = options.devices, options.dtype
    layers = options.layers or tuple(range(cfg.num_layers))
    emap = expert_map(cfg, options, layers)
    inventory = {s.name: s for s in hub_inventory(cfg)}
    h, v = cfg.hidden_size, cfg.vocab_size
    units: list[Unit] = []

    def src(*names: str) -> tuple[str, ...]:
        """Names plus the scale of every FP8 weight among them."""
        out = []
        for name in names:
            out.append(name)
            scale = scale_name(name)
            if name.endswith(".weight") and scale in inventory:
                out.append(scale)
        return tuple(out)

    def shared(path: str, shape: tuple[int, ...], dtype: str = "float32") -> ArraySpec:
        return ArraySpec(SHARED, path, shape, dtype)

    def dev(r: int, path: str, shape: tuple[int, ...], dtype: str = dt) -> ArraySpec:
        return ArraySpec(device_store(r), path, shape, dtype)

    units.append(
        Unit("embed", "copy", src("model.embed_tokens.weight"), (shared("embed", (v, h), dt),))
    )
    for layer in layers:
        spec = cfg.layer(layer)
        p, lp = f"model.layers.{layer}", f"layers/{layer}"
        for hub, ours in (
            ("input_layernorm", "input_norm"),
            ("post_attention_layernorm", "post_attn_norm"),
        ):
            units.append(
                Unit(
                    f"{lp}/{ours}",
                    "copy",
                    src(f"{p}.{hub}.weight"),
                    (shared(f"{lp}/{ours}", (h,)),),
                )
            )
        if spec.mlp == MOE:
            e = cfg.n_routed_experts
            units.append(
                Unit(
                    f"{lp}/router",
                    "transpose",
                    src(f"{p}.mlp.gate.weight"),
                    (shared(f"{lp}/router", (h, e)),),
                )
            )
            units.append(
                Unit(
                    f"{lp}/router_bias",
                    "copy",
                    src(f"{p}.mlp.gate.e_score_correction_bias"),
                    (shared(f"{lp}/router_bias", (e,)),),
                )
            )
        # attention
        heads = attention_heads(cfg, layer, n)
        a = f"{p}.self_attn"
        qkv_src = src(f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight")
        for r, ((h0, h1), (g0, g1)) in enumerate(heads):
            width = (h1 - h0) * spec.head_dim + (g1 - g0) * (spec.head_dim + spec.v_head_dim)
            units.append(
                Unit(
                    f"{lp}/attn/qkv@{device_store(r)}",
                    "qkv",
                    qkv_src,
                    (dev(r, f"{lp}/attn/qkv", (h, width)),),
                    {"layer": layer, "q_heads": [h0, h1], "kv_heads": [g0, g1]},
                )
            )
        o_ranges = [[h0 * spec.v_head_dim, h1 * spec.v_head_dim] for (h0, h1), _ in heads]
        units.append(
            Unit(
                f"{lp}/attn/o",
                "transpose_split",
                src(f"{a}.o_proj.weight"),
                tuple(dev(r, f"{lp}/attn/o", (b - s, h)) for r, (s, b) in enumerate(o_ranges)),
                {"columns": o_ranges},
            )
        )
        if spec.sinks:
            ranges = [[h0, h1] for (h0, h1), _ in heads]
            units.append(
                Unit(
                    f"{lp}/attn/sinks",
                    "split_rows",
                    src(f"{a}.attention_sink_bias"),
                    tuple(
                        dev(r, f"{lp}/attn/sinks", (b - s,), "float32")
                        for r, (s, b) in enumerate(ranges)
                    ),
                    {"rows": ranges},
                )
            )
        # MLP
        if spec.mlp == MOE:
            im = cfg.moe_intermediate_size
            for r, experts in enumerate(emap[layer]):
                ex = f"{p}.mlp.experts"
                gu = src(
                    *(f"{ex}.{e}.{w}.weight" for e in experts for w in ("gate_proj", "up_proj"))
                )
                units.append(
                    Unit(
                        f"{lp}/experts/gate_up@{device_store(r)}",
                        "experts_gate_up",
                        gu,
                        (dev(r, f"{lp}/experts/gate_up", (len(experts), h, 2 * im)),),
                        {"layer": layer, "experts": experts},
                    )
                )
            for r, experts in enumerate(emap[layer]):
                ex = f"{p}.mlp.experts"
                dn = src(*(f"{ex}.{e}.down_proj.weight" for e in experts))
                units.append(
                    Unit(
                        f"{lp}/experts/down@{device_store(r)}",
                        "experts_down",
                        dn,
                        (dev(r, f"{lp}/experts/down", (len(experts), im, h)),),
                        {"layer": layer, "experts": experts},
                    )
                )
        else:
            ranges = [list(x) for x in _split(cfg.intermediate_size, n)]
            for r, (i0, i1) in enumerate(ranges):
                units.append(
                    Unit(
                        f"{lp}/mlp/gate_up@{device_store(r)}",
                        "gate_up",
                        src(f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
                        (dev(r, f"{lp}/mlp/gate_up", (h, 2 * (i1 - i0))),),
                        {"rows": [i0, i1]},
                    )
                )
            units.append(
                Unit(
                    f"{lp}/mlp/down",
                    "transpose_split",
                    src(f"{p}.mlp.down_proj.weight"),
                    tuple(
                        dev(r, f"{lp}/mlp/down", (i1 - i0, h)) for r, (i0, i1) in enumerate(ranges)
                    ),
                    {"columns": ranges},
                )
            )
    units.append(Unit("norm", "copy", src("model.norm.weight"), (shared("norm", (h,)),)))
    vocab = [list(x) for x in _split(v, n)]
    for r, (v0, v1) in enumerate(vocab):
        units.append(
            Unit(
                f"lm_head@{device_store(r)}",
                "transpose",
                src("lm_head.weight"),
                (dev(r, "lm_head", (h, v1 - v0)),),
                {"rows": [v0, v1]},
            )
        )

    layout = {
        "devices": n,
        "attention": {
            str(layer): [
                {"q_heads": list(q), "kv_heads": list(kv)}
                for q, kv in attention_heads(cfg, layer, n)
            ]
            for layer in layers
        },
        "expert_map": {str(layer): blocks for layer, blocks in emap.items()},
        "vocab": vocab,
        "mlp_intermediate": [list(x) for x in _split(cfg.intermediate_size, n)],
    }
    return Plan(cfg, options, layout, units, inventory)
