"""The parallel layout as data: one row per kind of output array.

Each row of :data:`ARRAYS` says where an array lives (``shared`` or each device's store), how it
is split over ``N`` ranks, which checkpoint tensors it is made from (by *role*, see
:mod:`mimo.names`), the transform that makes it, its shape (symbols, below) and on which layers
it exists. The converter's plan, the runtime's layer set-up, ``mimo-manifest``'s summaries and the
README's table of arrays are all derived from it.

Kernel layout is ``x @ W``: weights are stored ``[in, out]``. Shape symbols:

====================  =========================================================================
``H``, ``V``, ``E``   hidden size, vocabulary, routed experts
``I``                 ``moe_intermediate_size`` (one expert)
``V/N``, ``I_d/N``    this rank's vocabulary slice, dense-MLP intermediate slice
``heads``             this rank's query heads; ``qkv``: ``heads·d + kv·(d + d_v)`` columns
``heads·d_v``         rows of ``o`` for this rank's heads
``E/N``               this rank's experts (the expert map)
``⌈H/b⌉``, ``⌈I/b⌉``  FP8 scale blocks (``b`` = 128) along ``H`` and along ``I``
====================  =========================================================================

With ``--expert-dtype float8_*`` each expert array holds FP8 codes and a float32 scale array
beside it (``*_scale``) whose block grid is transposed with the weight; ``gate_up_scale`` is
gate's grid then up's grid along its last axis (each of gate and up has its own blocks).

Splits: ``whole`` (one array, shared store), ``heads`` (query heads, with the KV heads they read,
replicated when ``N`` exceeds the KV heads), ``intermediate`` (dense MLP), ``experts`` (whole
experts per rank), ``vocab``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mimo.config import DENSE, MOE, LayerSpec, MiMoConfig

SHARED_STORE = "shared"
DEVICE_STORE = "device"

WHOLE = "whole"
HEADS = "heads"
INTERMEDIATE = "intermediate"
EXPERTS = "experts"
VOCAB = "vocab"

# which layers an array exists on
EVERY = "every"
SINKS = "sinks"

# dtype: the output's --dtype, its --expert-dtype, or float32 whatever they are
OUT_DTYPE = "out"
EXPERT_DTYPE = "expert"
F32 = "float32"

# rows that exist only for some options
FP8_EXPERTS = "fp8_experts"  # --expert-dtype float8_*: each expert array has a scale array


@dataclass(frozen=True)
class ArrayKind:
    """One kind of output array (see the module docstring).

    ``path`` is a template (``layers/{layer}/attn/qkv``); ``inputs`` maps the transform's input
    names to checkpoint tensor roles (``expert.*`` roles stand for every expert the rank holds);
    ``unit_per_rank``: one work unit per rank, else one unit writes every rank's piece.
    """

    path: str
    store: str
    split: str
    inputs: dict[str, str]
    transform: str
    shape: tuple[str, ...]
    on: str = EVERY  # EVERY | MOE | DENSE | SINKS (layer rows); EVERY for model rows
    dtype: str = OUT_DTYPE
    unit_per_rank: bool = True
    scope: str = "layer"  # "first" (before layers) | "layer" | "last" (after layers)
    needs: str = ""  # "" (always) | FP8_EXPERTS
    unit_with: str = ""  # written by the unit of that row (its key), as a second output

    @property
    def key(self) -> str:
        """The array's name within its layer (``attn/qkv``) or model (``lm_head``)."""
        return self.path.removeprefix("layers/{layer}/")

    def at(self, layer: int | None = None) -> str:
        return self.path.format(layer=layer)


