"""The checkpoint's tensor names: one table, one :func:`name` to format, one :func:`parse`.

Every tensor of the hub checkpoint has a *role* (``q_proj``, ``expert.down_proj``, ...) and at
most two indices: the decoder layer (``{layer}``, also the MTP layer for ``mtp.*`` roles) and the
routed expert (``{expert}``). FP8 weights carry a scale grid named by :func:`scale_name`.
See ``docs/checkpoint.md`` §2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALE_SUFFIX = "weight_scale_inv"
_LAYER = "model.layers.{layer}"
_MTP = "model.mtp.layers.{layer}"

# role -> hub name template
TENSORS: dict[str, str] = {
    "embed_tokens": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_layernorm": f"{_LAYER}.input_layernorm.weight",
    "post_attention_layernorm": f"{_LAYER}.post_attention_layernorm.weight",
    "q_proj": f"{_LAYER}.self_attn.q_proj.weight",
    "k_proj": f"{_LAYER}.self_attn.k_proj.weight",
    "v_proj": f"{_LAYER}.self_attn.v_proj.weight",
    "o_proj": f"{_LAYER}.self_attn.o_proj.weight",
    "attention_sink_bias": f"{_LAYER}.self_attn.attention_sink_bias",
    "gate_proj": f"{_LAYER}.mlp.gate_proj.weight",
    "up_proj": f"{_LAYER}.mlp.up_proj.weight",
    "down_proj": f"{_LAYER}.mlp.down_proj.weight",
    "router": f"{_LAYER}.mlp.gate.weight",
    "router_bias": f"{_LAYER}.mlp.gate.e_score_correction_bias",
    "expert.gate_proj": f"{_LAYER}.mlp.experts.{{expert}}.gate_proj.weight",
    "expert.up_proj": f"{_LAYER}.mlp.experts.{{expert}}.up_proj.weight",
    "expert.down_proj": f"{_LAYER}.mlp.experts.{{expert}}.down_proj.weight",
    "mtp.enorm": f"{_MTP}.enorm.weight",
    "mtp.hnorm": f"{_MTP}.hnorm.weight",
    "mtp.eh_proj": f"{_MTP}.eh_proj.weight",
    "mtp.input_layernorm": f"{_MTP}.input_layernorm.weight",
    "mtp.q_proj": f"{_MTP}.self_attn.q_proj.weight",
    "mtp.k_proj": f"{_MTP}.self_attn.k_proj.weight",
    "mtp.v_proj": f"{_MTP}.self_attn.v_proj.weight",
    "mtp.o_proj": f"{_MTP}.self_attn.o_proj.weight",
    "mtp.attention_sink_bias": f"{_MTP}.self_attn.attention_sink_bias",
    "mtp.pre_mlp_layernorm": f"{_MTP}.pre_mlp_layernorm.weight",
    "mtp.gate_proj": f"{_MTP}.mlp.gate_proj.weight",
    "mtp.up_proj": f"{_MTP}.mlp.up_proj.weight",
    "mtp.down_proj": f"{_MTP}.mlp.down_proj.weight",
    "mtp.final_layernorm": f"{_MTP}.final_layernorm.weight",
}


@dataclass(frozen=True)
class Name:
    """A parsed tensor name: its role, indices, and whether it is the role's FP8 scale grid."""

    role: str
    layer: int | None = None
    expert: int | None = None
    scale: bool = False

    @property
    def is_mtp(self) -> bool:
        return self.role.startswith("mtp.")


def name(role: str, layer: int | None = None, expert: int | None = None) -> str:
    """The hub name of ``role`` at ``layer``/``expert``: ``name("q_proj", 5)``."""
    return TENSORS[role].format(layer=layer, expert=expert)


def scale_name(weight: str) -> str:
    """The scale grid of an FP8 weight: ``...q_proj.weight`` -> ``...q_proj.weight_scale_inv``."""
    return weight[: -len("weight")] + SCALE_SUFFIX


def module(weight: str) -> str:
    """The module a weight belongs to (``...q_proj.weight`` -> ``...q_proj``)."""
    return weight[: -len(".weight")]


def _pattern(template: str) -> re.Pattern[str]:
    esc = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
    esc = esc.replace(r"\{expert\}", r"(?P<expert>\d+)")
    if template.endswith(".weight"):
        esc = esc[: -len("weight")] + f"(?P<kind>weight|{SCALE_SUFFIX})"
    return re.compile(esc)


_PATTERNS = [(role, _pattern(t)) for role, t in TENSORS.items()]


def parse(tensor: str) -> Name | None:
    """The role and indices of a hub tensor name, or None for a name not in the table."""
    for role, pattern in _PATTERNS:
        m = pattern.fullmatch(tensor)
        if m:
            g = m.groupdict()
            return Name(
                role,
                int(g["layer"]) if g.get("layer") is not None else None,
                int(g["expert"]) if g.get("expert") is not None else None,
                g.get("kind") == SCALE_SUFFIX,
            )
    return None
