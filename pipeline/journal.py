"""Crash safety of an output folder: a lock, the run's identity, and a journal of durable units.

``OUT/.mimo-shard/run.json`` records what is being written (a fingerprint of the source and the
options); ``journal.jsonl`` gets one line per finished unit, appended only after the unit's bytes
were made durable (``syncfs``). A rerun with the same fingerprint skips journaled units; another
fingerprint is refused unless ``--force``, which removes what mimo-shard wrote (and nothing else).
An exclusive ``flock`` on the folder refuses a second concurrent run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from loader.format import MANIFEST, STATE_DIR, TABLES, table_path
from pipeline.errors import InputError

RUN = "run.json"
JOURNAL = "journal.jsonl"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(path: Path) -> None:
    """Make every write to the filesystem holding ``path`` durable (``syncfs``, else ``sync``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if getattr(_libc, "syncfs", None) is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of mimo-shard's, or None when absent; damage is an InputError."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: damaged ({e}); use --force to start over") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: damaged (not a JSON object); use --force to start over")
    return data


class OutputDir:
    """The output folder of one conversion."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state = self.path / STATE_DIR
        self._lock_fd: int | None = None
        self._journal = None

    # --------------------------------------------------------------------------- inspection
    def manifest(self) -> dict[str, Any] | None:
        return _read_json(self.path / MANIFEST)

    def run_info(self) -> dict[str, Any] | None:
        return _read_json(self.state / RUN)

    def is_ours(self) -> bool:
        return (self.path / MANIFEST).is_file() or (self.state / RUN).is_file()

    def check_usable(self) -> None:
        """OUT must be absent, empty, or written by mimo-shard."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: output path exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.is_ours():
            raise InputError(
                f"{self.path}: output folder is not empty and was not written by mimo-shard "
                "(refusing to touch it; choose an empty or new folder)"
            )

    # ------------------------------------------------------------------------------ locking
    def lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InputError(
                    f"{self.path}: another mimo-shard run is writing this folder"
                ) from None
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ----------------------------------------------------------------------------- lifecycle
    def clean(self, written: list[str]) -> None:
        """Remove what mimo-shard writes: the manifest, state, stores and copied files.

        Only plain names directly inside OUT are removed, whatever ``written`` says.
        """
        plain = [
            n for n in written if isinstance(n, str) and n and "/" not in n and n not in ("..", ".")
        ]
        for name in [MANIFEST, TABLES, STATE_DIR, *plain]:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        for p in self.path.glob("*.zarr"):
            shutil.rmtree(p)

    def begin(self, info: dict[str, Any]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state / RUN, json.dumps(info, indent=2).encode())

    def journaled(self) -> dict[str, list[dict[str, Any]]]:
        """unit id -> its arrays' records, for every unit the journal holds (last line wins).

        A torn last line (a crash mid-append) is ignored: that unit is simply redone.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        p = self.state / JOURNAL
        if not p.is_file():
            return out
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "unit" in rec:
                out[rec["unit"]] = rec["arrays"]
        return out

    def commit(self, done: list[tuple[str, list[dict[str, Any]]]]) -> None:
        """Make the bytes of ``done`` units durable, then journal them."""
        if not done:
            return
        sync_filesystem(self.path)
        if self._journal is None:
            self._journal = open(self.state / JOURNAL, "a")
        for unit, arrays in done:
            self._journal.write(
                json.dumps({"unit": unit, "arrays": arrays}, separators=(",", ":")) + "\n"
            )
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def finish(self, manifest: dict[str, Any], tables: dict[str, bytes]) -> None:
        """Write the stores' array tables, then ``manifest.json`` atomically (the commit point),
        and drop the state folder."""
        (self.path / TABLES).mkdir(exist_ok=True)
        for store, data in tables.items():
            atomic_write(self.path / table_path(store), data)
        atomic_write(self.path / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        shutil.rmtree(self.state, ignore_errors=True)
