"""``mimo-shard SOURCE OUT --devices N``: the command line of the converter."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from loader.usage import OneLineUsage, fail
from mimo.config import ConfigError, MiMoConfig
from pipeline.errors import InputError
from pipeline.plan import DTYPES, EXPERT_DTYPES, build_plan, make_options


def _source(
    spec: str,
    revision: str | None,
    cache_dir: Path | None,
    delete_source_files: bool,
    max_source_disk: str | None,
    progress: bool = False,
):
    """A local folder, or a Hugging Face Hub repo id (``owner/name``) when no such folder exists.

    ``progress`` shows a Hub source's download bar.
    """
    from pipeline.source import LocalSource

    p = Path(spec)
    if p.exists() or revision is None and not _looks_like_repo(spec):
        if revision or delete_source_files or max_source_disk or cache_dir:
            raise InputError(
                f"{spec}: --revision/--cache-dir/--delete-source-files/--max-source-disk need a "
                "Hub repo id (this is a local folder)"
            )
        return LocalSource(p)
    from pipeline.hub import HubSource

    try:
        return HubSource(
            spec,
            revision=revision,
            cache_dir=cache_dir,
            delete_files=delete_source_files,
            max_disk=max_source_disk,
            progress=progress,
        )
    except InputError as e:
        raise InputError(f"{e} (and there is no local folder {spec!r})") from None


PROG = "mimo-shard"  # the name error lines start with


def _freeze_imports() -> None:
    """In the console script (:func:`entry`), what is imported by now lives until exit: the
    collector need not walk it again, during the run or at interpreter exit (numba's object graph
    costs 0.15 s at every exit otherwise). Called in-process (tests), nothing is frozen."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.find_root().obj or {}).get("freeze_imports"):
        gc.freeze()


