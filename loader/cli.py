"""``mimo-manifest show|list|verify|diff|audit``: inspect, verify and compare mimo-shard outputs.

Exit codes: 0 success (verify: all arrays match; diff: identical content; audit: nothing
unexpected), 1 a finding (mismatched arrays, differences, unexpected tensors), 2 unusable input.
``--json`` output is stable: keys are documented in the README and only ever added to.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from loader.audit import audit_report, file_sha256, source_check, source_files
from loader.compare import chunk_checksums, differences
from loader.display import ranges, size
from loader.format import SHARED, device_store
from loader.manifest import (
    LoaderError,
    held_devices,
    held_elsewhere,
    read_arrays,
    read_manifest,
    store_metadata,
)
from loader.summary import kind_summary, summary
from loader.usage import fail
from loader.verify import Problem, check_array

PROG = "mimo-manifest"  # the name error lines start with


def _load(out: Path, arrays: bool = True) -> dict[str, Any]:
    """The manifest, with every store's array records under ``"arrays"`` when ``arrays``."""
    try:
        m = read_manifest(out)
        if arrays:
            m["arrays"] = read_arrays(out, m)
        return m
    except LoaderError as e:
        fail(PROG, str(e))


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
            fail(PROG, e.format_message())
        except click.Abort:
            fail(PROG, "aborted")


@click.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
def main() -> None:
    """Inspect, verify and compare mimo-shard outputs."""


# --------------------------------------------------------------------------------------- show


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
        fail(PROG, f"--device-rank {rank} is outside 0..{n - 1}")
    elsewhere = held_elsewhere(m, rank)
    if elsewhere:
        fail(PROG, f"--device-rank {rank}: {elsewhere}")
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
            fail(PROG, str(e))
        want = m["model"]["config"].get("n_routed_experts")
        if s["model"].get("n_routed_experts") != want:
            have = s["model"].get("n_routed_experts")
            fail(PROG, f"{stats}: statistics of {have} experts; {out} has {want}")
    rows = placement_rows(m, s)
    if png is not None:
        try:
            heatmap(rows, png)
        except (ImportError, ValueError) as e:
            fail(PROG, str(e))
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
        raw, index_sha = file_sha256(index, "the checkpoint index")
        config_sha = None
        if config is not None and config.exists():
            config_sha = file_sha256(config, "the checkpoint config")[1]
    except LoaderError as e:
        fail(PROG, str(e))
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        fail(PROG, f"{index}: cannot read the index ({type(e).__name__}: {e})".splitlines()[0])
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        fail(PROG, f"{index}: 'weight_map' must map tensor names to file names")
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
