"""Tensor inventory and synthetic checkpoints: real counts, layout, FP8 rules, determinism."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from mimo.config import FULL, MiMoConfig
from mimo.names import parse
from pipeline.inventory import hub_inventory
from pipeline.synth import draw, preset_config, write_checkpoint
from tests.conftest import REAL_CONFIG
from tests.oracle import read_tensor

FP8 = ml_dtypes.float8_e4m3fn


def test_real_inventory_counts_and_bytes():
    """docs/checkpoint.md §5: 72,766 main-model tensors, 311.86 GB without MTP; 145 files
    with model_mtp."""
    cfg = MiMoConfig.from_file(REAL_CONFIG)
    inv = hub_inventory(cfg, mtp_layers=3)
    main = [s for s in inv if not parse(s.name).is_mtp]
    assert len(main) == 72_766
    assert sum(s.nbytes for s in main) == 311_862_258_560
    assert len(inv) == 72_826 and sum(s.nbytes for s in inv) == 313_051_659_008
    assert len({s.file for s in inv}) == 145
    per_file = Counter(s.file for s in inv)
    assert per_file["model_0.safetensors"] == 15
    assert per_file["model_1.safetensors"] == 12 and per_file["model_5.safetensors"] == 11
    assert per_file["model_1_linear_fc1.safetensors"] == 1024
    assert per_file["model_1_linear_fc2.safetensors"] == 512
    by_name = {s.name: s for s in inv}
    assert by_name["model.layers.5.self_attn.k_proj.weight_scale_inv"].shape == (8, 32)
    assert by_name["model.layers.5.self_attn.v_proj.weight_scale_inv"].shape == (4, 32)
    assert by_name["model.layers.6.self_attn.k_proj.weight_scale_inv"].shape == (12, 32)
    assert by_name["model.layers.0.self_attn.o_proj.weight"].dtype == "BF16"
    assert by_name["model.layers.3.mlp.gate.weight"].dtype == "F32"
    assert "model.layers.5.self_attn.attention_sink_bias" not in by_name
    assert by_name["model.mtp.layers.0.self_attn.o_proj.weight"].dtype == "BF16"


def _np(t):
    """A torch tensor as NumPy, F8 and BF16 included (as ml_dtypes arrays)."""
    import torch

    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(FP8)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _tensor(ckpt, name):
    return _np(read_tensor(ckpt, name))


def test_index_matches_files_and_inventory(tiny_mtp_ckpt):
    cfg = MiMoConfig.from_file(tiny_mtp_ckpt / "config.json")
    inv = {s.name: s for s in hub_inventory(cfg, mtp_layers=3)}
    idx = json.loads((tiny_mtp_ckpt / "model.safetensors.index.json").read_text())
    handles = {f: safe_open(tiny_mtp_ckpt / f, "np") for f in set(idx["weight_map"].values())}
    assert set(idx["weight_map"]) == set(inv)
    total = 0
    for file, h in handles.items():
        for name in h.keys():
            sl = h.get_slice(name)
            spec = inv[name]
            assert idx["weight_map"][name] == file == spec.file
            assert sl.get_dtype() == spec.dtype and tuple(sl.get_shape()) == spec.shape
            total += spec.nbytes
    assert sum(len(h.keys()) for h in handles.values()) == len(inv)
    assert idx["metadata"]["total_size"] == total


def _expand(scales, rows, cols, row_block=128, col_block=128):
    return np.repeat(np.repeat(scales, row_block, 0), col_block, 1)[:rows, :cols]


def test_dequantised_weights_match_drawn_values(tiny_ckpt):
    """Standard tensors: fp8 * scale_inv (a multiplier) gives the drawn values within FP8 error."""
    names = [
        "model.layers.0.self_attn.q_proj.weight",  # 1536 x 320: ragged column block
        "model.layers.0.mlp.down_proj.weight",  # 320 x 384: ragged row block
        "model.layers.1.mlp.experts.3.up_proj.weight",  # 96 x 320: one short row block
        "model.layers.1.self_attn.k_proj.weight",  # SWA k: standard grid
    ]
    for name in names:
        codes = _tensor(tiny_ckpt, name)
        scales = _tensor(tiny_ckpt, name + "_scale_inv")
        r, c = codes.shape
        assert scales.shape == (-(-r // 128), -(-c // 128))
        deq = codes.astype(np.float32) * _expand(scales, r, c)
        want = draw(name, (r, c), seed=0)
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals -> absolute scale * 2^-10
        tol = np.abs(want) * 2.0**-4 + _expand(scales, r, c) * 2.0**-10
        assert np.all(np.abs(deq - want) <= tol), name
        # scale = amax/448: the largest code of every block is (close to) the FP8 maximum
        assert np.abs(codes.astype(np.float32)).max() == 448.0


def test_fused_kv_rule_on_full_attention_layers(tiny_ckpt):
    """Full layers quantise each KV head's [K_h; V_h] as one unit: k grid has 2 rows per head."""
    cfg = MiMoConfig.from_file(tiny_ckpt / "config.json")
    for layer in (0, 5):
        spec = cfg.layer(layer)
        assert spec.attention == FULL
        p = f"model.layers.{layer}.self_attn"
        k, v = _tensor(tiny_ckpt, f"{p}.k_proj.weight"), _tensor(tiny_ckpt, f"{p}.v_proj.weight")
        ks = _tensor(tiny_ckpt, f"{p}.k_proj.weight_scale_inv")
        vs = _tensor(tiny_ckpt, f"{p}.v_proj.weight_scale_inv")
        kv, d, dv = spec.kv_heads, spec.head_dim, spec.v_head_dim
        assert ks.shape == (kv * 2, 3) and vs.shape == (kv * 1, 3)
        # independent reading: per head, rows [K_h; V_h] in 128-row blocks with scale rows
        # [KS[2h], KS[2h+1], VS[h]]
        k_deq = np.empty(k.shape, np.float32)
        v_deq = np.empty(v.shape, np.float32)
        for head in range(kv):
            rows = np.concatenate([k[head * d : (head + 1) * d], v[head * dv : (head + 1) * dv]])
            grid = np.stack([ks[2 * head], ks[2 * head + 1], vs[head]])
            fused = rows.astype(np.float32) * _expand(grid, d + dv, k.shape[1])
            k_deq[head * d : (head + 1) * d] = fused[:d]
            v_deq[head * dv : (head + 1) * dv] = fused[d:]
        for name, deq in ((f"{p}.k_proj.weight", k_deq), (f"{p}.v_proj.weight", v_deq)):
            want = draw(name, deq.shape, seed=0)
            assert np.all(
                np.abs(deq - want) <= np.abs(want) * 2.0**-4 + 2.0**-6 * np.abs(want).max()
            )
        # the standard reading of v is wrong for V rows 0..63 of each head (a different scale)
        v_std = v.astype(np.float32) * _expand(vs, *v.shape)
        assert not np.allclose(v_std, v_deq, rtol=0.05)
        # under the fused grouping every block reaches the FP8 maximum (scale = amax/448)
        codes = np.abs(np.concatenate([k[d - 64 : d], v[:64]]).astype(np.float32))
        assert codes.max() == 448.0