ARRAYS: tuple[ArrayKind, ...] = (
    ArrayKind("embed", SHARED_STORE, WHOLE, {"w": "embed_tokens"}, "copy", ("V", "H"),
              scope="first"),
    ArrayKind("layers/{layer}/input_norm", SHARED_STORE, WHOLE, {"w": "input_layernorm"}, "copy",
              ("H",), dtype=F32),
    ArrayKind("layers/{layer}/post_attn_norm", SHARED_STORE, WHOLE,
              {"w": "post_attention_layernorm"}, "copy", ("H",), dtype=F32),
    ArrayKind("layers/{layer}/router", SHARED_STORE, WHOLE, {"w": "router"}, "transpose",
              ("H", "E"), on=MOE, dtype=F32),
    ArrayKind("layers/{layer}/router_bias", SHARED_STORE, WHOLE, {"w": "router_bias"}, "copy",
              ("E",), on=MOE, dtype=F32),
    ArrayKind("layers/{layer}/attn/qkv", DEVICE_STORE, HEADS,
              {"q": "q_proj", "k": "k_proj", "v": "v_proj"}, "qkv", ("H", "qkv")),
    ArrayKind("layers/{layer}/attn/o", DEVICE_STORE, HEADS, {"w": "o_proj"}, "transpose_split",
              ("heads·d_v", "H"), unit_per_rank=False),
    ArrayKind("layers/{layer}/attn/sinks", DEVICE_STORE, HEADS, {"w": "attention_sink_bias"},
              "split_rows", ("heads",), on=SINKS, dtype=F32, unit_per_rank=False),
    ArrayKind("layers/{layer}/experts/gate_up", DEVICE_STORE, EXPERTS,
              {"gate": "expert.gate_proj", "up": "expert.up_proj"}, "experts_gate_up",
              ("E/N", "H", "2I"), on=MOE, dtype=EXPERT_DTYPE),
    ArrayKind("layers/{layer}/experts/gate_up_scale", DEVICE_STORE, EXPERTS,
              {"gate": "expert.gate_proj", "up": "expert.up_proj"}, "experts_gate_up",
              ("E/N", "⌈H/b⌉", "2·⌈I/b⌉"), on=MOE, dtype=F32, needs=FP8_EXPERTS,
              unit_with="experts/gate_up"),
    ArrayKind("layers/{layer}/experts/down", DEVICE_STORE, EXPERTS, {"down": "expert.down_proj"},
              "experts_down", ("E/N", "I", "H"), on=MOE, dtype=EXPERT_DTYPE),
    ArrayKind("layers/{layer}/experts/down_scale", DEVICE_STORE, EXPERTS,
              {"down": "expert.down_proj"}, "experts_down", ("E/N", "⌈I/b⌉", "⌈H/b⌉"), on=MOE,
              dtype=F32, needs=FP8_EXPERTS, unit_with="experts/down"),
    ArrayKind("layers/{layer}/mlp/gate_up", DEVICE_STORE, INTERMEDIATE,
              {"gate": "gate_proj", "up": "up_proj"}, "gate_up", ("H", "2·I_d/N"), on=DENSE),
    ArrayKind("layers/{layer}/mlp/down", DEVICE_STORE, INTERMEDIATE, {"w": "down_proj"},
              "transpose_split", ("I_d/N", "H"), on=DENSE, unit_per_rank=False),
    ArrayKind("norm", SHARED_STORE, WHOLE, {"w": "norm"}, "copy", ("H",), dtype=F32,
              scope="last"),
    ArrayKind("lm_head", DEVICE_STORE, VOCAB, {"w": "lm_head"}, "transpose", ("H", "V/N"),
              scope="last"),
)

BY_KEY: dict[str, ArrayKind] = {k.key: k for k in ARRAYS}


def exists_on(kind: ArrayKind, spec: LayerSpec) -> bool:
    """Whether a layer row's array exists on the layer ``spec`` describes."""
    return {
        EVERY: True,
        MOE: spec.mlp == MOE,
        DENSE: spec.mlp == DENSE,
        SINKS: spec.sinks,
    }[kind.on]


def model_arrays(scope: str) -> Iterator[ArrayKind]:
    """Rows of ``scope`` "first" or "last", table order."""
    return (k for k in ARRAYS if k.scope == scope)


def layer_arrays(spec: LayerSpec, fp8_experts: bool = False) -> Iterator[ArrayKind]:
    """The rows that exist on ``spec``'s layer (scale rows with FP8 experts), table order."""
    return (
        k
        for k in ARRAYS
        if k.scope == "layer" and exists_on(k, spec) and (not k.needs or fp8_experts)
    )


# ------------------------------------------------------------------------------ the splits
def even_split(total: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` equal slices of ``total`` (which they divide)."""
    step = total // parts
    return [(r * step, (r + 1) * step) for r in range(parts)]


def attention_heads(
    cfg: MiMoConfig, layer: int, n: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per rank: (query-head range, KV-head range) on ``layer``."""
    spec = cfg.layer(layer)
    group = spec.q_heads // spec.kv_heads
    heads = even_split(spec.q_heads, n)
    return [((h0, h1), (h0 // group, (h1 - 1) // group + 1)) for h0, h1 in heads]


def contiguous_expert_map(experts: list[int], n: int) -> list[list[int]]:
    """Experts per rank in contiguous blocks (the default expert map)."""
    per = len(experts) // n
    return [list(experts[r * per : (r + 1) * per]) for r in range(n)]


def divisibility(cfg: MiMoConfig, experts: int) -> list[tuple[int, str]]:
    """What ``--devices`` must divide: (count, what it counts)."""
    return [
        (cfg.num_attention_heads, "attention heads (num_attention_heads)"),
        (cfg.swa_num_attention_heads, "sliding-window attention heads"),
        (experts, "routed experts"),
        (cfg.intermediate_size, "dense MLP intermediate size"),
        (cfg.vocab_size, "vocabulary"),
    ]


def readme_table() -> str:
    """The README's table of output arrays, rendered from :data:`ARRAYS`."""
    rows = ["| array | store | split | shape | made from | on |", "|---|---|---|---|---|---|"]
    for k in ARRAYS:
        roles = ", ".join(f"`{r}`" for r in k.inputs.values())
        dtype = {F32: " (f32)", EXPERT_DTYPE: " (expert dtype)"}.get(k.dtype, "")
        store = "`shared.zarr`" if k.store == SHARED_STORE else "`device-RRR.zarr`"
        on = "model" if k.scope != "layer" else ("every layer" if k.on == EVERY else k.on)
        if k.needs == FP8_EXPERTS:
            on += ", FP8 experts"
        rows.append(
            f"| `{k.path}` | {store} | {k.split} | `[{', '.join(k.shape)}]`{dtype} | {roles} "
            f"| {on} |"
        )
    return "\n".join(rows)
