"""Every tensor of a MiMo-V2-Flash hub checkpoint, derived from its config.

The hub layout is per layer (``model_{L}.safetensors``, ``model_{L}_linear_fc1/fc2``,
``model_embedding``, ``model_final``, ``model_mtp``). FP8 linears carry a ``weight_scale_inv`` grid
of ``ceil(rows/128) x ceil(cols/128)`` F32 multipliers, except ``k_proj`` on full-attention layers:
those quantise each KV head's ``[K_h; V_h]`` rows as one unit, so the k grid has
``kv_heads * ceil(head_dim/128)`` rows (8 for the real model, not 6) and V's first rows borrow a k
scale (see :mod:`pipeline.fp8`). This table is what the synthetic writer writes, what the converter
checks every source header against, and what the dry-run plans from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from loader.config import FULL, MOE, LayerSpec, MiMoConfig

F8 = "F8_E4M3"
BF16 = "BF16"
F32 = "F32"
ITEMSIZE = {F8: 1, BF16: 2, "F16": 2, F32: 4}
FLOAT_DTYPES = (BF16, F32, "F16")  # accepted for tensors the config does not pin down

SCALE_SUFFIX = "weight_scale_inv"
MTP_LAYERS = 3  # the real checkpoint ships 3 MTP layers; its config does not say so


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the hub checkpoint."""

    name: str
    dtype: str  # safetensors dtype string written by the real checkpoint
    shape: tuple[int, ...]
    file: str
    accepts: tuple[str, ...] = ()  # further dtypes a valid checkpoint may use instead

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def allows(self, dtype: str) -> bool:
        return dtype == self.dtype or dtype in self.accepts


def layer_file(layer: int) -> str:
    return f"model_{layer}.safetensors"


def fc1_file(layer: int) -> str:
    return f"model_{layer}_linear_fc1.safetensors"


def fc2_file(layer: int) -> str:
    return f"model_{layer}_linear_fc2.safetensors"


EMBED_FILE = "model_embedding.safetensors"
FINAL_FILE = "model_final.safetensors"
MTP_FILE = "model_mtp.safetensors"


def scale_name(weight: str) -> str:
    """The scale grid of an FP8 weight: ``...q_proj.weight`` -> ``...q_proj.weight_scale_inv``."""
    return weight[: -len("weight")] + SCALE_SUFFIX


@dataclass(frozen=True)
class KVGridRows:
    """Scale-grid rows of a layer's k and v under the two readings of the checkpoint."""

    fused_k: int  # kv_heads * ceil(head_dim / 128): 8 for the real full layers
    fused_v: int  # kv_heads * (blocks of [K_h; V_h] past K): 4
    standard_k: int  # ceil(kv_heads * head_dim / 128): 6
    standard_v: int  # ceil(kv_heads * v_head_dim / 128): 4


def kv_grid_rows(spec: LayerSpec, block_rows: int) -> KVGridRows:
    """Grid rows of k and v, fused per head ``[K_h; V_h]`` (full layers) or standard.

    Each head's ``[K_h (head_dim rows); V_h (v_head_dim rows)]`` is cut into ``block_rows`` blocks;
    blocks starting inside K live in k's grid, the rest in v's. Real model per head: (2, 1).
    """
    k_blocks = ceil_div(spec.head_dim, block_rows)
    v_blocks = ceil_div(spec.head_dim + spec.v_head_dim, block_rows) - k_blocks
    return KVGridRows(
        fused_k=spec.kv_heads * k_blocks,
        fused_v=spec.kv_heads * v_blocks,
        standard_k=ceil_div(spec.kv_heads * spec.head_dim, block_rows),
        standard_v=ceil_div(spec.kv_heads * spec.v_head_dim, block_rows),
    )


def scale_shape(cfg: MiMoConfig, rows: int, cols: int) -> tuple[int, int]:
    """Standard block grid of a ``[rows, cols]`` FP8 weight."""
    bm, bn = cfg.quant.block
    return ceil_div(rows, bm), ceil_div(cols, bn)


def is_quantised(cfg: MiMoConfig, module: str) -> bool:
    """Whether the linear ``module`` (hub module name, no ``.weight``) is stored as FP8.

    ``ignored_layers`` spells the MTP layers' modules with SGLang's module path
    (``model.decoder.self_attn.o_proj``); it stands for every ``model.mtp.layers.{i}`` module.
    """
    if cfg.quant is None:
        return False
    ignored = cfg.quant.ignored_layers
    return module not in ignored and _MTP_PREFIX.sub("model.decoder.", module) not in ignored


_MTP_PREFIX = re.compile(r"^model\.mtp\.layers\.\d+\.")


def _linear(
    cfg: MiMoConfig,
    module: str,
    rows: int,
    cols: int,
    file: str,
    grid: tuple[int, int] | None = None,
) -> Iterator[TensorSpec]:
    if is_quantised(cfg, module):
        yield TensorSpec(f"{module}.weight", F8, (rows, cols), file)
        yield TensorSpec(
            f"{module}.{SCALE_SUFFIX}", F32, grid or scale_shape(cfg, rows, cols), file
        )
    else:
        yield TensorSpec(f"{module}.weight", BF16, (rows, cols), file, FLOAT_DTYPES)


def _norm(name: str, size: int, file: str) -> TensorSpec:
    return TensorSpec(name, BF16, (size,), file, FLOAT_DTYPES)


