"""Model config: the hub form, the transformers form, the real config, and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import MiMoV2FlashConfig

from mimo.config import DENSE, FULL, MOE, SLIDING, ConfigError, MiMoConfig
from tests.conftest import REAL_CONFIG


@pytest.fixture()
def hub() -> dict:
    return json.loads(REAL_CONFIG.read_text())


def test_real_config_derivations(hub):
    cfg = MiMoConfig.from_dict(hub)
    full = [s.index for s in cfg.layers if s.attention == FULL]
    assert full == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.num_hidden_layers == 48 and len(cfg.layers) == 48
    for s in cfg.layers:
        if s.attention == FULL:
            assert (s.kv_heads, s.rope_theta, s.sinks, s.window) == (4, 5_000_000.0, False, None)
        else:
            assert (s.kv_heads, s.rope_theta, s.sinks, s.window) == (8, 10_000.0, True, 129)
        assert (s.q_heads, s.head_dim, s.v_head_dim, s.rotary_dim) == (64, 192, 128, 64)
    assert [s.mlp for s in cfg.layers] == [DENSE] + [MOE] * 47
    assert cfg.rms_norm_eps == 1e-5 and cfg.attention_value_scale == 0.707
    assert cfg.routed_scaling_factor == 1.0  # hub null
    assert cfg.quant.block == (128, 128) and cfg.quant.fmt == "e4m3"
    assert "model.layers.47.self_attn.o_proj" in cfg.quant.ignored_layers


def test_transformers_form_equals_hub_form(hub):
    """transformers' own config class, fed the hub keys, yields the same model."""
    from_hub = MiMoConfig.from_dict(hub)
    tf = MiMoV2FlashConfig(**from_hub.to_transformers()).to_dict()
    from_tf = MiMoConfig.from_dict(tf)
    # the transformers form has no quantisation block, token ids or hub-only flags
    strip = {"quant": None, "eos_token_id": None, "bos_token_id": None}
    assert from_tf.to_dict() | strip == from_hub.to_dict() | {
        **strip,
        "max_position_embeddings": from_tf.max_position_embeddings,
    }


def test_transformers_sliding_window_counts_the_query():
    tf = MiMoV2FlashConfig(num_hidden_layers=6, sliding_window_size=128).to_dict()
    assert tf["sliding_window"] == 129
    tf.update(vocab_size=1000, n_routed_experts=8, num_experts_per_tok=2)
    assert MiMoConfig.from_dict(tf).sliding_window == 129
    layer = MiMoConfig.from_dict(tf).layer(1)
    assert (layer.attention, layer.kv_heads) == (SLIDING, 8)  # transformers' 2 * kv rule


def test_normalised_round_trip(hub):
    cfg = MiMoConfig.from_dict(hub)
    again = MiMoConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["hybrid_layer_pattern"].pop(), "hybrid_layer_pattern"),
        (lambda d: d["moe_layer_freq"].__setitem__(3, 2), "moe_layer_freq"),
        (lambda d: d.update(layer_types=["full_attention"] * 48), "layer_types"),
        (lambda d: d.update(layernorm_epsilon="tiny"), "layernorm_epsilon"),
        (lambda d: d.update(rms_norm_eps=1e-6), "rms_norm_eps"),
        (lambda d: d.update(sliding_window=64), "sliding_window"),
        (lambda d: d.pop("hidden_size"), "hidden_size"),
        (lambda d: d.pop("swa_num_key_value_heads"), "swa_num_key_value_heads"),
        (lambda d: d.update(num_key_value_heads=5), "num_key_value_heads"),
        (lambda d: d.update(partial_rotary_factor=0.3), "partial_rotary_factor"),
        (lambda d: d.update(n_group=8), "n_group"),
        (lambda d: d.update(scoring_func="softmax"), "scoring_func"),
        (lambda d: d["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
        (lambda d: d["quantization_config"].update(fmt="e5m2"), "fmt"),
        (lambda d: d.update(num_experts_per_tok=300), "num_experts_per_tok"),
    ],
)
def test_inconsistent_config_names_the_key(hub, edit, key):
    bad = copy.deepcopy(hub)
    edit(bad)
    with pytest.raises(ConfigError, match=key):
        MiMoConfig.from_dict(bad)


def test_from_file_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        MiMoConfig.from_file(p)
    with pytest.raises(ConfigError, match="no such config"):
        MiMoConfig.from_file(tmp_path / "missing.json")
