"""MiMo-V2-Flash model configuration: one class for the hub and the transformers forms.

The hub ``config.json`` of ``XiaomiMiMo/MiMo-V2-Flash`` uses its own keys (``hybrid_layer_pattern``,
``moe_layer_freq``, ``swa_*``, ``layernorm_epsilon``, ``sliding_window_size``); transformers >= 5.24
uses ``layer_types``, ``mlp_layer_types``, ``rope_parameters``, ``rms_norm_eps`` and a
``sliding_window`` that already counts the query. :meth:`MiMoConfig.from_dict` reads either (or a
mixture, provided the two agree) and derives the per-layer facts every other module needs.

This module lives in ``loader`` because both ``pipeline`` (which writes outputs) and ``runtime``
(which runs them) need it, and both may import ``loader`` but not each other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FULL = "full"
SLIDING = "sliding"
DENSE = "dense"
MOE = "moe"

_TF_ATTENTION = {"full_attention": FULL, "sliding_attention": SLIDING}
_TF_MLP = {"dense": DENSE, "sparse": MOE}


class ConfigError(ValueError):
    """A config that cannot describe a MiMo-V2-Flash model; the message names the key."""


@dataclass(frozen=True)
class QuantSpec:
    """Block FP8 quantisation of the checkpoint (``quantization_config``)."""

    fmt: str  # "e4m3" (float8_e4m3fn)
    block: tuple[int, int]  # (rows, cols) of one scale block, (128, 128) for MiMo-V2-Flash
    ignored_layers: tuple[str, ...]  # module names stored unquantised (every o_proj)


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is, derived from the config."""

    index: int
    attention: str  # FULL | SLIDING
    q_heads: int
    kv_heads: int
    head_dim: int  # query/key head dim (192)
    v_head_dim: int  # value head dim (128)
    rope_theta: float
    rotary_dim: int  # leading dims of each q/k head that are rotated (64)
    sinks: bool  # per-head attention-sink logit present
    window: int | None  # keys a query sees on a sliding layer, itself included (129); None = all
    mlp: str  # DENSE | MOE