def attention_tensors(
    cfg: MiMoConfig, prefix: str, spec: LayerSpec, file: str
) -> Iterator[TensorSpec]:
    """q/k/v/o (+ scales) and the sink of one attention block; ``prefix`` ends in ``self_attn``."""
    h = cfg.hidden_size
    q_rows = spec.q_heads * spec.head_dim
    k_rows = spec.kv_heads * spec.head_dim
    v_rows = spec.kv_heads * spec.v_head_dim
    k_grid = v_grid = None
    if spec.attention == FULL and cfg.quant is not None:
        rows = kv_grid_rows(spec, cfg.quant.block[0])
        ncols = ceil_div(h, cfg.quant.block[1])
        k_grid, v_grid = (rows.fused_k, ncols), (rows.fused_v, ncols)
    yield from _linear(cfg, f"{prefix}.q_proj", q_rows, h, file)
    yield from _linear(cfg, f"{prefix}.k_proj", k_rows, h, file, k_grid)
    yield from _linear(cfg, f"{prefix}.v_proj", v_rows, h, file, v_grid)
    yield from _linear(cfg, f"{prefix}.o_proj", h, spec.q_heads * spec.v_head_dim, file)
    if spec.sinks:
        yield TensorSpec(f"{prefix}.attention_sink_bias", BF16, (spec.q_heads,), file, (F32,))


def dense_mlp_tensors(cfg: MiMoConfig, prefix: str, file: str) -> Iterator[TensorSpec]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    yield from _linear(cfg, f"{prefix}.gate_proj", i, h, file)
    yield from _linear(cfg, f"{prefix}.up_proj", i, h, file)
    yield from _linear(cfg, f"{prefix}.down_proj", h, i, file)


def expert_tensors(cfg: MiMoConfig, layer: int, expert: int) -> Iterator[TensorSpec]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    yield from _linear(cfg, f"{p}.gate_proj", i, h, fc1_file(layer))
    yield from _linear(cfg, f"{p}.up_proj", i, h, fc1_file(layer))
    yield from _linear(cfg, f"{p}.down_proj", h, i, fc2_file(layer))


def layer_tensors(cfg: MiMoConfig, layer: int) -> Iterator[TensorSpec]:
    """Every tensor of decoder layer ``layer``, experts included."""
    spec = cfg.layer(layer)
    p, f, h = f"model.layers.{layer}", layer_file(layer), cfg.hidden_size
    yield _norm(f"{p}.input_layernorm.weight", h, f)
    yield _norm(f"{p}.post_attention_layernorm.weight", h, f)
    yield from attention_tensors(cfg, f"{p}.self_attn", spec, f)
    if spec.mlp == MOE:
        e = cfg.n_routed_experts
        yield TensorSpec(f"{p}.mlp.gate.weight", F32, (e, h), f)
        yield TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", F32, (e,), f)
        for expert in range(e):
            yield from expert_tensors(cfg, layer, expert)
    else:
        yield from dense_mlp_tensors(cfg, f"{p}.mlp", f)


def mtp_tensors(cfg: MiMoConfig, index: int) -> Iterator[TensorSpec]:
    """One multi-token-prediction layer (sliding attention, dense MLP), all in ``model_mtp``."""
    p, f, h = f"model.mtp.layers.{index}", MTP_FILE, cfg.hidden_size
    swa = next((s for s in cfg.layers if s.attention != FULL), None) or cfg.layer(0)
    spec = LayerSpec(
        index,
        swa.attention,
        swa.q_heads,
        swa.kv_heads,
        swa.head_dim,
        swa.v_head_dim,
        swa.rope_theta,
        swa.rotary_dim,
        True,
        swa.window,
        "dense",
    )
    yield _norm(f"{p}.enorm.weight", h, f)
    yield _norm(f"{p}.hnorm.weight", h, f)
    yield TensorSpec(f"{p}.eh_proj.weight", BF16, (h, 2 * h), f, FLOAT_DTYPES)
    yield _norm(f"{p}.input_layernorm.weight", h, f)
    yield from attention_tensors(cfg, f"{p}.self_attn", spec, f)
    yield _norm(f"{p}.pre_mlp_layernorm.weight", h, f)
    yield from dense_mlp_tensors(cfg, f"{p}.mlp", f)
    yield _norm(f"{p}.final_layernorm.weight", h, f)


def hub_inventory(cfg: MiMoConfig, mtp_layers: int = 0) -> list[TensorSpec]:
    """Every tensor of the hub checkpoint for ``cfg``: embedding, layers, final, then MTP.

    ``mtp_layers`` is how many MTP layers the checkpoint carries (the real one: 3); the converter
    does not convert them but the inventory lists them so a full index can be checked.
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [TensorSpec("model.embed_tokens.weight", BF16, (v, h), EMBED_FILE, FLOAT_DTYPES)]
    for layer in range(cfg.num_layers):
        out.extend(layer_tensors(cfg, layer))
    out.append(TensorSpec("lm_head.weight", BF16, (v, h), FINAL_FILE, FLOAT_DTYPES))
    out.append(_norm("model.norm.weight", h, FINAL_FILE))
    for i in range(mtp_layers):
        out.extend(mtp_tensors(cfg, i))
    return out


def is_mtp(name: str) -> bool:
    return name.startswith("model.mtp.")
