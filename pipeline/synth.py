"""Synthetic MiMo-V2-Flash checkpoints in the exact hub layout, at any size.

``python -m pipeline.synth OUT --preset tiny|small|full-width [--layers N] [--experts N]
[--seed S] [--mtp]`` writes ``config.json`` (hub keys), ``model.safetensors.index.json``, the
per-layer safetensors files with the real names and dtypes (FP8 e4m3fn + 128x128
``weight_scale_inv`` grids, the fused K/V grid on full-attention layers, BF16 ``o_proj``/norms/
embeddings/sinks, F32 router and correction bias) and a small byte-level BPE tokenizer.

Every tensor is drawn from its own seeded generator (seed, tensor name, row chunk), so output
is deterministic and :func:`draw` regenerates any tensor's pre-quantisation values for tests.
Files are written one at a time, tensors in row chunks: memory stays bounded at real shapes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from loader.usage import OneLineUsage, fail
from mimo import names
from mimo.config import ConfigError, MiMoConfig
from mimo.fp8 import ceil_div, fused_kv_row_scales, has_fused_kv, standard_row_scales
from mimo.names import scale_name
from pipeline.fp8 import quantise
from pipeline.inventory import F8, MTP_LAYERS, HubTensor, hub_inventory
from pipeline.safetensors_io import NUMPY_DTYPE, StreamingWriter
from pipeline.tokenizer import write_tokenizer

PROG = "python -m pipeline.synth"

REAL_CONFIG = Path(__file__).resolve().parent.parent / "manifests" / "mimo-v2-flash" / "config.json"
CHUNK_ELEMS = 8 << 20  # elements drawn per generator call (32 MB of float32)

# Presets are overrides of the real hub config.
PRESETS: dict[str, dict] = {
    "tiny": {  # 7 layers (full at 0 and 5), ragged 128-blocks everywhere, runs in about a second
        "vocab_size": 1024,
        "hidden_size": 320,
        "intermediate_size": 384,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 7,
        "num_attention_heads": 8,
        "swa_num_attention_heads": 8,
        "num_key_value_heads": 2,
        "swa_num_key_value_heads": 4,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "sliding_window": 16,
        "sliding_window_size": 16,
        "max_position_embeddings": 4096,
    },
    "small": {  # a few hundred MB: benchmarks and crash tests
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "swa_num_attention_heads": 16,
        "num_key_value_heads": 4,
        "swa_num_key_value_heads": 8,
        "n_routed_experts": 32,
        "num_experts_per_tok": 8,
    },
    "full-width": {  # the real tensor shapes; few layers and experts (a few GB)
        "num_hidden_layers": 6,
        "n_routed_experts": 8,
    },
}


def preset_config(preset: str, layers: int | None = None, experts: int | None = None) -> dict:
    """The hub ``config.json`` dict of a preset, optionally with other layer/expert counts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = json.loads(REAL_CONFIG.read_text())
    cfg.update(copy.deepcopy(PRESETS[preset]))
    n = layers if layers is not None else cfg["num_hidden_layers"]
    if n < 1:
        raise ValueError("--layers must be >= 1")
    cfg["num_hidden_layers"] = n
    cfg["hybrid_layer_pattern"] = [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(n)]
    cfg["moe_layer_freq"] = [0] + [1] * (n - 1)
    cfg["quantization_config"]["ignored_layers"] = [
        f"model.layers.{i}.self_attn.o_proj" for i in range(n)
    ] + ["model.decoder.self_attn.o_proj"]
    if experts is not None:
        if experts < 1:
            raise ValueError("--experts must be >= 1")
        cfg["n_routed_experts"] = experts
        cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], experts)
    return cfg


