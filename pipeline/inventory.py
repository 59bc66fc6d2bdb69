"""Every tensor of a MiMo-V2-Flash hub checkpoint, derived from its config.

The hub layout is per layer (``model_{L}.safetensors``, ``model_{L}_linear_fc1/fc2``,
``model_embedding``, ``model_final``, ``model_mtp``). FP8 linears carry a ``weight_scale_inv`` grid
of ``ceil(rows/128) x ceil(cols/128)`` F32 multipliers, except ``k_proj`` on full-attention layers:
those quantise each KV head's ``[K_h; V_h]`` rows as one unit, so the k grid has
``kv_heads * ceil(head_dim/128)`` rows (8 for the real model, not 6) and V's first rows borrow a k
scale (see :mod:`mimo.fp8`). This table is what the synthetic writer writes, what the converter
checks every source header against, and what the dry-run plans from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from mimo import names
from mimo.config import FULL, MOE, LayerSpec, MiMoConfig
from mimo.fp8 import expected_grids, standard_grid
from mimo.names import scale_name

F8 = "F8_E4M3"
BF16 = "BF16"
F32 = "F32"
ITEMSIZE = {F8: 1, BF16: 2, "F16": 2, F32: 4}
FLOAT_DTYPES = (BF16, F32, "F16")  # accepted for tensors the config does not pin down

MTP_LAYERS = 3  # the real checkpoint ships 3 MTP layers; its config does not say so


@dataclass(frozen=True)
class HubTensor:
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
    weight: str,
    rows: int,
    cols: int,
    file: str,
    grid: tuple[int, int] | None = None,
) -> Iterator[HubTensor]:
    """An FP8 weight and its scale grid, or a float weight when ``ignored_layers`` names it."""
    if is_quantised(cfg, names.module(weight)):
        yield HubTensor(weight, F8, (rows, cols), file)
        yield HubTensor(
            scale_name(weight), F32, grid or standard_grid(rows, cols, cfg.quant.block), file
        )
    else:
        yield HubTensor(weight, BF16, (rows, cols), file, FLOAT_DTYPES)


def _norm(name: str, size: int, file: str) -> HubTensor:
    return HubTensor(name, BF16, (size,), file, FLOAT_DTYPES)


def attention_tensors(
    cfg: MiMoConfig, spec: LayerSpec, file: str, mtp: bool = False
) -> Iterator[HubTensor]:
    """q/k/v/o (+ scales) and the sink of one attention block (decoder or MTP layer)."""
    h, i = cfg.hidden_size, spec.index
    role = "mtp.{}".format if mtp else str
    grids = expected_grids(cfg, spec)
    rows = {
        "q_proj": spec.q_heads * spec.head_dim,
        "k_proj": spec.kv_heads * spec.head_dim,
        "v_proj": spec.kv_heads * spec.v_head_dim,
    }
    for proj, r in rows.items():
        yield from _linear(cfg, names.name(role(proj), i), r, h, file, grids.get(proj))
    o_cols = spec.q_heads * spec.v_head_dim
    yield from _linear(cfg, names.name(role("o_proj"), i), h, o_cols, file)
    if spec.sinks:
        sink = names.name(role("attention_sink_bias"), i)
        yield HubTensor(sink, BF16, (spec.q_heads,), file, (F32,))


def dense_mlp_tensors(cfg: MiMoConfig, layer: int, file: str, mtp: bool = False):
    """gate/up/down (+ scales) of a dense MLP (decoder or MTP layer)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    role = "mtp.{}".format if mtp else str
    yield from _linear(cfg, names.name(role("gate_proj"), layer), i, h, file)
    yield from _linear(cfg, names.name(role("up_proj"), layer), i, h, file)
    yield from _linear(cfg, names.name(role("down_proj"), layer), h, i, file)


def expert_tensors(cfg: MiMoConfig, layer: int, expert: int) -> Iterator[HubTensor]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    yield from _linear(cfg, names.name("expert.gate_proj", layer, expert), i, h, fc1_file(layer))
    yield from _linear(cfg, names.name("expert.up_proj", layer, expert), i, h, fc1_file(layer))
    yield from _linear(cfg, names.name("expert.down_proj", layer, expert), h, i, fc2_file(layer))


def layer_tensors(cfg: MiMoConfig, layer: int) -> Iterator[HubTensor]:
    """Every tensor of decoder layer ``layer``, experts included."""
    spec = cfg.layer(layer)
    f, h = layer_file(layer), cfg.hidden_size
    yield _norm(names.name("input_layernorm", layer), h, f)
    yield _norm(names.name("post_attention_layernorm", layer), h, f)
    yield from attention_tensors(cfg, spec, f)
    if spec.mlp == MOE:
        e = cfg.n_routed_experts
        yield HubTensor(names.name("router", layer), F32, (e, h), f)
        yield HubTensor(names.name("router_bias", layer), F32, (e,), f)
        for expert in range(e):
            yield from expert_tensors(cfg, layer, expert)
    else:
        yield from dense_mlp_tensors(cfg, layer, f)


def mtp_tensors(cfg: MiMoConfig, index: int) -> Iterator[HubTensor]:
    """One multi-token-prediction layer (sliding attention with sinks, dense MLP)."""
    f, h = MTP_FILE, cfg.hidden_size
    swa = next((s for s in cfg.layers if s.attention != FULL), cfg.layer(0))
    spec = replace(swa, index=index, sinks=True, mlp="dense")

    def norm(role: str) -> HubTensor:
        return _norm(names.name(f"mtp.{role}", index), h, f)

    yield norm("enorm")
    yield norm("hnorm")
    yield HubTensor(names.name("mtp.eh_proj", index), BF16, (h, 2 * h), f, FLOAT_DTYPES)
    yield norm("input_layernorm")
    yield from attention_tensors(cfg, spec, f, mtp=True)
    yield norm("pre_mlp_layernorm")
    yield from dense_mlp_tensors(cfg, index, f, mtp=True)
    yield norm("final_layernorm")


def hub_inventory(cfg: MiMoConfig, mtp_layers: int = 0) -> list[HubTensor]:
    """Every tensor of the hub checkpoint for ``cfg``: embedding, layers, final, then MTP.

    ``mtp_layers`` is how many MTP layers the checkpoint carries (the real one: 3); the converter
    does not convert them but the inventory lists them so a full index can be checked.
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [HubTensor(names.name("embed_tokens"), BF16, (v, h), EMBED_FILE, FLOAT_DTYPES)]
    for layer in range(cfg.num_hidden_layers):
        out.extend(layer_tensors(cfg, layer))
    out.append(HubTensor(names.name("lm_head"), BF16, (v, h), FINAL_FILE, FLOAT_DTYPES))
    out.append(_norm(names.name("norm"), h, FINAL_FILE))
    for i in range(mtp_layers):
        out.extend(mtp_tensors(cfg, i))
    return out
