"""MiMo-V2-Flash configuration: one dataclass, read from the hub or the transformers form.

Field names are the hub ``config.json`` keys where a hub key means the same thing; where only
transformers has the concept in that shape, its name is used (``layer_types``, ``mlp_types`` for
its ``mlp_layer_types``, ``rms_norm_eps``, and ``sliding_window``, which counts the query).

Parsing is the table :data:`KEYS`: one row per field with its hub key, its transformers key, its
type and its default. A config may use either form, or a mixture, provided the two agree.
See ``docs/checkpoint.md`` §1 for what each key means.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mimo.jsonfile import ConfigError, load_json_object

FULL = "full"
SLIDING = "sliding"
DENSE = "dense"
MOE = "moe"

MAX_CONFIG_BYTES = 1 << 20  # a real config.json is ~3 KB


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
    """A validated MiMo-V2-Flash configuration (hub key names; see the module docstring)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    swa_num_attention_heads: int
    swa_num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    swa_head_dim: int
    swa_v_head_dim: int
    layer_types: tuple[str, ...]  # FULL | SLIDING per layer (hub: hybrid_layer_pattern 0/1)
    mlp_types: tuple[str, ...]  # DENSE | MOE per layer (hub: moe_layer_freq 0/1)
    sliding_window: int  # key count, query included (hub sliding_window_size + 1)
    rope_theta: float
    swa_rope_theta: float
    partial_rotary_factor: float
    rms_norm_eps: float  # hub: layernorm_epsilon
    attention_value_scale: float
    add_full_attention_sink_bias: bool
    add_swa_attention_sink_bias: bool
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
        return tuple(self.layer(i) for i in range(self.num_hidden_layers))

    def layer(self, index: int) -> LayerSpec:
        """The spec of layer ``index``."""
        full = self.layer_types[index] == FULL
        head_dim = self.head_dim if full else self.swa_head_dim
        return LayerSpec(
            index=index,
            attention=self.layer_types[index],
            q_heads=self.num_attention_heads if full else self.swa_num_attention_heads,
            kv_heads=self.num_key_value_heads if full else self.swa_num_key_value_heads,
            head_dim=head_dim,
            v_head_dim=self.v_head_dim if full else self.swa_v_head_dim,
            rope_theta=self.rope_theta if full else self.swa_rope_theta,
            rotary_dim=int(head_dim * self.partial_rotary_factor),
            sinks=self.add_full_attention_sink_bias if full else self.add_swa_attention_sink_bias,
            window=None if full else self.sliding_window,
            mlp=self.mlp_types[index],
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_types) if t == MOE)

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_file(cls, path: str | Path) -> MiMoConfig:
        """Parse a ``config.json`` (hub or transformers form)."""
        path = Path(path)
        try:
            if not stat.S_ISREG(path.stat().st_mode):
                raise ConfigError(f"{path}: not a regular file")
            with path.open("rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            return cls.from_dict(load_json_object(data, MAX_CONFIG_BYTES))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiMoConfig:
        """Parse the hub form, the transformers form, or this class's own :meth:`to_dict` form."""
        if d.get("format") in NORMALISED_FORMATS:
            return _from_normalised(d)
        return _parse(d)

    def to_dict(self) -> dict[str, Any]:
        """The normalised form (JSON-ready, recorded in manifests); :meth:`from_dict` reads it."""
        out: dict[str, Any] = {"format": NORMALISED_FORMAT}
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

    def to_transformers(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``MiMoV2FlashConfig`` describing this model.

        transformers derives the sliding layers' KV heads as ``2 * num_key_value_heads`` and uses
        one head dim for both attention kinds; a config it cannot express raises ConfigError.
        """
        if self.swa_num_key_value_heads != 2 * self.num_key_value_heads:
            raise ConfigError(
                "transformers requires swa_num_key_value_heads = 2 * num_key_value_heads"
            )
        swa = (self.swa_head_dim, self.swa_v_head_dim, self.swa_num_attention_heads)
        if swa != (self.head_dim, self.v_head_dim, self.num_attention_heads):
            raise ConfigError(
                "transformers requires equal head counts and dims on both layer kinds"
            )
        if self.add_full_attention_sink_bias or not self.add_swa_attention_sink_bias:
            raise ConfigError("transformers puts sinks on sliding layers only")
        out = {k.tf: getattr(self, k.field) for k in KEYS if k.tf and "." not in k.tf}
        out["layer_types"] = [_TF_ATTENTION_NAME[t] for t in self.layer_types]
        out["mlp_layer_types"] = [_TF_MLP_NAME[t] for t in self.mlp_types]
        out["rope_parameters"] = {
            kind: {
                "rope_type": "default",
                "rope_theta": theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            }
            for kind, theta in (
                ("full_attention", self.rope_theta),
                ("sliding_attention", self.swa_rope_theta),
            )
        }
        out.update(n_group=1, topk_group=1, hidden_act="silu", attention_bias=False)
        return out


NORMALISED_FORMAT = "mimo-shard/config-v2"
# v1 (manifests written before the fields took the hub's names): old name -> field
_V1_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_kv_heads": "num_key_value_heads",
    "swa_num_kv_heads": "swa_num_key_value_heads",
    "full_sinks": "add_full_attention_sink_bias",
    "swa_sinks": "add_swa_attention_sink_bias",
}
NORMALISED_FORMATS = ("mimo-shard/config-v1", NORMALISED_FORMAT)


# ---------------------------------------------------------------------------------- the table
_REQUIRED = object()
_TF_ATTENTION = {"full_attention": FULL, "sliding_attention": SLIDING}
_TF_MLP = {"dense": DENSE, "sparse": MOE}
_TF_ATTENTION_NAME = {v: k for k, v in _TF_ATTENTION.items()}
_TF_MLP_NAME = {v: k for k, v in _TF_MLP.items()}
_HUB_ATTENTION = {0: FULL, 1: SLIDING}
_HUB_MLP = {0: DENSE, 1: MOE}
_NUMBER = (int, float)


@dataclass(frozen=True)
class Key:
    """One config field: where each form keeps it, its type, and its default.

    ``hub``/``tf`` are keys of the two forms (``a.b.c`` reaches into nested objects; None: that
    form has no such key). ``read_hub``/``read_tf`` turn a checked value into the field's value
    (given the fields parsed so far). ``default`` is a value or a function of those fields.
    """

    field: str
    hub: str | None
    tf: str | None
    kind: type | tuple[type, ...] = int
    default: Any = _REQUIRED
    read_hub: Callable[[Any, dict[str, Any]], Any] | None = None
    read_tf: Callable[[Any, dict[str, Any]], Any] | None = None


def _pattern(allowed: dict[Any, str]) -> Callable[[Any, dict[str, Any]], tuple[str, ...]]:
    def read(v: Any, got: dict[str, Any]) -> tuple[str, ...]:
        n = got["num_hidden_layers"]
        if len(v) != n:
            raise ValueError(f"has {len(v)} entries but num_hidden_layers is {n}")
        out = []
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, str)) or x not in allowed:
                raise ValueError(f"[{i}] = {x!r}; expected one of {sorted(map(str, allowed))}")
            out.append(allowed[x])
        return tuple(out)

    return read


def _default_layer_types(got: dict[str, Any]) -> tuple[str, ...]:
    n = got["num_hidden_layers"]  # transformers' default rule
    return tuple(FULL if i == 0 or (i + 1) % 6 == 0 else SLIDING for i in range(n))


def _default_swa_kv(got: dict[str, Any]) -> int:
    if not got["_tf_form"]:
        raise ValueError("missing")
    return 2 * got["num_key_value_heads"]  # transformers' rule


def _window_hub(v: int, got: dict[str, Any]) -> int:
    return v + 1  # the hub counts previous tokens; the field counts the query too


def _window_tf(v: int, got: dict[str, Any]) -> int:
    return v if got["_tf_form"] else v + 1  # a hub-form `sliding_window` counts like the hub's


KEYS: tuple[Key, ...] = (
    Key("num_hidden_layers", "num_hidden_layers", "num_hidden_layers"),
    Key("vocab_size", "vocab_size", "vocab_size"),
    Key("hidden_size", "hidden_size", "hidden_size"),
    Key("intermediate_size", "intermediate_size", "intermediate_size"),
    Key("moe_intermediate_size", "moe_intermediate_size", "moe_intermediate_size"),
    Key("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    Key("num_key_value_heads", "num_key_value_heads", "num_key_value_heads"),
    Key("swa_num_attention_heads", "swa_num_attention_heads", None, int,
        lambda g: g["num_attention_heads"]),
    Key("swa_num_key_value_heads", "swa_num_key_value_heads", None, int, _default_swa_kv),
    Key("head_dim", "head_dim", "head_dim", int, 192),
    Key("v_head_dim", "v_head_dim", "v_head_dim", int, 128),
    Key("swa_head_dim", "swa_head_dim", None, int, lambda g: g["head_dim"]),
    Key("swa_v_head_dim", "swa_v_head_dim", None, int, lambda g: g["v_head_dim"]),
    Key("layer_types", "hybrid_layer_pattern", "layer_types", list, _default_layer_types,
        _pattern(_HUB_ATTENTION), _pattern(_TF_ATTENTION)),
    Key("mlp_types", "moe_layer_freq", "mlp_layer_types", list,
        lambda g: (DENSE,) + (MOE,) * (g["num_hidden_layers"] - 1),
        _pattern(_HUB_MLP), _pattern(_TF_MLP)),
    Key("rms_norm_eps", "layernorm_epsilon", "rms_norm_eps", _NUMBER, 1e-5),
    Key("sliding_window", "sliding_window_size", "sliding_window", int, 129,
        _window_hub, _window_tf),
    Key("rope_theta", "rope_theta", "rope_parameters.full_attention.rope_theta", _NUMBER,
        5_000_000.0),
    Key("swa_rope_theta", "swa_rope_theta", "rope_parameters.sliding_attention.rope_theta",
        _NUMBER, 10_000.0),
    Key("partial_rotary_factor", "partial_rotary_factor",
        "rope_parameters.full_attention.partial_rotary_factor", _NUMBER, 0.334),
    Key("attention_value_scale", "attention_value_scale", "attention_value_scale", _NUMBER,
        0.707),
    Key("add_full_attention_sink_bias", "add_full_attention_sink_bias", None, bool, False),
    Key("add_swa_attention_sink_bias", "add_swa_attention_sink_bias", None, bool, True),
    Key("n_routed_experts", "n_routed_experts", "n_routed_experts"),
    Key("num_experts_per_tok", "num_experts_per_tok", "num_experts_per_tok"),
    Key("norm_topk_prob", "norm_topk_prob", "norm_topk_prob", bool, True),
    Key("routed_scaling_factor", "routed_scaling_factor", "routed_scaling_factor", _NUMBER, 1.0),
    Key("max_position_embeddings", "max_position_embeddings", "max_position_embeddings", int,
        262144),
    Key("tie_word_embeddings", "tie_word_embeddings", "tie_word_embeddings", bool, False),
    Key("bos_token_id", "bos_token_id", None, int, None),
    Key("eos_token_id", "eos_token_id", None, (int, list), None,
        lambda v, g: (v[0] if v else None) if isinstance(v, list) else v),
)

# keys whose value this project cannot run: (key, accepted values, what is supported)
UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("n_group", (None, 1), "must be 1 (group-limited routing unsupported)"),
    ("topk_group", (None, 1), "must be 1 (group-limited routing unsupported)"),
    ("scoring_func", (None, "sigmoid"), "only 'sigmoid' is supported"),
    ("topk_method", (None, "noaux_tc"), "only 'noaux_tc' is supported"),
    ("hidden_act", (None, "silu"), "only 'silu' is supported"),
    ("n_shared_experts", (None, 0), "must be null: MiMo-V2-Flash has no shared experts"),
    ("attention_bias", (None, False), "must be false"),
    ("rope_scaling", (None, {}), "rope scaling is unsupported"),
)
_HUB_KEY = {k.field: k.hub or k.tf or k.field for k in KEYS}
_TF_FORM_KEYS = ("layer_types", "rope_parameters", "rms_norm_eps")

# resource bounds checked before anything is sized by the config
LIMITS = {
    "num_hidden_layers": 4096,
    "n_routed_experts": 65536,
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "swa_num_attention_heads": 4096,
    "swa_num_key_value_heads": 4096,
    "head_dim": 4096,
    "v_head_dim": 4096,
    "swa_head_dim": 4096,
    "swa_v_head_dim": 4096,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
}


def hub_key(field: str) -> str:
    """The hub key a field is read from (for messages)."""
    return _HUB_KEY.get(field, field)


# ---------------------------------------------------------------------------------- parsing
def _lookup(d: dict[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _typed(key: str, v: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds:
        raise ConfigError(f"key '{key}' must be {_kind_name(kind)}, got {v!r}")
    if not isinstance(v, kinds):
        raise ConfigError(f"key '{key}' must be {_kind_name(kind)}, got {v!r}")
    if float in kinds and not isinstance(v, bool) and isinstance(v, _NUMBER):
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(f"key '{key}' must be a finite number, got {v!r}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if kind == _NUMBER:
        return "a number"
    return getattr(kind, "__name__", None) or " or ".join(k.__name__ for k in kind)


def _read(key: Key, d: dict[str, Any], got: dict[str, Any]) -> Any:
    """The field's value from the hub key, the transformers key (which must agree), or default."""
    values = []
    for name, read in ((key.hub, key.read_hub), (key.tf, key.read_tf)):
        if name is None:
            continue
        v = _lookup(d, name)
        if v is None:
            continue
        v = _typed(name, v, key.kind)
        if read is not None:
            try:
                v = read(v, got)
            except ValueError as e:
                raise ConfigError(f"key '{name}' {e}") from None
        values.append((name, v))
    if len(values) == 2 and values[0][1] != values[1][1]:
        (a, va), (b, vb) = values
        raise ConfigError(f"keys '{a}' and '{b}' disagree ({va!r} vs {vb!r})")
    if values:
        return values[0][1]
    if key.default is _REQUIRED:
        raise ConfigError(f"missing required key '{key.hub or key.tf}'")
    if callable(key.default):
        try:
            return key.default(got)
        except ValueError:
            raise ConfigError(f"missing required key '{key.hub or key.tf}'") from None
    return key.default


def _check_supported(d: dict[str, Any]) -> None:
    for key, accepted, what in UNSUPPORTED:
        v = d.get(key)
        if v is not None and not any(type(v) is type(a) and v == a for a in accepted):
            raise ConfigError(f"key '{key}' = {v!r}: {what}")
    rp = d.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            raise ConfigError("key 'rope_parameters' must be an object")
        for kind, p in rp.items():
            if not isinstance(p, dict):
                raise ConfigError(f"key 'rope_parameters.{kind}' must be an object")
            if p.get("rope_type", "default") != "default":
                raise ConfigError(
                    f"rope_parameters.{kind}.rope_type {p['rope_type']!r} unsupported"
                )
        swa = _lookup(d, "rope_parameters.sliding_attention.partial_rotary_factor")
        full = _lookup(d, "rope_parameters.full_attention.partial_rotary_factor")
        if swa is not None and full is not None and swa != full:
            raise ConfigError(
                f"keys 'rope_parameters.full_attention.partial_rotary_factor' and "
                f"'rope_parameters.sliding_attention.partial_rotary_factor' disagree "
                f"({full!r} vs {swa!r})"
            )


def _parse(d: dict[str, Any]) -> MiMoConfig:
    _check_supported(d)
    got: dict[str, Any] = {"_tf_form": any(d.get(k) is not None for k in _TF_FORM_KEYS)}
    for key in KEYS:
        got[key.field] = _read(key, d, got)
        limit = LIMITS.get(key.field)
        if limit is not None and not 1 <= got[key.field] <= limit:
            raise ConfigError(f"key '{key.hub or key.tf}' must be in 1..{limit}")
    del got["_tf_form"]
    if not isinstance(got["eos_token_id"], (int, type(None))) or isinstance(
        got["eos_token_id"], bool
    ):
        got["eos_token_id"] = None
    cfg = MiMoConfig(**got, quant=_parse_quant(d.get("quantization_config")))
    _validate(cfg)
    return cfg


def _from_normalised(d: dict[str, Any]) -> MiMoConfig:
    kw = {_V1_NAMES.get(k, k): v for k, v in d.items() if k != "format"}
    names = {f.name for f in fields(MiMoConfig)}
    unknown = set(kw) - names
    if unknown:
        raise ConfigError(f"unknown normalised config keys: {sorted(unknown)}")
    missing = {f.name for f in fields(MiMoConfig) if f.default is not None} - set(kw)
    if missing:
        raise ConfigError(f"normalised config lacks keys {sorted(missing)}")
    try:
        kw["layer_types"] = tuple(kw["layer_types"])
        kw["mlp_types"] = tuple(kw["mlp_types"])
        q = kw.get("quant")
        if q is not None:
            kw["quant"] = QuantSpec(q["fmt"], tuple(q["block"]), tuple(q["ignored_layers"]))
    except (TypeError, KeyError) as e:
        raise ConfigError(f"normalised config is malformed ({e})") from None
    for key in KEYS:
        v = kw[key.field]
        if key.field in ("layer_types", "mlp_types", "eos_token_id", "bos_token_id"):
            continue
        kw[key.field] = _typed(key.field, v, key.kind)
    cfg = MiMoConfig(**kw)
    if set(cfg.layer_types) - {FULL, SLIDING} or set(cfg.mlp_types) - {DENSE, MOE}:
        raise ConfigError("normalised config has unknown layer kinds")
    if len(cfg.layer_types) != cfg.num_hidden_layers or len(cfg.mlp_types) != len(
        cfg.layer_types
    ):
        raise ConfigError("normalised config's layer lists do not match num_hidden_layers")
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
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 4096 for b in block)
    ):
        raise ConfigError(f"quantization_config.weight_block_size = {block!r}; need [rows, cols]")
    ignored = q.get("ignored_layers") or []
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        raise ConfigError("quantization_config.ignored_layers must be a list of module names")
    return QuantSpec(fmt=fmt, block=(block[0], block[1]), ignored_layers=tuple(ignored))


def _validate(c: MiMoConfig) -> None:
    for name, limit in LIMITS.items():
        v = getattr(c, name)
        if not 1 <= v <= limit:
            raise ConfigError(f"key '{hub_key(name)}' must be in 1..{limit}")
    if c.sliding_window < 2:
        raise ConfigError("key 'sliding_window_size' must be >= 1")
    for heads, kv in (
        ("num_attention_heads", "num_key_value_heads"),
        ("swa_num_attention_heads", "swa_num_key_value_heads"),
    ):
        if getattr(c, heads) % getattr(c, kv):
            raise ConfigError(
                f"key '{heads}' ({getattr(c, heads)}) must be a multiple of '{kv}' "
                f"({getattr(c, kv)})"
            )
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
    for name in ("rope_theta", "swa_rope_theta", "attention_value_scale", "routed_scaling_factor"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"key '{hub_key(name)}' must be a positive finite number")
