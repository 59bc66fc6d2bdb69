"""Crash safety of an output folder: a lock, the run's identity, and a journal of durable units.

``OUT/.mimo-shard/run.json`` records what is being written (a fingerprint of the source and the
options, the stores and files); ``journal.jsonl`` gets one line per finished unit, appended only
after the unit's bytes were made durable (``syncfs``). A rerun with the same fingerprint skips
journaled units; another fingerprint is refused unless ``--force``, which removes what
mimo-shard's own records name (and nothing else). An exclusive ``flock`` on the folder refuses a
second concurrent run; everything OUT holds is inspected while holding it.

OUT may sit on a shared disk, so mimo-shard never follows a symbolic link inside it: a link where
it writes its own file, folder or store is refused (:func:`refuse_link`), and files are created
with ``O_EXCL | O_NOFOLLOW`` under unpredictable temporary names, then renamed into place.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from loader.format import FORMAT, MANIFEST, STATE_DIR, TABLES, table_path
from pipeline.errors import InputError

RUN = "run.json"
JOURNAL = "journal.jsonl"
REPLACING = "replacing.json"  # in the state folder while --force removes an old output
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # atomic_write's, left by a killed run


def refuse_link(path: Path, what: str = "entry") -> None:
    """Raise InputError when ``path`` is a symbolic link (mimo-shard writes it itself)."""
    if os.path.islink(path):
        raise InputError(
            f"{path}: is a symbolic link where mimo-shard writes its own {what}; "
            "refusing to follow it (remove the link)"
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and a rename.

    The temporary file ``.<name>.<random>.tmp`` is created exclusively and never through a
    link; ``path`` itself being a symbolic link is an InputError.
    """
    path = Path(path)
    refuse_link(path, "file")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # matches _TEMPORARY
    fd = os.open(tmp, _CREATE, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


def remove_temporaries(folder: Path) -> None:
    """Delete the regular files :func:`atomic_write` left in ``folder`` when a run was killed."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for p in folder.iterdir():
        if _TEMPORARY.fullmatch(p.name) and stat.S_ISREG(p.lstat().st_mode):
            p.unlink()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of mimo-shard's, or None when absent; damage or a link is an
    InputError."""
    refuse_link(path, "file")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: damaged ({e}); use --force to start over") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: damaged (not a JSON object); use --force to start over")
    return data


def _plain(names: Any) -> list[str]:
    """The plain names directly inside OUT among ``names`` (anything else is ignored)."""
    if not isinstance(names, list | tuple):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in ("..", ".")]


def _named(record: dict[str, Any]) -> list[str]:
    """What a manifest or run record says mimo-shard wrote: its stores and copied files."""
    stores = record.get("stores")
    if isinstance(stores, dict):  # manifest.json: {"shared": {"path": "shared.zarr", ...}}
        stores = [v.get("path") for v in stores.values() if isinstance(v, dict)]
    return _plain(stores) + _plain(record.get("files"))


def _our_store(path: Path) -> bool:
    """A zarr store (not a link) whose root group says it is mimo-shard's."""
    meta = path / "zarr.json"
    if path.is_symlink() or not path.is_dir() or meta.is_symlink() or not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT


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

    def replacing(self) -> dict[str, Any] | None:
        """The record of an interrupted ``--force`` removal, or None."""
        return _read_json(self.state / REPLACING)

    def is_ours(self) -> bool:
        return any(
            p.is_file() for p in (self.path / MANIFEST, self.state / RUN, self.state / REPLACING)
        )

    def check_usable(self) -> None:
        """OUT must be absent, empty, or written by mimo-shard; its own entries never links.

        OUT itself may be a link to a folder (the user's choice)."""
        if (self.path.exists() or self.path.is_symlink()) and not self.path.is_dir():
            raise InputError(f"{self.path}: output path exists and is not a folder")
        if not self.path.is_dir():
            return
        for name, what in ((MANIFEST, "manifest"), (TABLES, "folder"), (STATE_DIR, "folder")):
            refuse_link(self.path / name, what)
        if any(self.path.iterdir()) and not self.is_ours():
            raise InputError(
                f"{self.path}: output folder is not empty and was not written by mimo-shard "
                "(refusing to touch it; choose an empty or new folder)"
            )

    def inspect(self) -> tuple[dict[str, Any] | None, bool]:
        """(the manifest, else the run record, else None; whether the output is complete).

        Call while holding the lock: only then does the answer stay true."""
        manifest = self.manifest()
        if manifest is not None:
            return manifest, True
        return self.run_info(), False

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
    def clean(self) -> None:
        """Remove the old output for ``--force``: only what mimo-shard's own records name.

        Those are the stores and files listed in ``manifest.json`` and ``run.json``, stores
        whose root group says they are mimo-shard's (a damaged manifest lists nothing), the
        manifest, ``manifest.d`` and the state folder's records. The list is first written to
        ``.mimo-shard/replacing.json`` (kept until :meth:`begin`), so an interruption at any
        point leaves an output the next ``--force`` recognises and finishes cleaning.
        ``manifest.json`` goes first: from then on the output no longer claims to be complete.
        """
        names: dict[str, None] = {}
        for read in (self.replacing, self.manifest, self.run_info):
            try:
                record = read()
            except InputError:  # damaged: it names nothing
                record = None
            if record is not None:
                names.update(dict.fromkeys(_plain(record.get("remove")) + _named(record)))
        names.update(dict.fromkeys(p.name for p in self.path.glob("*.zarr") if _our_store(p)))
        remove = [MANIFEST, TABLES, *(n for n in names if n not in (MANIFEST, TABLES, STATE_DIR))]
        for n in remove:
            refuse_link(self.path / n)
        self.state.mkdir(exist_ok=True)
        atomic_write(self.state / REPLACING, json.dumps({"remove": remove}, indent=1).encode())
        for name in remove:
            _remove(self.path / name)
        for p in self.state.iterdir():
            if p.name != REPLACING:
                _remove(p)

    def begin(self, info: dict[str, Any]) -> None:
        """Record the run (``run.json``); an old output's removal is complete from here on."""
        self.state.mkdir(exist_ok=True)
        atomic_write(self.state / RUN, json.dumps(info, indent=2).encode())
        (self.state / REPLACING).unlink(missing_ok=True)
        for folder in (self.path, self.state, self.path / TABLES):
            remove_temporaries(folder)

    def journaled(self) -> dict[str, list[dict[str, Any]]]:
        """unit id -> its arrays' records, for every unit the journal holds (last line wins).

        A torn last line (a crash mid-append) is ignored: that unit is simply redone.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        p = self.state / JOURNAL
        refuse_link(p, "journal")
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
            p = self.state / JOURNAL
            refuse_link(p, "journal")
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._journal = os.fdopen(os.open(p, flags, 0o666), "a")
        for unit, arrays in done:
            self._journal.write(
                json.dumps({"unit": unit, "arrays": arrays}, separators=(",", ":")) + "\n"
            )
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def finish(self, manifest: dict[str, Any], tables: dict[str, bytes]) -> None:
        """Write the stores' array tables, then ``manifest.json`` atomically (the commit point),
        and drop the state folder."""
        refuse_link(self.path / TABLES, "folder")
        (self.path / TABLES).mkdir(exist_ok=True)
        for store, data in tables.items():
            atomic_write(self.path / table_path(store), data)
        atomic_write(self.path / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if not self.state.is_symlink():
            shutil.rmtree(self.state, ignore_errors=True)


def _remove(p: Path) -> None:
    """Remove ``p`` (a folder with everything in it); a link is removed itself, never followed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