def _looks_like_repo(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


class _ShardCommand(OneLineUsage):
    """``mimo-shard SOURCE OUT ...``, and ``mimo-shard plan-experts ...`` as a subcommand."""

    def main(self, args=None, prog_name=None, **kwargs):  # noqa: ANN001, ANN201
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["plan-experts"]:
            name = f"{prog_name or 'mimo-shard'} plan-experts"
            return plan_experts.main(args[1:], prog_name=name, **kwargs)
        return super().main(args, prog_name=prog_name, **kwargs)


@click.command(
    cls=_ShardCommand,
    prog=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("source", required=False)
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option(
    "--devices",
    "-n",
    type=int,
    required=True,
    help="Devices to shard for (divides 64 heads and the experts).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="bfloat16",
    show_default=True,
    help="Dtype of the weight matrices (norms, sinks and routers stay float32).",
)
@click.option(
    "--expert-dtype",
    type=click.Choice(EXPERT_DTYPES),
    default="bfloat16",
    show_default=True,
    help="Routed experts: bfloat16 (follows --dtype), or the checkpoint's FP8 codes with block "
    "scales: float8_e4m3fn as is, float8_e4m3 re-encoded for Trainium2.",
)
@click.option("--layers", default=None, help="Layer subset, e.g. 0-3 or 0,5,11 (default: all).")
@click.option(
    "--experts", default=None, help="Expert subset for every MoE layer, e.g. 0-7 (default: all)."
)
@click.option(
    "--workers",
    "-j",
    type=int,
    default=None,
    help="Units converted in parallel (default: CPUs + 2, at most 16 and as many as keep the "
    "estimated peak memory within 2 GB or half the RAM).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; read only the config and headers.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --dry-run: plan from this config.json alone (no SOURCE needed).",
)
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="With --dry-run: the sequence length the HBM plan reserves KV cache for.",
)
@click.option(
    "--lnc",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="With --dry-run: Trainium2 logical cores per rank for the HBM plan (12 or 24 GiB).",
)
@click.option(
    "--force", is_flag=True, help="Replace an output of other options in OUT (start clean)."
)
@click.option("--revision", default=None, help="Hub source: branch, tag or commit.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Hub source: download cache (default: the Hugging Face cache).",
)
@click.option(
    "--delete-source-files",
    is_flag=True,
    help="Hub source: remove each downloaded file once no pending unit needs it.",
)
@click.option(
    "--max-source-disk", default=None, help="Hub source: bound on source bytes on disk, e.g. 20GB."
)
@click.option(
    "--expert-map",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Expert placement per MoE layer (a file of `mimo-shard plan-experts`).",
)
@click.option(
    "--hosts",
    type=int,
    default=None,
    help="Hosts the devices span (default: GROUP_WORLD_SIZE/NNODES/SLURM_NNODES, else 1).",
)
@click.option(
    "--host-rank",
    type=int,
    default=None,
    help="This host (default: GROUP_RANK/NODE_RANK/SLURM_NODEID, else 0): OUT gets the shared "
    "store and this host's block of devices only.",
)
@click.option(
    "--host-devices",
    default=None,
    help="The device ranks this host holds, e.g. 0-7 (default: a contiguous block of N/hosts).",
)
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Convert arrays holding NaN or infinite values (a warning; the manifest records the "
    "counts) instead of failing.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(**options: Any) -> None:
    """Convert the MiMo-V2-Flash checkpoint SOURCE (folder or Hub repo id) into stores in OUT.

    A SOURCE holding manifest.json is a mimo-shard output: OUT is rebuilt from its arrays for
    --devices (and --expert-map), keeping its other options. `mimo-shard plan-experts STATS
    --devices N -o MAP` writes an --expert-map from routing statistics.
    """
    o = SimpleNamespace(**options)  # one attribute per option, named as the parameters above
    if o.workers is not None and o.workers < 1:
        fail(PROG, f"--workers {o.workers}: must be >= 1")
    try:
        if o.dry_run:
            return _dry_run(o)
        if o.config_file is not None or o.as_json:
            raise InputError("--config and --json go with --dry-run")
        if o.source is None or o.out is None:
            raise InputError("SOURCE and OUT are required (or --dry-run --config FILE)")
        if Path(o.source, "manifest.json").is_file():  # an output: reshard it
            return _reshard(o)
        _convert(o)
    except (InputError, ConfigError) as e:
        fail(PROG, str(e))
    except OSError as e:
        click.echo(
            f"mimo-shard: error: {e.strerror or e} ({e.filename or 'output'}); "
            "the output is incomplete and can be resumed",
            err=True,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("mimo-shard: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


def _convert(o: SimpleNamespace) -> None:
    """SOURCE (a checkpoint) into OUT."""
    from pipeline.convert import convert
    from pipeline.hosts import host_selection

    _freeze_imports()
    hosts = host_selection(o.devices, o.hosts, o.host_rank, o.host_devices)
    src = _source(
        o.source, o.revision, o.cache_dir, o.delete_source_files, o.max_source_disk, not o.quiet
    )
    summary = convert(
        src,
        o.out,
        o.devices,
        dtype=o.dtype,
        layers=o.layers,
        experts=o.experts,
        expert_dtype=o.expert_dtype,
        workers=o.workers,
        force=o.force,
        progress=not o.quiet,
        expert_map=o.expert_map,
        hosts=hosts if hosts[2] is not None else None,
        allow_nonfinite=o.allow_nonfinite,
    )
    click.echo(summary.line())
    for warning in summary.warnings:
        click.echo(f"mimo-shard: warning: {warning}", err=True)


def _reshard(o: SimpleNamespace) -> None:
    """SOURCE (a mimo-shard output) rebuilt into OUT for --devices (and --expert-map); the
    options given on the command line must agree with SOURCE's."""
    from pipeline.reshard import reshard

    _freeze_imports()
    ctx = click.get_current_context()
    given = {
        k: getattr(o, k)
        for k in ("dtype", "expert_dtype", "layers", "experts")
        if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT
    }
    summary = reshard(
        Path(o.source), o.out, o.devices, expert_map=o.expert_map, given=given,
        workers=o.workers, force=o.force, progress=not o.quiet,
    )
    click.echo(summary.line())


def _dry_run(o: SimpleNamespace) -> None:
    """The plan of SOURCE (config, index and headers only) or of --config alone."""
    from pipeline.convert import make_plan, needed_tensors, with_expert_map
    from pipeline.hosts import host_selection, host_table
    from pipeline.memory import default_workers, worker_memory, workers_memory
    from pipeline.report import plan_report, plan_summary
    from pipeline.source import open_checked

    if o.config_file is not None:
        if o.source is not None:
            raise InputError("--config replaces SOURCE: give one or the other")
        try:
            cfg = MiMoConfig.from_file(o.config_file)
        except ConfigError as e:
            raise InputError(str(e)) from None
        options = make_options(cfg, o.devices, o.dtype, o.layers, o.experts, o.expert_dtype)
        if o.expert_map is not None:
            options = with_expert_map(options, cfg, o.expert_map)
        plan, origin = build_plan(cfg, options), {"config": o.config_file.name}
    else:
        if o.source is None:
            raise InputError("SOURCE is required (or --config FILE)")
        src = _source(o.source, o.revision, o.cache_dir, False, None)
        plan, _ = make_plan(
            src, o.devices, o.dtype, o.layers, o.experts, o.expert_dtype, o.expert_map
        )
        checked = open_checked(src, needed_tensors(plan), plan.inventory)  # headers: validates
        origin = src.describe()
    count, rank, held = host_selection(o.devices, o.hosts, o.host_rank, o.host_devices)
    per_worker = worker_memory(plan)  # computed once: it walks every unit
    workers = o.workers or default_workers(per_worker)
    summary = plan_summary(
        plan, workers, workers_memory(per_worker, workers), origin, o.max_seq_len, int(o.lnc)
    )
    if count > 1 or held is not None:
        summary["hosts"] = host_table(
            plan, count, None if o.host_devices is None else {rank: held},
            checked if o.config_file is None else None,
        )
    if o.as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(plan_report(summary))


@click.command(
    cls=OneLineUsage,
    prog="mimo-shard plan-experts",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("stats", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--devices", "-n", type=int, required=True, help="Devices (ranks) to place on.")
@click.option(
    "--replicas",
    "-r",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Spare expert slots per rank, filled with replicas of the hottest experts.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="The expert-map file to write.",
)
def plan_experts(stats: Path, devices: int, replicas: int, output: Path) -> None:
    """Balance expert load per rank from routing statistics (mimo-run --record-routing)."""
    from pipeline.placement import plan_experts as plan
    from pipeline.placement import read_stats

    try:
        doc, report = plan(read_stats(stats), devices, replicas)
    except InputError as e:
        fail(PROG, str(e))
    output.write_text(json.dumps(doc, indent=1) + "\n")
    click.echo("layer  max/mean before (contiguous)  after")
    for layer, before, after in report:
        click.echo(f"{layer:>5}  {before:>28.3f}  {after:.3f}")
    slots = len(next(iter(doc["layers"].values()), [[]])[0])
    click.echo(f"wrote {output}: {len(report)} MoE layers, {devices} ranks x {slots} slots")


def entry() -> None:
    """The ``mimo-shard`` console script (and ``python -m pipeline.cli``): :func:`main`, whose
    imports are frozen for the collector once loaded."""
    main(obj={"freeze_imports": True})


if __name__ == "__main__":
    entry()
