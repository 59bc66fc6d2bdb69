"""The sparse local copy of a remote file of which only some tensors are fetched.

A multi-host conversion or an expert subset needs only some tensors of a shard file: the Hub
source fetches their byte ranges into a sparse file of the remote file's size (only fetched
ranges use disk) and records, in a side file next to it (``<file>.ranges.json``), the sha256 of
each tensor written. A later run reuses a recorded tensor whose bytes on disk still hash as
recorded and fetches the rest. Adjacent tensors are fetched in one request of up to
``SPAN_BYTES``; each answer must be exactly as long as asked, and its bytes are made durable
(fsync) before the side file names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import InputError

SHA256 = re.compile(r"[0-9a-f]{64}")
SPAN_BYTES = 64 << 20  # adjacent tensors fetched in one range request, up to this many bytes

Span = list[tuple[tuple[int, int], str]]  # sorted ((start, end), tensor) of adjacent ranges


def fill(
    path: Path,
    size: int,
    tensors: dict[str, tuple[int, int]],
    read_range: Callable[[int, int], bytes],
    where: str,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Make ``path`` (a file of ``size`` bytes) hold every byte range of ``tensors`` (tensor ->
    (start, end) offsets in the file); return tensor -> sha256 of its bytes.

    ``read_range(start, length)`` fetches bytes of the remote file; ``where`` names it in errors
    (a short answer is an InputError: rerunning fetches it again); ``on_bytes`` counts fetched
    bytes. The caller holds the file's lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # sparse: only fetched ranges use disk
        done = _reusable(fd, _read_sidecar(path), tensors)
        for t, (a, b) in tensors.items():
            if a == b:
                done[t] = hashlib.sha256(b"").hexdigest()
        todo = sorted((r, t) for t, r in tensors.items() if t not in done)
        for span in spans(todo):
            start, end = span[0][0][0], span[-1][0][1]
            data = read_range(start, end - start)
            if len(data) != end - start:
                raise InputError(
                    f"{where}: the Hub sent {len(data)} of the {end - start} bytes at "
                    f"offset {start} (tensor '{span[0][1]}'); rerun to fetch it again"
                )
            _pwrite_all(fd, data, start)
            os.fsync(fd)
            for (a, b), t in span:
                done[t] = hashlib.sha256(data[a - start : b - start]).hexdigest()
            _write_sidecar(path, done)
            if on_bytes is not None:
                on_bytes(len(data))
    finally:
        os.close(fd)
    return done


def spans(todo: Span) -> list[Span]:
    """Sorted (range, tensor) pairs grouped into runs of adjacent ranges of <= SPAN_BYTES."""
    out: list[Span] = []
    for (a, b), t in todo:
        last = out[-1] if out else None
        if last and last[-1][0][1] == a and b - last[0][0][0] <= SPAN_BYTES:
            last.append(((a, b), t))
        else:
            out.append([((a, b), t)])
    return out


def sidecar(path: Path) -> Path:
    """The side file recording which tensors ``path`` holds."""
    return path.with_name(path.name + ".ranges.json")


def _read_sidecar(path: Path) -> dict[str, str]:
    """Tensor -> sha256 of the tensors an earlier run wrote into ``path`` (empty if unknown)."""
    try:
        data = json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and SHA256.fullmatch(v)}


def _write_sidecar(path: Path, done: dict[str, str]) -> None:
    side = sidecar(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(done, sort_keys=True))
    os.replace(tmp, side)


def _reusable(fd: int, recorded: dict[str, str], wanted: dict[str, tuple[int, int]]) -> dict:
    """The recorded tensors among ``wanted`` whose bytes in ``fd`` still hash as recorded."""
    ok: dict[str, str] = {}
    for t, sha in recorded.items():
        if t in wanted:
            a, b = wanted[t]
            if hashlib.sha256(os.pread(fd, b - a, a)).hexdigest() == sha:
                ok[t] = sha
        else:
            ok[t] = sha  # another run's tensor: keep its entry
    return ok


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
