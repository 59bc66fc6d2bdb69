"""Device memory (HBM) plan of a run on Trainium2, and where each rank's process runs.

A trn2.48xlarge has 16 chips; a chip has 96 GiB of HBM and 8 physical NeuronCores. With
``--lnc 1`` a rank owns one physical core and 12 GiB; with ``--lnc 2`` a logical core of two
physical cores and 24 GiB. Per rank the plan counts: weights (its device store plus the shared
store, every rank holds both), KV caches at ``max_seq_len`` in bf16 (a full layer keeps every
position, a sliding layer a ring of ``window - 1``), the activations of the largest bucket, and
kernel scratch (an estimate: the largest intermediate of one fused layer, twice).
"""

from __future__ import annotations

from typing import Any

from mimo.config import FULL, MOE, MiMoConfig

GIB = 1 << 30
CHIP_BYTES = 96 * GIB
CORES_PER_CHIP = 8  # physical NeuronCores
CHIPS = 16  # per trn2.48xlarge
BF16_BYTES, F32_BYTES = 2, 4


class DoesNotFit(ValueError):
    """The plan exceeds the placement's device memory."""


def capacity(lnc: int) -> int:
    """Bytes of HBM one rank (one logical core) owns: 12 GiB at lnc 1, 24 GiB at lnc 2."""
    if lnc not in (1, 2):
        raise ValueError(f"--lnc must be 1 or 2, not {lnc}")
    return CHIP_BYTES // CORES_PER_CHIP * lnc


def core_for_rank(rank: int, world: int, lnc: int, chips: int = CHIPS) -> dict[str, int]:
    """Where rank ``rank`` of ``world`` runs: ranks spread over the chips first (rank r on chip
    ``r % chips`` of its instance), so each chip's HBM serves as few ranks as possible.

    Returns ``instance``, ``chip`` and ``core``, the logical core index on that instance for
    ``NEURON_RT_VISIBLE_CORES`` (``chip * (8 // lnc) + slot``).
    """
    capacity(lnc)  # validates lnc
    per_chip = CORES_PER_CHIP // lnc  # logical cores per chip
    per_instance = chips * per_chip
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    instance, local = divmod(rank, per_instance)
    chip, slot = local % chips, local // chips
    return {"instance": instance, "chip": chip, "core": chip * per_chip + slot}


def kv_bytes(cfg: MiMoConfig, kv_heads: dict[int, int], max_seq_len: int) -> dict[str, int]:
    """bf16 KV cache bytes per rank by layer kind; ``kv_heads`` maps layer -> this rank's KV
    heads."""
    out = {"full": 0, "sliding": 0}
    for spec in cfg.layers:
        rows = max_seq_len if spec.attention == FULL else spec.window - 1
        per_row = kv_heads[spec.index] * (spec.head_dim + spec.v_head_dim) * BF16_BYTES
        out["full" if spec.attention == FULL else "sliding"] += rows * per_row
        if spec.attention != FULL:
            out["sliding"] += rows * 4  # ring positions, int32
    return out


def activation_bytes(cfg: MiMoConfig, bucket: int, local_experts: int) -> dict[str, int]:
    """Activations of one step of ``bucket`` tokens, and the MoE part of the scratch estimate
    (the rank's experts run densely on every token)."""
    h = cfg.hidden_size
    hidden = 2 * bucket * h * F32_BYTES  # the two residual-stream buffers
    logits = bucket * cfg.vocab_size * F32_BYTES  # gathered logits
    moe_inter = local_experts * bucket * 2 * cfg.moe_intermediate_size * F32_BYTES
    expert_out = local_experts * bucket * h * F32_BYTES
    scratch = 2 * (moe_inter + expert_out)
    return {"activations": hidden + logits, "scratch": scratch}