# ------------------------------------------------------------------------ weight distributions
def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's values, by role: chosen so the model's activations stay tame."""
    fan_in = shape[-1]
    rules = [
        (r"embed_tokens", (0.0, 1.0)),
        (r"lm_head", (0.0, 1.5 / np.sqrt(fan_in))),
        (r"(layernorm|norm|enorm|hnorm)\.weight$", (1.0, 0.1)),
        (r"attention_sink_bias", (0.0, 1.0)),
        (r"e_score_correction_bias", (0.0, 0.05)),
        (r"(o_proj|down_proj|eh_proj)\.weight$", (0.0, 0.5 / np.sqrt(fan_in))),
        (r"\.weight$", (0.0, 1.0 / np.sqrt(fan_in))),
    ]
    for pattern, ms in rules:
        if re.search(pattern, name):
            return ms
    raise AssertionError(name)


def _rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])


def draw(name: str, shape: tuple[int, ...], seed: int, rows: tuple[int, int] | None = None):
    """Values (float32) of tensor ``name`` before quantisation, optionally rows ``[r0, r1)``.

    Rows are drawn in chunks of ``chunk_rows(shape)``, each from its own generator, so any row
    range is reproducible without drawing the whole tensor.
    """
    mean, std = _std(name, shape)
    total = shape[0] if shape else 1
    r0, r1 = rows or (0, total)
    tail = shape[1:]
    step = chunk_rows(shape)
    parts = []
    for c in range(r0 // step, ceil_div(r1, step)):
        c0, c1 = c * step, min((c + 1) * step, total)
        block = _rng(seed, name, c).standard_normal((c1 - c0, *tail), dtype=np.float32)
        parts.append(block[max(r0, c0) - c0 : min(r1, c1) - c0])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    out *= np.float32(std)
    out += np.float32(mean)
    return out


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per generator chunk: a multiple of 128 holding about CHUNK_ELEMS elements."""
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(128, (CHUNK_ELEMS // max(row, 1)) // 128 * 128)


# ------------------------------------------------------------------------------------ writing
def _kv_partner(cfg: MiMoConfig, spec: HubTensor) -> tuple[int, str] | None:
    """(layer, v_proj name) when ``spec`` is a full-layer k_proj quantised by the fused rule."""
    n = names.parse(spec.name)
    if n and n.role == "k_proj" and not n.scale and spec.dtype == F8:
        if has_fused_kv(cfg, cfg.layer(n.layer)):
            return n.layer, names.name("v_proj", n.layer)
    return None


def _write_file(
    w: StreamingWriter, cfg: MiMoConfig, specs: list[HubTensor], seed: int, bar: tqdm
) -> None:
    by_name = {s.name: s for s in specs}
    bm, bn = cfg.quant.block if cfg.quant else (128, 128)
    for spec in specs:
        n = names.parse(spec.name)
        if n is not None and n.scale:
            continue  # written with its weight
        if n is not None and n.role == "v_proj":
            k_spec = by_name.get(names.name("k_proj", n.layer))
            if k_spec is not None and _kv_partner(cfg, k_spec):
                continue  # written with k_proj (fused rule)
        partner = _kv_partner(cfg, spec)
        if partner:
            layer, v_name = partner
            ls = cfg.layer(layer)
            v_spec = by_name[v_name]
            k_map, v_map = fused_kv_row_scales(ls.kv_heads, ls.head_dim, ls.v_head_dim, bm)
            kv = np.concatenate(
                [draw(spec.name, spec.shape, seed), draw(v_name, v_spec.shape, seed)]
            )
            k_grid = by_name[scale_name(spec.name)].shape
            v_grid = by_name[scale_name(v_name)].shape
            codes, scales = quantise(kv, np.concatenate([k_map, v_map]), k_grid[0] + v_grid[0], bn)
            k_rows = spec.shape[0]
            w.write(spec.name, codes[:k_rows])
            w.write(v_name, codes[k_rows:])
            w.write(scale_name(spec.name), scales[: k_grid[0]])
            w.write(scale_name(v_name), scales[k_grid[0] :])
            bar.update(spec.nbytes + v_spec.nbytes)
            continue
        step = chunk_rows(spec.shape)
        total = spec.shape[0]
        row_bytes = spec.nbytes // total
        scale_parts = []
        for r0 in range(0, total, step):
            r1 = min(r0 + step, total)
            vals = draw(spec.name, spec.shape, seed, (r0, r1))
            if spec.dtype == F8:
                rs = standard_row_scales(r1 - r0, bm)
                codes, s = quantise(vals, rs, ceil_div(r1 - r0, bm), bn)
                w.write(spec.name, codes, r0 * row_bytes)
                scale_parts.append(s)
            else:
                w.write(spec.name, vals.astype(NUMPY_DTYPE[spec.dtype]), r0 * row_bytes)
            bar.update((r1 - r0) * row_bytes)
        if spec.dtype == F8:
            w.write(scale_name(spec.name), np.concatenate(scale_parts))


def write_checkpoint(
    out: str | Path, hub_config: dict, seed: int = 0, mtp: bool = False, progress: bool = True
) -> Path:
    """Write a synthetic checkpoint for ``hub_config`` into the empty folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = MiMoConfig.from_dict(hub_config)
    if cfg.quant is None:
        raise ValueError("synthetic checkpoints are FP8: hub_config needs quantization_config")
    ids = write_tokenizer(out, cfg.vocab_size)
    hub_config = dict(hub_config, bos_token_id=None, eos_token_id=ids["<|im_end|>"])
    (out / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
    specs = hub_inventory(cfg, mtp_layers=MTP_LAYERS if mtp else 0)
    by_file: dict[str, list[HubTensor]] = defaultdict(list)
    for s in specs:
        by_file[s.file].append(s)
    total = sum(s.nbytes for s in specs)
    data = sum(s.nbytes for s in specs if not s.name.endswith(names.SCALE_SUFFIX))
    with tqdm(
        total=data,
        unit="B",
        unit_scale=True,
        desc="synthesise",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for file, file_specs in by_file.items():
            w = StreamingWriter(out / file, [(s.name, s.dtype, s.shape) for s in file_specs])
            try:
                _write_file(w, cfg, file_specs, seed, bar)
            except BaseException:
                w.abort()
                raise
            w.close()
    index = {
        "metadata": {"total_size": total},
        "weight_map": {s.name: s.file for s in specs},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


@click.command(
    cls=OneLineUsage,
    prog=PROG,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Presets: tiny (7 layers, hidden 320, 16 experts, ~21 MB), small (8 layers, hidden 1024,"
    " 32 experts, ~400 MB), full-width (the real tensor shapes, 6 layers, 8 experts, ~4.5 GB)."
    " Weights are random: text generated from them is gibberish by design."
)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="tiny",
    show_default=True,
    help="Tensor shapes and default layer/expert counts (see below).",
)
@click.option("--layers", type=int, default=None, help="Decoder layers [default: the preset's].")
@click.option(
    "--experts", type=int, default=None, help="Routed experts per MoE layer [default: preset's]."
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random seed (>= 0); equal seeds, equal bytes.",
)
@click.option("--mtp", is_flag=True, help="Also write the 3 MTP layers (model_mtp.safetensors).")
@click.option("--force", is_flag=True, help="Delete OUT first if it is not empty.")
def main(
    out: Path,
    preset: str,
    layers: int | None,
    experts: int | None,
    seed: int,
    mtp: bool,
    force: bool,
) -> None:
    """Write a synthetic MiMo-V2-Flash checkpoint into OUT, laid out like the Hub's.

    OUT gets config.json (hub keys), model.safetensors.index.json, the per-layer safetensors
    files with the real tensor names and dtypes (FP8 e4m3fn with 128x128 weight_scale_inv
    grids) and a small BPE tokenizer. Convert it with: mimo-shard OUT OUT2 --devices N
    """
    if out.exists() and any(out.iterdir()):
        if not force:
            fail(PROG, f"{out} is not empty (use --force to replace it)")
        shutil.rmtree(out)
    try:
        cfg = preset_config(preset, layers, experts)
        MiMoConfig.from_dict(cfg)  # a config this preset and these counts cannot make
    except (ValueError, ConfigError) as e:
        fail(PROG, str(e))
    created = not out.exists()
    try:
        write_checkpoint(out, cfg, seed=seed, mtp=mtp)
    except BaseException:
        if created or not any(out.iterdir()):  # nothing is left half-written
            shutil.rmtree(out, ignore_errors=True)
        raise
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    click.echo(
        f"wrote {out}: {len(files)} safetensors files, {size / 1e9:.3f} GB ({preset}, seed {seed})"
    )


if __name__ == "__main__":
    main()
