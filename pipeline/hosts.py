"""Multi-host conversion: which device stores a host holds, and which source bytes it reads.

A deployment whose devices span ``H`` hosts converts on every host independently (no
coordination service): host ``R`` writes the shared store and the stores of its device ranks
(by default the contiguous block ``R*N/H .. (R+1)*N/H - 1``, or an explicit ``--host-devices``
list), and reads only the source tensors those stores are made from.

- :func:`host_selection` resolves ``--hosts``/``--host-rank``/``--host-devices`` and the
  launcher's environment (torchrun ``GROUP_RANK``/``GROUP_WORLD_SIZE``, ``NODE_RANK``/``NNODES``,
  SLURM ``SLURM_NODEID``/``SLURM_NNODES``) into the options' host fields;
- :func:`select_units` keeps the plan's units that write a held store (shared-store units always),
  cutting a unit that writes one piece per rank down to the held ranks' pieces;
- :func:`tensor_ranges` and :func:`download_rule` say, per source file, which byte ranges the
  units read and whether fetching those ranges beats fetching the whole file
  (:data:`WHOLE_FILE_SHARE`);
- :func:`host_table` is the ``--dry-run`` table of every host: devices, bytes read, written, disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from loader.format import SHARED, device_store
from pipeline.errors import InputError
from pipeline.plan import Options, Plan, Unit, parse_indices

WHOLE_FILE_SHARE = 0.5  # a host needing more than this share of a file's bytes fetches it whole
PIECE_PARAMS = ("source_cols", "source_rows")  # per-piece parameters of a one-read unit

# launcher variables: (host rank, host count), first match wins; each pair is one launcher
ENVIRONMENT = (
    ("GROUP_RANK", "GROUP_WORLD_SIZE"),  # torchrun
    ("NODE_RANK", "NNODES"),  # common launch scripts
    ("SLURM_NODEID", "SLURM_NNODES"),  # SLURM
)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r}: not an integer") from None


def environment_hosts(env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """(host rank, host count) from the launcher's environment; None where it says nothing.

    Two launchers' variables that disagree are an error naming both.
    """
    env = os.environ if env is None else env
    rank = count = None
    rank_from = count_from = ""
    for rank_var, count_var in ENVIRONMENT:
        r, c = _env_int(env, rank_var), _env_int(env, count_var)
        if r is not None:
            if rank is not None and r != rank:
                raise InputError(f"{rank_var}={r} disagrees with {rank_from}={rank}")
            rank, rank_from = (r, rank_var) if rank is None else (rank, rank_from)
        if c is not None:
            if count is not None and c != count:
                raise InputError(f"{count_var}={c} disagrees with {count_from}={count}")
            count, count_from = (c, count_var) if count is None else (count, count_from)
    return rank, count


def host_selection(
    devices: int,
    hosts: int | None,
    host_rank: int | None,
    host_devices: str | None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, int, tuple[int, ...] | None]:
    """(host count, host rank, held device ranks or None for all) for these options.

    Explicit options win over the environment; an option that contradicts the environment is an
    error naming both. One host without ``--host-devices`` holds every device (None).
    """
    env_rank, env_count = environment_hosts(env)
    for value, option, env_value, names in (
        (hosts, "--hosts", env_count, "/".join(c for _, c in ENVIRONMENT)),
        (host_rank, "--host-rank", env_rank, "/".join(r for r, _ in ENVIRONMENT)),
    ):
        if value is not None and env_value is not None and value != env_value:
            raise InputError(f"{option} {value} differs from the launcher's {names} ({env_value})")
    count = hosts if hosts is not None else env_count if env_count is not None else 1
    rank = host_rank if host_rank is not None else env_rank if env_rank is not None else 0
    if count < 1:
        raise InputError(f"--hosts {count}: must be >= 1")
    if not 0 <= rank < count:
        raise InputError(f"--host-rank {rank} is outside 0..{count - 1} (--hosts {count})")
    if host_devices is not None:
        held = parse_indices(host_devices, devices, "--host-devices")
        if held is None:
            held = tuple(range(devices))
        if not held:
            raise InputError(f"--host-devices {host_devices!r}: names no device")
        return count, rank, held
    if count == 1:
        return 1, 0, None
    if devices % count:
        raise InputError(
            f"--hosts {count} does not divide --devices {devices}: give --host-devices"
        )
    per = devices // count
    return count, rank, tuple(range(rank * per, (rank + 1) * per))


def with_hosts(options: Options, count: int, rank: int, held: tuple[int, ...] | None) -> Options:
    """``options`` for host ``rank`` of ``count`` holding ``held`` (None: every device)."""
    return replace(options, host_count=count, host_rank=rank, host_devices=held)


def held_stores(options: Options) -> set[str]:
    return {SHARED, *(device_store(r) for r in options.held_devices)}


def _cut(unit: Unit, keep: list[int]) -> Unit:
    """``unit`` writing only its outputs ``keep`` (a one-read unit's per-piece params cut too)."""
    params = dict(unit.params)
    for key in PIECE_PARAMS:
        value = params.get(key)
        if isinstance(value, list) and len(value) == len(unit.outputs) and len(unit.outputs) > 1:
            params[key] = [value[i] for i in keep]
    return replace(unit, outputs=tuple(unit.outputs[i] for i in keep), params=params)


def select_units(plan: Plan) -> Plan:
    """``plan`` cut to the stores its options hold (unchanged when they hold every device).

    A unit is kept when it writes a held store; a unit writing one piece per rank from one read
    (``attn/o``, ``attn/sinks``, dense ``mlp/down``) keeps the held ranks' pieces, in order, and
    still reads its whole source tensor. Unit ids are unchanged.
    """
    if plan.options.host_devices is None:
        return plan
    held = held_stores(plan.options)
    units = []
    for u in plan.units:
        keep = [i for i, a in enumerate(u.outputs) if a.store in held]
        if len(keep) == len(u.outputs):
            units.append(u)
        elif keep:
            units.append(_cut(u, keep))
    return replace(plan, units=units)


# ------------------------------------------------------------------------------ source bytes
def tensor_ranges(
    units: list[Unit], entry_of: Any, file_of: Mapping[str, str]
) -> dict[str, dict[str, tuple[int, int]]]:
    """file -> {tensor: absolute byte range [begin, end)} of every tensor ``units`` read.

    ``entry_of(name)`` gives a tensor's header entry (``begin``/``end``).
    """
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for u in units:
        for name in u.sources:
            e = entry_of(name)
            out.setdefault(file_of[name], {})[name] = (e.begin, e.end)
    return out


def download_rule(needed: int, size: int) -> str:
    """``"whole"`` when ``needed`` bytes are more than :data:`WHOLE_FILE_SHARE` of ``size``,
    else ``"ranges"`` (fetch just those tensors' bytes)."""
    return "whole" if size == 0 or needed > WHOLE_FILE_SHARE * size else "ranges"


def download_bytes(ranges: dict[str, dict[str, tuple[int, int]]], sizes: Mapping[str, int]) -> int:
    """Bytes a Hub source transfers for ``ranges`` under :func:`download_rule` (no headers)."""
    total = 0
    for file, tensors in ranges.items():
        needed = sum(b - a for a, b in tensors.values())
        total += sizes[file] if download_rule(needed, sizes[file]) == "whole" else needed
    return total


def host_table(
    full: Plan,
    count: int,
    held: dict[int, tuple[int, ...]] | None = None,
    checked: Any = None,
    metadata_per_array: int = 1024,
) -> list[dict[str, Any]]:
    """Per host of ``count`` holding contiguous blocks (or only the hosts ``held`` names, with
    their devices): devices, source bytes read (``read_bytes``: distinct tensors;
    ``download_bytes``: what a Hub source transfers, given the headers), bytes written and disk
    needed (written + metadata estimate)."""
    rows = []
    n = full.options.devices
    if held is None:
        held = {r: tuple(range(r * n // count, (r + 1) * n // count)) for r in range(count)}
    for r, devs in sorted(held.items()):
        plan = select_units(replace(full, options=with_hosts(full.options, count, r, devs)))
        tensors = {s for u in plan.units for s in u.sources}
        written = sum(u.out_bytes for u in plan.units)
        arrays = sum(len(u.outputs) for u in plan.units)
        row: dict[str, Any] = {
            "rank": r,
            "devices": list(devs),
            "read_bytes": sum(full.inventory[t].nbytes for t in tensors),
            "write_bytes": written,
            "disk_bytes": written + arrays * metadata_per_array,
        }
        if checked is not None:
            ranges = tensor_ranges(plan.units, checked.entry, checked.weight_map)
            row["download_bytes"] = download_bytes(ranges, checked.file_sizes)
        rows.append(row)
    return rows