def plan(
    cfg: MiMoConfig,
    weights: dict[str, int],
    kv_heads: dict[int, int],
    devices: int,
    max_seq_len: int,
    lnc: int,
    local_experts: int,
    bucket: int | None = None,
    ranks_per_chip: int | None = None,
) -> dict[str, Any]:
    """The per-rank HBM plan.

    ``weights``: ``{"device": bytes of the rank's largest device store, "shared": bytes of the
    shared store}`` (the manifest's ``bytes.per_device_max`` and ``bytes.shared``). ``bucket``:
    the largest prefill bucket (default ``max_seq_len``). ``ranks_per_chip``: ranks sharing a chip
    (default from :func:`core_for_rank`'s spread). Returns ``per_rank_bytes``,
    ``capacity_bytes``, ``fits``, ``breakdown`` (bytes by item) and the chip check.
    """
    bucket = bucket or max_seq_len
    kv = kv_bytes(cfg, kv_heads, max_seq_len)
    act = activation_bytes(cfg, bucket, local_experts)
    heads = -(-max(s.q_heads for s in cfg.layers) // devices)
    scores = 2 * heads * bucket * max_seq_len * F32_BYTES  # attention scores and probabilities
    act["scratch"] = max(act["scratch"], scores)
    breakdown = {
        "weights (device store)": weights["device"],
        "weights (shared store)": weights["shared"],
        "kv cache, full layers": kv["full"],
        "kv cache, sliding layers": kv["sliding"],
        "activations": act["activations"],
        "kernel scratch (estimate)": act["scratch"],
    }
    per_rank = sum(breakdown.values())
    cap = capacity(lnc)
    if ranks_per_chip is None:
        chips_used = {core_for_rank(r, devices, lnc)["chip"] for r in range(min(devices, 128))}
        ranks_per_chip = -(-min(devices, CHIPS * CORES_PER_CHIP // lnc) // len(chips_used))
    chip_bytes = per_rank * ranks_per_chip
    fits = per_rank <= cap and chip_bytes <= CHIP_BYTES
    return {
        "devices": devices,
        "lnc": lnc,
        "max_seq_len": max_seq_len,
        "per_rank_bytes": per_rank,
        "capacity_bytes": cap,
        "ranks_per_chip": ranks_per_chip,
        "chip_bytes": chip_bytes,
        "chip_capacity_bytes": CHIP_BYTES,
        "fits": fits,
        "breakdown": breakdown,
    }


def render(p: dict[str, Any]) -> str:
    """The plan as text: one line per item, then the total against the capacity."""
    lines = [f"HBM per rank ({p['devices']} ranks, lnc {p['lnc']}, max_seq_len {p['max_seq_len']})"]
    for item, n in p["breakdown"].items():
        lines.append(f"  {item:<28} {n / GIB:8.2f} GiB")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines.append(
        f"  {'total':<28} {p['per_rank_bytes'] / GIB:8.2f} GiB of {p['capacity_bytes'] / GIB:.0f}"
        f" GiB; chip {p['chip_bytes'] / GIB:.1f} of {p['chip_capacity_bytes'] / GIB:.0f} GiB"
        f" ({p['ranks_per_chip']} ranks per chip): {verdict}"
    )
    return "\n".join(lines)


def check(p: dict[str, Any], fp8_experts: bool = False) -> None:
    """Raise :class:`DoesNotFit` with one line naming what to change when ``p`` does not fit."""
    if p["fits"]:
        return
    need, cap = p["per_rank_bytes"] / GIB, p["capacity_bytes"] / GIB
    fixes = [f"more devices than {p['devices']}"]
    if p["lnc"] == 1:
        fixes.append("--lnc 2 (24 GiB per rank)")
    if not fp8_experts:
        fixes.append("FP8 experts (--expert-dtype float8_e4m3)")
    kv = p["breakdown"]["kv cache, full layers"] + p["breakdown"]["kernel scratch (estimate)"]
    if kv > 0.05 * p["per_rank_bytes"]:
        fixes.append(f"a shorter --max-seq-len than {p['max_seq_len']}")
    where = (
        f"{need:.1f} GiB per rank exceeds {cap:.0f} GiB"
        if p["per_rank_bytes"] > p["capacity_bytes"]
        else f"{p['ranks_per_chip']} ranks need {p['chip_bytes'] / GIB:.0f} GiB of a chip's 96 GiB"
    )
    raise DoesNotFit(f"the model does not fit in HBM: {where}; use {', or '.join(fixes)}")


def plan_from_manifest(
    manifest: dict[str, Any], cfg: MiMoConfig, max_seq_len: int, lnc: int, **kw: Any
) -> dict[str, Any]:
    """:func:`plan` from an output's manifest or a ``mimo-shard --dry-run --json`` plan: its byte
    counts, device count and expert count; KV heads per rank from the head split."""
    from mimo.layout import attention_heads

    devices = manifest["options"]["devices"]
    if "bytes" in manifest:  # a dry-run plan
        b = manifest["bytes"]
        weights = {"device": b["per_device_max"], "shared": b["shared"]}
    else:  # an output's manifest
        stores = manifest["stores"]
        device = max(v["bytes"] for s, v in stores.items() if s != "shared")
        weights = {"device": device, "shared": stores["shared"]["bytes"]}
    kv_heads = {}
    for spec in cfg.layers:
        (_, (g0, g1)) = attention_heads(cfg, spec.index, devices)[0]
        kv_heads[spec.index] = g1 - g0
    moe = [s for s in cfg.layers if s.mlp == MOE]
    experts = manifest["options"].get("experts") or cfg.n_routed_experts
    experts = experts if isinstance(experts, int) else len(experts)
    local = -(-experts // devices) if moe else 0
    return plan(cfg, weights, kv_heads, devices, max_seq_len, lnc, local, **kw)
