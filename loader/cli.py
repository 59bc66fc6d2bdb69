"""``mimo-manifest show|list|verify|diff|audit``: inspect, verify and compare mimo-shard outputs.

Exit codes: 0 success (verify: all arrays match; diff: identical content; audit: nothing
unexpected), 1 a finding (mismatched arrays, differences, unexpected tensors), 2 unusable input.
``--json`` output is stable: keys are documented in the README and only ever added to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import click
from tqdm import tqdm

from loader.display import ranges, size
from loader.format import SHARED, device_store
from loader.manifest import (
    INDEX,
    LoaderError,
    held_devices,
    held_elsewhere,
    read_arrays,
    read_manifest,
    read_regular,
    store_metadata,
)
from loader.verify import Problem, check_array, chunk_crc32
from mimo.config import FULL, MOE, MiMoConfig
from mimo.layout import ARRAYS


def _load(out: Path, arrays: bool = True) -> dict[str, Any]:
    """The manifest, with every store's array records under ``"arrays"`` when ``arrays``."""
    try:
        m = read_manifest(out)
        if arrays:
            m["arrays"] = read_arrays(out, m)
        return m
    except LoaderError as e:
        _fail(str(e))


def _fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit code 2."""
    click.echo(f"mimo-manifest: error: {message}", err=True)
    sys.exit(2)


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _OneLineErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except _NoArgsIsHelp as e:  # no command given: the help text, as click prints it
            click.echo(e.format_message())
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message())
        except click.Abort:
            _fail("aborted")


@click.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
def main() -> None:
    """Inspect, verify and compare mimo-shard outputs."""


# --------------------------------------------------------------------------------------- show
def summary(out: Path, m: dict[str, Any]) -> dict[str, Any]:
    """The ``show --json`` document."""
    cfg = MiMoConfig.from_dict(m["model"]["config"])
    o, src = m["options"], m["source"]
    layers = o["layers"] if o["layers"] is not None else list(range(cfg.num_hidden_layers))
    devices = {k: v for k, v in m["stores"].items() if k != SHARED}
    emap = m["layout"]["expert_map"]
    per_device = sorted({len(v[0]) for v in emap.values()}) if emap else []
    full = [i for i in layers if cfg.layer_types[i] == FULL]
    q_per_device = {cfg.layer(i).q_heads // o["devices"] for i in layers}
    return {
        "out": str(out),
        "format_version": m["format_version"],
        "tool": m["tool"],
        "created": m["created"],
        "model": {
            "architecture": m["model"]["architecture"],
            "layers": cfg.num_hidden_layers,
            "full_attention_layers": [
                i for i in range(cfg.num_hidden_layers) if cfg.layer_types[i] == FULL
            ],
            "experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
        },
        "source": {
            "kind": src["kind"],
            "location": src.get("repo_id") or src.get("path"),
            "revision": src.get("revision"),
            "index_sha256": src["index_sha256"],
            "files": len(src["files"]),
            "mtp_layers_skipped": src["mtp_layers"],
        },
        "options": o,
        "subsets": {"layers": o["layers"], "experts": o["experts"]},
        "layout": {
            "devices": o["devices"],
            "query_heads_per_device": sorted(q_per_device),
            "kv_heads_replicated": any(cfg.layer(i).kv_heads < o["devices"] for i in layers),
            "experts_per_device_per_layer": per_device,
            "moe_layers": len(emap),
            "contiguous_expert_map": all(
                b == list(range(b[0], b[0] + len(b))) for v in emap.values() for b in v
            ),
            "vocab_per_device": m["layout"]["vocab"][0][1] - m["layout"]["vocab"][0][0],
            "converted_layers": len(layers),
            "converted_full_attention_layers": len(full),
            "converted_moe_layers": sum(cfg.mlp_types[i] == MOE for i in layers),
        },
        "stores": {
            "shared": m["stores"][SHARED],
            "device_bytes_min": min(v["bytes"] for v in devices.values()),
            "device_bytes_max": max(v["bytes"] for v in devices.values()),
            "device_arrays_max": max(v["arrays"] for v in devices.values()),
        },
        "totals": m["totals"],
        **({"hosts": m["hosts"]} if "hosts" in m else {}),
    }


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(out: Path, as_json: bool) -> None:
    """Summarise the output OUT: model, source, options, layout, sizes."""
    m = _load(out, arrays=False)
    s = summary(out, m)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    mo, so, o, la, st = s["model"], s["source"], s["options"], s["layout"], s["stores"]
    rev = f" @ {so['revision']}" if so["revision"] else ""
    rows = [
        (
            "output",
            f"{out} (complete; format {s['format_version']}, {s['tool']['name']} "
            f"{s['tool']['version']}, {s['created']})",
        ),
        (
            "model",
            f"{mo['architecture']}: {mo['layers']} layers ({len(mo['full_attention_layers'])} "
            f"full attention), {mo['experts']} experts (top {mo['experts_per_token']}), "
            f"hidden {mo['hidden_size']}, vocab {mo['vocab_size']}",
        ),
        (
            "source",
            f"{so['kind']} {so['location']}{rev} (index sha256 {so['index_sha256'][:12]}, "
            f"{so['files']} files, {so['mtp_layers_skipped']} MTP layers not converted)",
        ),
        (
            "options",
            f"devices {o['devices']}, dtype {o['dtype']}, layers "
            f"{ranges(o['layers'])}, experts "
            f"{ranges(o['experts'])}",
        ),
        (
            "attention",
            f"{'/'.join(map(str, la['query_heads_per_device']))} query heads per device"
            + (", KV heads replicated" if la["kv_heads_replicated"] else ""),
        ),
        (
            "experts",
            f"{'/'.join(map(str, la['experts_per_device_per_layer']))} per device on "
            f"{la['moe_layers']} MoE layers "
            f"({'contiguous' if la['contiguous_expert_map'] else 'custom'} expert map)",
        ),
        ("lm_head", f"{la['vocab_per_device']} vocabulary rows per device"),
        ("shared", f"{size(st['shared']['bytes'])} in {st['shared']['arrays']} arrays"),
        (
            "per device",
            f"{size(st['device_bytes_max'])} in {st['device_arrays_max']} arrays"
            + (
                ""
                if st["device_bytes_min"] == st["device_bytes_max"]
                else f" (smallest {size(st['device_bytes_min'])})"
            ),
        ),
        ("total", f"{size(s['totals']['bytes'])} in {s['totals']['arrays']} arrays"),
    ]
    if "hosts" in s:
        h = s["hosts"]
        rows.insert(
            1,
            (
                "host",
                f"{h['rank']} of {h['count']}: holds the shared store and devices "
                f"{ranges(h['devices'])} of {o['devices']} (sizes below: this host's stores)",
            ),
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


# --------------------------------------------------------------------------------------- list
def _select(m: dict[str, Any], rank: int | None) -> list[dict[str, Any]]:
    if rank is None:
        return m["arrays"]
    n = m["options"]["devices"]
    if not 0 <= rank < n:
        _fail(f"--device-rank {rank} is outside 0..{n - 1}")
    elsewhere = held_elsewhere(m, rank)
    if elsewhere:
        _fail(f"--device-rank {rank}: {elsewhere}")
    stores = {SHARED, device_store(rank)}
    return [a for a in m["arrays"] if a["store"] in stores]


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--stats",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Routing statistics (mimo-run --record-routing): add each rank's load per layer.",
)
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --stats: draw per-rank load / mean load as a heatmap (extra 'plot').",
)
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def experts(out: Path, stats: Path | None, png: Path | None, as_json: bool) -> None:
    """The expert placement: per MoE layer, each rank's expert ids (and loads with --stats)."""
    from loader.experts import heatmap, placement_rows, render
    from mimo import routing

    m = _load(out, arrays=False)
    s = None
    if stats is not None:
        try:
            s = routing.read(stats)
        except routing.StatsError as e:
            _fail(str(e))
        want = m["model"]["config"].get("n_routed_experts")
        if s["model"].get("n_routed_experts") != want:
            have = s["model"].get("n_routed_experts")
            _fail(f"{stats}: statistics of {have} experts; {out} has {want}")
    rows = placement_rows(m, s)
    if png is not None:
        try:
            heatmap(rows, png)
        except (ImportError, ValueError) as e:
            _fail(str(e))
    if as_json:
        click.echo(json.dumps({"layers": rows}, indent=1))
    else:
        for line in render(rows):
            click.echo(line)