@dataclass(frozen=True)
class MiMoConfig:
    """Normalised MiMo-V2-Flash configuration (field names are this project's, not the hub's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    swa_num_attention_heads: int
    swa_num_kv_heads: int
    head_dim: int
    v_head_dim: int
    swa_head_dim: int
    swa_v_head_dim: int
    layer_types: tuple[str, ...]
    mlp_types: tuple[str, ...]
    sliding_window: int  # key count, query included (hub sliding_window_size + 1)
    rope_theta: float
    swa_rope_theta: float
    partial_rotary_factor: float
    rms_norm_eps: float
    attention_value_scale: float
    full_sinks: bool
    swa_sinks: bool
    n_routed_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    quant: QuantSpec | None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ------------------------------------------------------------------ derived facts
    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Per-layer specs, index order."""
        return tuple(self.layer(i) for i in range(self.num_layers))

    def layer(self, index: int) -> LayerSpec:
        """The spec of layer ``index``."""
        full = self.layer_types[index] == FULL
        head_dim = self.head_dim if full else self.swa_head_dim
        return LayerSpec(
            index=index,
            attention=self.layer_types[index],
            q_heads=self.num_attention_heads if full else self.swa_num_attention_heads,
            kv_heads=self.num_kv_heads if full else self.swa_num_kv_heads,
            head_dim=head_dim,
            v_head_dim=self.v_head_dim if full else self.swa_v_head_dim,
            rope_theta=self.rope_theta if full else self.swa_rope_theta,
            rotary_dim=int(head_dim * self.partial_rotary_factor),
            sinks=self.full_sinks if full else self.swa_sinks,
            window=None if full else self.sliding_window,
            mlp=self.mlp_types[index],
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_types) if t == MOE)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_file(cls, path: str | Path) -> MiMoConfig:
        """Parse a ``config.json`` (hub or transformers form)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiMoConfig:
        """Parse the hub form, the transformers form, or this class's own :meth:`to_dict` form."""
        if d.get("format") == NORMALISED_FORMAT:
            return cls._from_normalised(d)
        return _parse(d)

    def to_dict(self) -> dict[str, Any]:
        """The normalised form (JSON-ready); :meth:`from_dict` reads it back."""
        out = {"format": NORMALISED_FORMAT}
        out.update(asdict(self))
        out["layer_types"] = list(self.layer_types)
        out["mlp_types"] = list(self.mlp_types)
        if self.quant is not None:
            out["quant"] = {
                "fmt": self.quant.fmt,
                "block": list(self.quant.block),
                "ignored_layers": list(self.quant.ignored_layers),
            }
        return out

    @classmethod
    def _from_normalised(cls, d: dict[str, Any]) -> MiMoConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"format"}
        if unknown:
            raise ConfigError(f"unknown normalised config keys: {sorted(unknown)}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["layer_types"] = tuple(kw["layer_types"])
        kw["mlp_types"] = tuple(kw["mlp_types"])
        q = kw.get("quant")
        if q is not None:
            kw["quant"] = QuantSpec(q["fmt"], tuple(q["block"]), tuple(q["ignored_layers"]))
        cfg = cls(**kw)
        _validate(cfg)
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``MiMoV2FlashConfig`` describing this model.

        transformers derives the sliding layers' KV heads as ``2 * num_key_value_heads`` and uses
        one head dim for both attention kinds; a config it cannot express raises ConfigError.
        """
        if self.swa_num_kv_heads != 2 * self.num_kv_heads:
            raise ConfigError(
                "transformers requires swa_num_key_value_heads = 2 * num_key_value_heads"
            )
        if (self.swa_head_dim, self.swa_v_head_dim, self.swa_num_attention_heads) != (
            self.head_dim,
            self.v_head_dim,
            self.num_attention_heads,
        ):
            raise ConfigError(
                "transformers requires equal head counts and dims on both layer kinds"
            )
        if self.full_sinks or not self.swa_sinks:
            raise ConfigError("transformers puts sinks on sliding layers only")
        rope = {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": self.swa_rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        }
        inv_att = {v: k for k, v in _TF_ATTENTION.items()}
        inv_mlp = {v: k for k, v in _TF_MLP.items()}
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "layer_types": [inv_att[t] for t in self.layer_types],
            "mlp_layer_types": [inv_mlp[t] for t in self.mlp_types],
            "sliding_window": self.sliding_window,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_value_scale": self.attention_value_scale,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "n_group": 1,
            "topk_group": 1,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
        }


NORMALISED_FORMAT = "mimo-shard/config-v1"


# ---------------------------------------------------------------------------------- parsing
def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"missing required key '{key}'")
    return _typed(d, key, kind)


def _typed(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    v = d[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind in (float, (int, float)) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if not ok:
        raise ConfigError(f"key '{key}' must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _opt(d: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...] = int) -> Any:
    if d.get(key) is None:
        return default
    return _typed(d, key, kind)


def _pattern(d: dict[str, Any], key: str, n: int, allowed: dict[Any, str]) -> tuple[str, ...]:
    v = d[key]
    if not isinstance(v, list):
        raise ConfigError(f"key '{key}' must be a list with one entry per layer")
    if len(v) != n:
        raise ConfigError(f"key '{key}' has {len(v)} entries but num_hidden_layers is {n}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or x not in allowed:
            raise ConfigError(
                f"key '{key}'[{i}] = {x!r}; expected one of {sorted(map(str, allowed))}"
            )
        out.append(allowed[x])
    return tuple(out)


def _agree(key_a: str, a: Any, key_b: str, b: Any) -> None:
    if a != b:
        raise ConfigError(f"keys '{key_a}' and '{key_b}' disagree ({a!r} vs {b!r})")


def _parse(d: dict[str, Any]) -> MiMoConfig:
    n = _need(d, "num_hidden_layers")
    if n < 1:
        raise ConfigError("key 'num_hidden_layers' must be >= 1")
    # transformers' form (its to_dict() may also carry hub keys it was given) counts the query in
    # `sliding_window`; the hub form counts previous tokens in both window keys
    tf_form = any(d.get(k) is not None for k in ("layer_types", "rope_parameters", "rms_norm_eps"))

    # attention kind per layer
    layer_types = None
    if "hybrid_layer_pattern" in d:
        layer_types = _pattern(d, "hybrid_layer_pattern", n, {0: FULL, 1: SLIDING})
    if "layer_types" in d and d["layer_types"] is not None:
        tf = _pattern(d, "layer_types", n, _TF_ATTENTION)
        if layer_types is not None:
            _agree("hybrid_layer_pattern", layer_types, "layer_types", tf)
        layer_types = tf
    if layer_types is None:  # transformers' default rule
        layer_types = tuple(FULL if i == 0 or (i + 1) % 6 == 0 else SLIDING for i in range(n))

    # MLP kind per layer
    mlp_types = None
    if "moe_layer_freq" in d:
        mlp_types = _pattern(d, "moe_layer_freq", n, {0: DENSE, 1: MOE})
    if "mlp_layer_types" in d and d["mlp_layer_types"] is not None:
        tf = _pattern(d, "mlp_layer_types", n, _TF_MLP)
        if mlp_types is not None:
            _agree("moe_layer_freq", mlp_types, "mlp_layer_types", tf)
        mlp_types = tf
    if mlp_types is None:
        mlp_types = (DENSE,) + (MOE,) * (n - 1)

    # norms
    eps = None
    if "layernorm_epsilon" in d:
        eps = _typed(d, "layernorm_epsilon", (int, float))
    if d.get("rms_norm_eps") is not None:
        tf_eps = _typed(d, "rms_norm_eps", (int, float))
        if eps is not None:
            _agree("layernorm_epsilon", eps, "rms_norm_eps", tf_eps)
        eps = tf_eps
    eps = 1e-5 if eps is None else eps

    # sliding window as a key count (query included)
    if d.get("sliding_window_size") is not None:
        window = _typed(d, "sliding_window_size", int) + 1
        if d.get("sliding_window") is not None:
            sw = _typed(d, "sliding_window", int)
            _agree("sliding_window_size", window, "sliding_window", sw if tf_form else sw + 1)
    elif d.get("sliding_window") is not None:
        sw = _typed(d, "sliding_window", int)
        window = sw if tf_form else sw + 1
    else:
        window = 129
    if window < 2:
        raise ConfigError("key 'sliding_window_size' must be >= 1")

    # rope
    head_dim = _opt(d, "head_dim", 192)
    prf = _opt(d, "partial_rotary_factor", None, (int, float))
    theta = _opt(d, "rope_theta", None, (int, float))
    swa_theta = _opt(d, "swa_rope_theta", None, (int, float))
    rp = d.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            raise ConfigError("key 'rope_parameters' must be an object")
        for tf_kind, (var, hub_key) in {
            "full_attention": ("theta", "rope_theta"),
            "sliding_attention": ("swa_theta", "swa_rope_theta"),
        }.items():
            p = rp.get(tf_kind)
            if p is None:
                continue
            if p.get("rope_type", "default") != "default":
                raise ConfigError(
                    f"rope_parameters.{tf_kind}.rope_type {p['rope_type']!r} unsupported"
                )
            t = float(p["rope_theta"])
            cur = theta if var == "theta" else swa_theta
            if cur is not None and hub_key in d:
                _agree(hub_key, cur, f"rope_parameters.{tf_kind}.rope_theta", t)
            if var == "theta":
                theta = t
            else:
                swa_theta = t
            if "partial_rotary_factor" in p:
                f = float(p["partial_rotary_factor"])
                if prf is not None and prf != f:
                    _agree("partial_rotary_factor", prf, f"rope_parameters.{tf_kind}", f)
                prf = f
    theta = 5_000_000.0 if theta is None else theta
    swa_theta = 10_000.0 if swa_theta is None else swa_theta
    prf = 0.334 if prf is None else prf
    if d.get("rope_scaling") not in (None, {}):
        raise ConfigError(
            f"key 'rope_scaling' = {d['rope_scaling']!r}: rope scaling is unsupported"
        )

    # routing
    if _opt(d, "n_group", 1) != 1 or _opt(d, "topk_group", 1) != 1:
        raise ConfigError(
            "keys 'n_group'/'topk_group' must be 1 (group-limited routing unsupported)"
        )
    scoring = d.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"key 'scoring_func' = {scoring!r}; only 'sigmoid' is supported")
    if d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"key 'topk_method' = {d['topk_method']!r}; only 'noaux_tc' is supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"key 'hidden_act' = {d['hidden_act']!r}; only 'silu' is supported")
    if d.get("n_shared_experts") not in (None, 0):
        raise ConfigError(
            "key 'n_shared_experts' must be null: MiMo-V2-Flash has no shared experts"
        )
    if d.get("attention_bias"):
        raise ConfigError("key 'attention_bias' must be false")

    kv = _need(d, "num_key_value_heads")
    heads = _need(d, "num_attention_heads")
    swa_kv = _opt(d, "swa_num_key_value_heads", None)
    if swa_kv is None:
        if not tf_form:
            raise ConfigError("missing required key 'swa_num_key_value_heads'")
        swa_kv = 2 * kv  # transformers' rule
    v_head_dim = _opt(d, "v_head_dim", 128)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None

    cfg = MiMoConfig(
        vocab_size=_need(d, "vocab_size"),
        hidden_size=_need(d, "hidden_size"),
        intermediate_size=_need(d, "intermediate_size"),
        moe_intermediate_size=_need(d, "moe_intermediate_size"),
        num_layers=n,
        num_attention_heads=heads,
        num_kv_heads=kv,
        swa_num_attention_heads=_opt(d, "swa_num_attention_heads", heads),
        swa_num_kv_heads=swa_kv,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        swa_head_dim=_opt(d, "swa_head_dim", head_dim),
        swa_v_head_dim=_opt(d, "swa_v_head_dim", v_head_dim),
        layer_types=layer_types,
        mlp_types=mlp_types,
        sliding_window=window,
        rope_theta=theta,
        swa_rope_theta=swa_theta,
        partial_rotary_factor=prf,
        rms_norm_eps=eps,
        attention_value_scale=_opt(d, "attention_value_scale", 0.707, (int, float)),
        full_sinks=bool(_opt(d, "add_full_attention_sink_bias", False, bool)),
        swa_sinks=bool(_opt(d, "add_swa_attention_sink_bias", True, bool)),
        n_routed_experts=_need(d, "n_routed_experts"),
        num_experts_per_tok=_need(d, "num_experts_per_tok"),
        norm_topk_prob=bool(_opt(d, "norm_topk_prob", True, bool)),
        routed_scaling_factor=_opt(d, "routed_scaling_factor", 1.0, (int, float)),
        max_position_embeddings=_opt(d, "max_position_embeddings", 262144),
        tie_word_embeddings=bool(_opt(d, "tie_word_embeddings", False, bool)),
        quant=_parse_quant(d.get("quantization_config")),
        bos_token_id=_opt(d, "bos_token_id", None),
        eos_token_id=eos if isinstance(eos, int) else None,
    )
    _validate(cfg)
    return cfg


def _parse_quant(q: Any) -> QuantSpec | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("key 'quantization_config' must be an object")
    if q.get("quant_method") != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method = {q.get('quant_method')!r}; need 'fp8'"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt = {fmt!r}; only 'e4m3' is supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError("quantization_config.activation_scheme must be 'dynamic'")
    block = q.get("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(f"quantization_config.weight_block_size = {block!r}; need [rows, cols]")
    ignored = q.get("ignored_layers") or []
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        raise ConfigError("quantization_config.ignored_layers must be a list of module names")
    return QuantSpec(fmt=fmt, block=(block[0], block[1]), ignored_layers=tuple(ignored))


def _validate(c: MiMoConfig) -> None:
    positive = (
        "vocab_size hidden_size intermediate_size moe_intermediate_size num_attention_heads "
        "num_kv_heads swa_num_attention_heads swa_num_kv_heads head_dim v_head_dim swa_head_dim "
        "swa_v_head_dim n_routed_experts num_experts_per_tok"
    ).split()
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"key '{_HUB_NAME.get(name, name)}' must be >= 1")
    for heads, kv, kh, kk in (
        (c.num_attention_heads, c.num_kv_heads, "num_attention_heads", "num_key_value_heads"),
        (
            c.swa_num_attention_heads,
            c.swa_num_kv_heads,
            "swa_num_attention_heads",
            "swa_num_key_value_heads",
        ),
    ):
        if heads % kv:
            raise ConfigError(f"key '{kh}' ({heads}) must be a multiple of '{kk}' ({kv})")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise ConfigError("key 'num_experts_per_tok' exceeds 'n_routed_experts'")
    for hd, key in ((c.head_dim, "head_dim"), (c.swa_head_dim, "swa_head_dim")):
        rot = int(hd * c.partial_rotary_factor)
        if rot % 2 or rot < 0 or rot > hd:
            raise ConfigError(
                f"key 'partial_rotary_factor' ({c.partial_rotary_factor}) gives an odd or invalid "
                f"rotary dim {rot} for '{key}' {hd}"
            )
    if not 0 < c.rms_norm_eps < 1:
        raise ConfigError("key 'layernorm_epsilon' must be in (0, 1)")


_HUB_NAME = {
    "num_kv_heads": "num_key_value_heads",
    "swa_num_kv_heads": "swa_num_key_value_heads",
    "num_layers": "num_hidden_layers",
}