def test_sinks_dtypes_and_router(tiny_ckpt):
    idx = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert "model.layers.1.self_attn.attention_sink_bias" in idx["weight_map"]
    assert "model.layers.5.self_attn.attention_sink_bias" not in idx["weight_map"]
    h = safe_open(tiny_ckpt / "model_1.safetensors", "np")
    assert h.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
    bias = h.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == np.float32 and np.abs(bias).min() > 0
    assert h.get_slice("model.layers.1.self_attn.o_proj.weight").get_dtype() == "BF16"


def test_deterministic_for_a_seed(tmp_path, tiny_ckpt):
    again = write_checkpoint(tmp_path / "a", preset_config("tiny"), seed=0, progress=False)
    other = write_checkpoint(tmp_path / "b", preset_config("tiny"), seed=1, progress=False)

    def digest(d):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}

    assert digest(again) == digest(tiny_ckpt)
    assert digest(other)["model_1.safetensors"] != digest(tiny_ckpt)["model_1.safetensors"]
    assert digest(other)["tokenizer.json"] == digest(tiny_ckpt)["tokenizer.json"]


def test_tokenizer_round_trips_text(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    text = "The river ran low that summer. Ünïcödé and 12345!"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert max(ids) < cfg["vocab_size"] and tok.get_vocab_size() <= cfg["vocab_size"]
    assert tok.id_to_token(cfg["eos_token_id"]) == "<|im_end|>"


def test_model_built_from_synthetic_weights_is_sane(tiny_ckpt):
    """The drawn weights give finite logits of moderate size in transformers' own model."""
    import torch

    from tests.oracle import load_transformers_model

    model = load_transformers_model(tiny_ckpt)
    ids = torch.arange(1, 41).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 10
    assert logits.abs().max().item() < 50


@pytest.mark.parametrize(("preset", "layers", "experts"), [("small", 2, 4), ("full-width", 6, 2)])
def test_presets_have_the_promised_shapes(preset, layers, experts):
    cfg = MiMoConfig.from_dict(preset_config(preset, layers, experts))
    assert cfg.num_hidden_layers == layers and cfg.n_routed_experts == experts
    if preset == "full-width":
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.v_head_dim) == (
            4096,
            64,
            192,
            128,
        )
        assert (cfg.moe_intermediate_size, cfg.vocab_size) == (2048, 152576)
        assert cfg.layer(5).attention == FULL