@main.command("list")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--device-rank",
    type=click.IntRange(min=0),
    default=None,
    help="Only the shared arrays and this device's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest records as JSON.")
@click.option(
    "--kinds",
    is_flag=True,
    help="One line per kind of array of the layout table (mimo/layout.py): count and bytes.",
)
def list_arrays(out: Path, device_rank: int | None, as_json: bool, kinds: bool) -> None:
    """List arrays with shape, dtype, bytes, transform and sources."""
    arrays = _select(_load(out), device_rank)
    if kinds:
        _list_kinds(arrays, as_json)
        return
    if as_json:
        keys = ("store", "path", "shape", "dtype", "bytes", "checksum", "transform", "sources")
        click.echo(json.dumps([{k: a[k] for k in keys} for a in arrays], indent=1))
        return
    rows = []
    for a in arrays:
        src = a["sources"]
        first = "-" if not src else src[0] if len(src) == 1 else f"{src[0]} (+{len(src) - 1})"
        rows.append(
            (
                a["store"],
                a["path"],
                "x".join(map(str, a["shape"])),
                a["dtype"],
                f"{a['bytes']:,}",
                a["transform"]["name"],
                first,
            )
        )
    head = ("store", "path", "shape", "dtype", "bytes", "transform", "sources")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {2, 4}
    for r in [head, *rows]:
        click.echo(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )


def kind_summary(arrays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Arrays grouped by their layout row (``mimo.layout.ARRAYS``), table order: the row's path
    template, store, split, array count and bytes; rows the output lacks are left out."""
    by_path = {}
    for a in arrays:
        key = re.sub(r"^layers/\d+/", "layers/{layer}/", a["path"])
        by_path.setdefault(key, []).append(a)
    rows = []
    for k in ARRAYS:
        found = by_path.get(k.path, [])
        if found:
            rows.append(
                {
                    "kind": k.path,
                    "store": k.store,
                    "split": k.split,
                    "arrays": len(found),
                    "bytes": sum(a["bytes"] for a in found),
                    "dtypes": sorted({a["dtype"] for a in found}),
                }
            )
    return rows


def _list_kinds(arrays: list[dict[str, Any]], as_json: bool) -> None:
    rows = kind_summary(arrays)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    width = max(len(r["kind"]) for r in rows)
    for r in rows:
        click.echo(
            f"{r['kind']:<{width}}  {r['store']:<6}  {r['split']:<12}  {r['arrays']:>6} arrays  "
            f"{size(r['bytes']):>10}  {'/'.join(r['dtypes'])}"
        )


# ------------------------------------------------------------------------------------- verify
@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--device-rank",
    type=click.IntRange(min=0),
    default=None,
    help="Only the shared arrays and this device's.",
)
@click.option(
    "--workers",
    "-j",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Files checksummed in parallel.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(out: Path, device_rank: int | None, workers: int, quiet: bool) -> None:
    """Recompute every checksum; exit 1 naming each array that is missing, resized or changed."""
    m = _load(out)
    arrays = _select(m, device_rank)
    meta: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for store in sorted({a["store"] for a in arrays}):
        try:
            meta[store] = store_metadata(out, store)
        except LoaderError as e:
            meta[store] = {}
            problems.append(Problem(store, "", "metadata", str(e)))
    total = sum(a["bytes"] for a in arrays)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="verify",
        disable=quiet,
        file=sys.stderr,
    )

    def one(a: dict[str, Any]) -> Problem | None:
        p = check_array(out, a, meta[a["store"]].get(a["path"]), checksum=True)
        bar.update(a["bytes"])
        return p

    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems += [p for p in pool.map(one, arrays) if p is not None]
    bar.close()
    if problems:
        for p in problems:
            click.echo(f"MISMATCH {p}")
        click.echo(f"{len(problems)} of {len(arrays)} arrays do not match the manifest")
        sys.exit(1)
    held = (
        f" (this host's part: the shared store and devices {ranges(held_devices(m))} of "
        f"{m['options']['devices']}; the other hosts' stores are verified on their hosts)"
        if "hosts" in m
        else ""
    )
    click.echo(f"verified {len(arrays)} arrays ({size(total)}): all match the manifest{held}")


# --------------------------------------------------------------------------------------- diff
def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Config fields that differ (manifests of either normalised form compare by meaning)."""
    ca, cb = MiMoConfig.from_dict(a).to_dict(), MiMoConfig.from_dict(b).to_dict()
    return sorted(k for k in ca if k != "format" and ca[k] != cb.get(k))


def differences(
    a: dict[str, Any],
    b: dict[str, Any],
    chunks: dict[tuple[str, str], tuple[str | None, str | None]] | None = None,
) -> dict[str, Any]:
    """The ``diff --json`` document: what differs in content between two manifests.

    ``chunks`` (``diff --verify``): (store, path) -> the CRC32 recomputed from each side's chunk
    file (None: unreadable) for the common arrays; a pair that differs is a ``chunk`` change.
    Without it only the manifests are compared; with it the document adds
    ``"compared": "chunks"``.
    """
    opts = {
        k: {"a": a["options"].get(k), "b": b["options"].get(k)}
        for k in {**a["options"], **b["options"]}
        if a["options"].get(k) != b["options"].get(k)
    }
    cfg = config_differences(a["model"]["config"], b["model"]["config"])
    ia = {(x["store"], x["path"]): x for x in a["arrays"]}
    ib = {(x["store"], x["path"]): x for x in b["arrays"]}
    changed = []
    for key in sorted(ia.keys() & ib.keys()):
        fields = [f for f in ("shape", "dtype", "checksum") if ia[key][f] != ib[key][f]]
        va, vb = {f: ia[key][f] for f in fields}, {f: ib[key][f] for f in fields}
        if chunks is not None and chunks[key][0] != chunks[key][1]:
            fields.append("chunk")
            va["chunk"], vb["chunk"] = (c or "unreadable" for c in chunks[key])
        if fields:
            changed.append({"store": key[0], "path": key[1], "fields": fields, "a": va, "b": vb})
    only_a = [{"store": s, "path": p} for s, p in sorted(ia.keys() - ib.keys())]
    only_b = [{"store": s, "path": p} for s, p in sorted(ib.keys() - ia.keys())]
    same_source = a["source"]["index_sha256"] == b["source"]["index_sha256"]
    return {
        "identical": not (opts or cfg or changed or only_a or only_b),
        "options": opts,
        "config": cfg,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "changed": changed,
        "same_source_index": same_source,
        "arrays": {"a": len(ia), "b": len(ib), "common": len(ia.keys() & ib.keys())},
        **({} if chunks is None else {"compared": "chunks"}),
    }


def chunk_checksums(
    a_out: Path, a: dict[str, Any], b_out: Path, b: dict[str, Any], quiet: bool = True
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(store, path) -> CRC32 recomputed from A's and B's chunk files, for the common arrays."""
    ia = {(x["store"], x["path"]): x for x in a["arrays"]}
    ib = {(x["store"], x["path"]): x for x in b["arrays"]}
    common = sorted(ia.keys() & ib.keys())
    jobs = [(a_out, ia[k]) for k in common] + [(b_out, ib[k]) for k in common]
    bar = tqdm(
        total=sum(r["bytes"] for _, r in jobs),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="diff",
        disable=quiet,
        file=sys.stderr,
    )

    def one(job: tuple[Path, dict[str, Any]]) -> str | None:
        crc = chunk_crc32(*job)
        bar.update(job[1]["bytes"])
        return crc

    with ThreadPoolExecutor(max_workers=2) as pool:
        crcs = list(pool.map(one, jobs))
    bar.close()
    n = len(common)
    return {k: (crcs[i], crcs[n + i]) for i, k in enumerate(common)}


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@click.option(
    "--verify",
    "verify_chunks",
    is_flag=True,
    help="Also recompute both sides' chunk CRC32s and compare the bytes, not just the manifests.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (with --verify).")
def diff(a: Path, b: Path, as_json: bool, verify_chunks: bool, quiet: bool) -> None:
    """Compare two outputs array by array (presence, shape, dtype, checksum) and their options.

    Without --verify only the manifests are compared: a chunk changed on disk after conversion
    is found by --verify (or by ``verify``).
    """
    ma, mb = _load(a), _load(b)
    chunks = chunk_checksums(a, ma, b, mb, quiet or as_json) if verify_chunks else None
    d = differences(ma, mb, chunks)
    if as_json:
        click.echo(json.dumps(d, indent=1))
    else:
        for k, v in d["options"].items():
            click.echo(f"option   {k}: {v['a']} -> {v['b']}")
        for k in d["config"]:
            click.echo(f"config   {k} differs")
        for x in d["only_in_a"]:
            click.echo(f"only A   {x['store']}/{x['path']}")
        for x in d["only_in_b"]:
            click.echo(f"only B   {x['store']}/{x['path']}")
        for x in d["changed"]:
            what = ", ".join(f"{f} {x['a'][f]} -> {x['b'][f]}" for f in x["fields"])
            click.echo(f"changed  {x['store']}/{x['path']}: {what}")
        n = d["arrays"]
        if not d["identical"]:
            verdict = "outputs differ"
        elif chunks is None:
            verdict = "identical content (manifests compared; use --verify to compare chunk bytes)"
        else:
            verdict = "identical content (chunk bytes compared)"
        click.echo(f"{verdict} ({n['common']} common arrays; A {n['a']}, B {n['b']})")
    sys.exit(0 if d["identical"] else 1)


# -------------------------------------------------------------------------------------- audit
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


def audit_report(m: dict[str, Any], weight_map: dict[str, str]) -> dict[str, Any]:
    """Each tensor of the source index: used by which arrays, skipped, or unexpected."""
    used: dict[str, list[str]] = {}
    for a in m["arrays"]:
        for s in a["sources"]:
            used.setdefault(s, []).append(f"{a['store']}/{a['path']}")
    layers, experts = m["options"]["layers"], m["options"]["experts"]
    tensors, reasons = {}, Counter()
    for name in sorted(weight_map):
        if name in used:
            entry = {"status": "used", "arrays": used[name]}
        else:
            why = _skip_reason(name, layers, experts)
            entry = {"status": "skipped", "reason": why} if why else {"status": "unexpected"}
            reasons[why or "unexpected"] += 1
        tensors[name] = entry
    missing = sorted(set(used) - set(weight_map))
    return {
        "tensors": tensors,
        "counts": {
            "total": len(weight_map),
            "used": sum(t["status"] == "used" for t in tensors.values()),
            "skipped": sum(t["status"] == "skipped" for t in tensors.values()),
            "unexpected": sum(t["status"] == "unexpected" for t in tensors.values()),
        },
        "skipped_reasons": {k: v for k, v in sorted(reasons.items()) if k != "unexpected"},
        "sources_missing_from_index": missing,
    }


def _skip_reason(name: str, layers: list[int] | None, experts: list[int] | None) -> str | None:
    if name.startswith("model.mtp."):
        return "MTP layer (multi-token prediction is not converted)"
    lm = _LAYER.match(name)
    if lm and layers is not None and int(lm.group(1)) not in layers:
        return "layer outside the --layers subset"
    em = _EXPERT.match(name)
    if em and experts is not None and int(em.group(1)) not in experts:
        return "expert outside the --experts subset"
    return None


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local Hugging Face cache snapshot of ``repo_id`` at ``revision`` (offline: no network).

    The cache is ``$HF_HUB_CACHE`` when set (read at call time), else huggingface_hub's default.
    """
    from huggingface_hub import snapshot_download

    rev = revision or "main"
    try:
        path = snapshot_download(
            repo_id,
            revision=rev,
            local_files_only=True,
            allow_patterns=["*.json"],
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, an invalid repo id
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoaderError(
            f"{repo_id}: not a folder, and revision {rev} is not in the local Hugging Face cache "
            f"(audit never downloads; {why})"
        ) from None
    return Path(path)


def source_files(m: dict[str, Any], source: str, revision: str | None) -> tuple[Path, Path | None]:
    """(index file, config.json or None) of SOURCE: a folder, an index file, or a cached repo id.

    A repo id's revision defaults to the commit the output was converted from when the output
    came from that repository, else ``main``.
    """
    p = Path(source)
    if p.is_dir():
        return p / INDEX, p / "config.json"
    if p.exists():
        return p, None
    if not _REPO_ID.match(source):
        raise LoaderError(f"{source}: no such folder or file, and not a Hub repo id (org/name)")
    src = m["source"]
    if revision is None and src.get("repo_id") == source:
        revision = src.get("revision")
    snap = cached_snapshot(source, revision)
    return snap / INDEX, snap / "config.json"


def _sha256(path: Path, what: str) -> tuple[bytes, str]:
    data = read_regular(path, what)
    return data, hashlib.sha256(data).hexdigest()


def source_check(
    m: dict[str, Any], index_sha256: str, config_sha256: str | None
) -> dict[str, dict[str, Any]]:
    """SOURCE's index (and config) sha256 against those OUT recorded, each with ``match``.

    ``audit --json`` lists the mismatched ones under ``source_mismatch``.
    """
    src = m["source"]
    out = {"index_sha256": {"output": src["index_sha256"], "source": index_sha256}}
    if config_sha256 is not None:
        out["config_sha256"] = {"output": src["config_sha256"], "source": config_sha256}
    for v in out.values():
        v["match"] = v["output"] == v["source"]
    return out


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("source")
@click.option(
    "--revision",
    default=None,
    help="Revision of a Hub repo id SOURCE (default: the one OUT was converted from, else main).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every tensor's status as JSON.")
def audit(out: Path, source: str, revision: str | None, as_json: bool) -> None:
    """Account for every tensor of SOURCE's index: used, deliberately skipped, or unexpected.

    SOURCE is a checkpoint folder, its index file, or a Hub repo id found in the local cache.
    First checks that SOURCE is the checkpoint OUT was converted from (index and config sha256).
    """
    m = _load(out)
    try:
        index, config = source_files(m, source, revision)
        raw, index_sha = _sha256(index, "the checkpoint index")
        config_sha = None
        if config is not None and config.exists():
            config_sha = _sha256(config, "the checkpoint config")[1]
    except LoaderError as e:
        _fail(str(e))
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        _fail(f"{index}: cannot read the index ({type(e).__name__}: {e})".splitlines()[0])
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        _fail(f"{index}: 'weight_map' must map tensor names to file names")
    r = audit_report(m, weight_map)
    check = source_check(m, index_sha, config_sha)
    mismatched = [k for k, v in check.items() if not v["match"]]
    if mismatched:  # a finding: the key is present only then
        r["source_mismatch"] = {k: check[k] for k in mismatched}
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        for k in mismatched:
            v = check[k]
            what = "index" if k == "index_sha256" else "config.json"
            click.echo(
                f"SOURCE DIFFERS  {what} sha256 {v['source'][:12]} is not the {v['output'][:12]} "
                f"recorded in {out}: {source} is not the checkpoint this output was converted from"
            )
        c = r["counts"]
        click.echo(
            f"{c['total']} source tensors: {c['used']} used, {c['skipped']} skipped, "
            f"{c['unexpected']} unexpected"
        )
        for why, n in r["skipped_reasons"].items():
            click.echo(f"  skipped {n:>6}  {why}")
        for name, t in r["tensors"].items():
            if t["status"] == "unexpected":
                click.echo(f"  UNEXPECTED {name}")
        for name in r["sources_missing_from_index"]:
            click.echo(f"  MISSING FROM INDEX {name}")
    found = mismatched or r["counts"]["unexpected"] or r["sources_missing_from_index"]
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
