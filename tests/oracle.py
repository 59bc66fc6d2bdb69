"""The numerical oracle: transformers' MiMoV2FlashForCausalLM built from a hub checkpoint.

Independent of the project's code paths: tensors are read with the ``safetensors`` library
(torch framework, which understands F8 and BF16) and dequantised here in torch with the block
rule and the per-head fused K/V rule written out longhand. Quantised and BF16 tensors are rounded
to bfloat16 (what the converter stores) and the model computes in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mimo.config import FULL, MOE, MiMoConfig


def read_tensor(ckpt: Path, name: str, index: dict | None = None) -> torch.Tensor:
    """One tensor of the hub checkpoint, through the safetensors library."""
    index = index or json.loads((ckpt / "model.safetensors.index.json").read_text())
    with safe_open(ckpt / index["weight_map"][name], "pt") as f:
        return f.get_tensor(name)


def expand(scales: torch.Tensor, rows: int, cols: int, block=(128, 128)) -> torch.Tensor:
    """Per-element multipliers of a block grid, cropped to ``[rows, cols]``."""
    return scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


SAME = "same"


def dequantised_state(
    ckpt: Path,
    rounding: torch.dtype | None = torch.bfloat16,
    expert_rounding: torch.dtype | None | str = SAME,
) -> dict[str, torch.Tensor]:
    """Every main-model tensor, dequantised, as float32 holding ``rounding``-rounded values.

    ``rounding=None`` keeps float32 products. Router weight and correction bias stay float32.
    ``expert_rounding`` applies to routed experts instead (an FP8 expert store: None).
    Full-attention k/v use the fused rule:
    head h's rows ``[K_h; V_h]`` are cut into 128-row blocks with scale rows
    ``[k_scale[2h], k_scale[2h+1], v_scale[h]]`` (for head_dim 192, v_head_dim 128).
    """
    cfg = MiMoConfig.from_file(ckpt / "config.json")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    block = cfg.quant.block if cfg.quant else (128, 128)
    names = [
        n
        for n in index["weight_map"]
        if not n.startswith("model.mtp.") and not n.endswith("_scale_inv")
    ]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = read_tensor(ckpt, name, index)
        if t.dtype == torch.float8_e4m3fn:
            s = read_tensor(ckpt, name + "_scale_inv", index)
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
            is_kv = name.endswith(("k_proj.weight", "v_proj.weight"))
            if is_kv and layer >= 0 and cfg.layer(layer).attention == FULL:
                continue  # below, k and v together
            expert = ".mlp.experts." in name and expert_rounding != SAME
            r = expert_rounding if expert else rounding
            out[name] = _round(t.float() * expand(s, *t.shape, block), r)
        elif "mlp.gate." in name:
            out[name] = t.float()
        else:
            out[name] = t.to(torch.bfloat16).float()
    for layer in range(cfg.num_hidden_layers):
        spec = cfg.layer(layer)
        p = f"model.layers.{layer}.self_attn"
        if spec.attention != FULL or f"{p}.k_proj.weight" in out:
            continue
        k, v = (
            read_tensor(ckpt, f"{p}.k_proj.weight", index),
            read_tensor(ckpt, f"{p}.v_proj.weight", index),
        )
        ks = read_tensor(ckpt, f"{p}.k_proj.weight_scale_inv", index)
        vs = read_tensor(ckpt, f"{p}.v_proj.weight_scale_inv", index)
        d, dv = spec.head_dim, spec.v_head_dim
        assert (d, dv, block[0]) == (192, 128, 128), "oracle's fused rule is written for 192/128"
        k_out, v_out = [], []
        for h in range(spec.kv_heads):
            rows = torch.cat([k[h * d : (h + 1) * d], v[h * dv : (h + 1) * dv]]).float()
            grid = torch.stack([ks[2 * h], ks[2 * h + 1], vs[h]])
            fused = rows * expand(grid, d + dv, k.shape[1], block)
            k_out.append(fused[:d])
            v_out.append(fused[d:])
        out[f"{p}.k_proj.weight"] = _round(torch.cat(k_out), rounding)
        out[f"{p}.v_proj.weight"] = _round(torch.cat(v_out), rounding)
    return out


def _round(t: torch.Tensor, rounding: torch.dtype | None) -> torch.Tensor:
    return t if rounding is None else t.to(rounding).float()


def load_transformers_model(
    ckpt: Path,
    experts: list[int] | None = None,
    rounding: torch.dtype | None = torch.bfloat16,
    expert_rounding: torch.dtype | None | str = SAME,
):
    """transformers' MiMoV2FlashForCausalLM (eager attention, float32) with the checkpoint weights.

    ``experts`` restricts every MoE layer to those global experts (router rows sliced), which is
    what routing restricted to a converted expert subset computes. ``rounding`` as in
    :func:`dequantised_state` (None: the float32 products a ``--dtype float32`` output holds).
    """
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    cfg = MiMoConfig.from_file(ckpt / "config.json")
    state = dequantised_state(ckpt, rounding, expert_rounding)
    kept = list(range(cfg.n_routed_experts)) if experts is None else list(experts)
    kw = cfg.to_transformers()
    kw.update(
        n_routed_experts=len(kept), num_experts_per_tok=min(cfg.num_experts_per_tok, len(kept))
    )
    kw["eos_token_id"] = cfg.eos_token_id
    tf_cfg = MiMoV2FlashConfig(**kw)
    tf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(tf_cfg).float().eval()
    sd = {}
    for name, t in state.items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("attention_sink_bias"):
            name = name.replace("attention_sink_bias", "sinks")
        if name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            t = t[kept]
        sd[name] = t
    for layer in range(cfg.num_hidden_layers):
        if cfg.layer(layer).mlp != MOE:
            continue
        p = f"model.layers.{layer}.mlp.experts"
        sd[f"{p}.gate_up_proj"] = torch.stack(
            [
                torch.cat([state[f"{p}.{e}.gate_proj.weight"], state[f"{p}.{e}.up_proj.weight"]])
                for e in kept
            ]
        )
        sd[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in kept])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def logits(model, ids: list[int]) -> np.ndarray:
    """float32 logits ``[T, V]`` of one prompt."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
