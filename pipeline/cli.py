"""``mimo-shard SOURCE OUT --devices N``: the command line of the converter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mimo.config import ConfigError, MiMoConfig
from pipeline.errors import InputError
from pipeline.plan import DTYPES, build_plan, make_options


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
        if revision or delete_source_files or max_source_disk:
            raise InputError(
                f"{spec}: --revision/--delete-source-files/--max-source-disk need a Hub repo id"
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


def default_workers() -> int:
    """One more than the CPUs (a unit blocked on writeback leaves a core idle), at most 4."""
    return min((os.cpu_count() or 1) + 1, 4)


def _looks_like_repo(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.option("--layers", default=None, help="Layer subset, e.g. 0-3 or 0,5,11 (default: all).")
@click.option(
    "--experts", default=None, help="Expert subset for every MoE layer, e.g. 0-7 (default: all)."
)
@click.option(
    "--workers",
    "-j",
    type=int,
    default=None,
    help="Units converted in parallel (default: CPUs + 1, at most 4).",
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(
    source,
    out,
    devices,
    dtype,
    layers,
    experts,
    workers,
    dry_run,
    config_file,
    as_json,
    force,
    revision,
    cache_dir,
    delete_source_files,
    max_source_disk,
    quiet,
) -> None:
    """Convert the MiMo-V2-Flash checkpoint SOURCE (folder or Hub repo id) into stores in OUT."""
    workers = workers or default_workers()
    try:
        if dry_run:
            _dry_run(
                source,
                config_file,
                devices,
                dtype,
                layers,
                experts,
                workers,
                as_json,
                revision,
                cache_dir,
            )
            return
        if config_file is not None or as_json:
            raise InputError("--config and --json go with --dry-run")
        if source is None or out is None:
            raise InputError("SOURCE and OUT are required (or --dry-run --config FILE)")
        from pipeline.convert import convert

        src = _source(
            source, revision, cache_dir, delete_source_files, max_source_disk, progress=not quiet
        )
        summary = convert(
            src,
            out,
            devices,
            dtype=dtype,
            layers=layers,
            experts=experts,
            workers=workers,
            force=force,
            progress=not quiet,
        )
        click.echo(summary.line())
        for warning in summary.warnings:
            click.echo(f"mimo-shard: warning: {warning}", err=True)
    except (InputError, ConfigError) as e:
        click.echo(f"mimo-shard: error: {e}", err=True)
        sys.exit(2)
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


def _dry_run(
    source, config_file, devices, dtype, layers, experts, workers, as_json, revision, cache_dir
):
    from pipeline.convert import make_plan, needed_tensors
    from pipeline.memory import peak_memory
    from pipeline.report import plan_report, plan_summary
    from pipeline.source import open_checked

    if config_file is not None:
        if source is not None:
            raise InputError("--config replaces SOURCE: give one or the other")
        try:
            cfg = MiMoConfig.from_file(config_file)
        except ConfigError as e:
            raise InputError(str(e)) from None
        options = make_options(cfg, devices, dtype, layers, experts)
        plan, origin = build_plan(cfg, options), {"config": config_file.name}
    else:
        if source is None:
            raise InputError("SOURCE is required (or --config FILE)")
        src = _source(source, revision, cache_dir, False, None)
        plan, _ = make_plan(src, devices, dtype, layers, experts)
        open_checked(src, needed_tensors(plan), plan.inventory)  # headers only: validates
        origin = src.describe()
    summary = plan_summary(plan, workers, peak_memory(plan, workers), origin)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(plan_report(summary))


if __name__ == "__main__":
    main()
