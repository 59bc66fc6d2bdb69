"""Checkpoint sources and the validated view the converter reads through.

A *source* knows how to produce a checkpoint's small files (``config.json``, the index, tokenizer
files), the header of each safetensors file, and each whole file on local disk when the
converter needs its bytes. :class:`LocalSource` reads a folder; :mod:`pipeline.hub` streams a
Hugging Face Hub repository through the same interface.

:func:`open_checked` reads the config, the index and every needed header, and checks all of it
against the tensor inventory before a single output byte is written: a missing file or tensor,
a truncated or malformed file, a dtype or shape that contradicts the config, a missing scale or an
index path escaping the source folder is an :class:`InputError` naming the file and tensor.

A checkpoint is untrusted input. A local source reads only regular files (never a FIFO or device,
which could block or never end) whose real path lies inside the source folder, so a symlink cannot
copy a file from elsewhere into OUT; JSON is bounded in size and nesting. Each local file's
identity (size, mtime, inode) is recorded with its header and checked again whenever the
:class:`Reader` reads it, so a file changed during a run stops the run instead of mixing versions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from mimo import names
from mimo.config import MAX_CONFIG_BYTES, ConfigError, MiMoConfig, load_json_object
from mimo.fp8 import has_fused_kv, kv_grid_rows
from mimo.names import SCALE_SUFFIX
from pipeline.errors import InputError
from pipeline.inventory import HubTensor
from pipeline.safetensors_io import (
    FileId,
    Header,
    TensorEntry,
    open_regular,
    read_header,
    read_rows,
)

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
MAX_SMALL_BYTES = 256 << 20  # a real tokenizer.json is ~10 MB
MAX_INDEX_BYTES = 64 << 20  # the real index is ~7 MB


class Source(Protocol):
    """Where a checkpoint comes from."""

    def describe(self) -> dict[str, Any]:
        """Identity for the manifest: ``kind``, ``path`` or ``repo_id``, ``revision``."""

    def read_small(self, name: str) -> bytes | None:
        """A small top-level file (config, index, tokenizer), or None when absent."""

    def header(self, file: str) -> Header:
        """The validated safetensors header of ``file``."""

    def fetch(self, file: str) -> Path:
        """A local path holding ``file`` in full (may download; blocks until it is there)."""

    def release(self, file: str) -> None:
        """``file`` is no longer needed by this run."""

    def schedule(self, files: list[str]) -> None:
        """The files the run will read, in the order it needs them (a source may prefetch)."""

    def ready(self, file: str) -> bool:
        """Whether :meth:`fetch` of ``file`` would return without waiting."""

    def close(self) -> None:
        """Stop background work (the run failed or ended); later fetches fail fast."""


def safe_relative(name: str, tensor: str) -> str:
    """``name`` as a plain relative path inside the source folder, or an InputError."""
    p = PurePosixPath(name)
    if any(ord(c) < 32 or c == "\x7f" for c in name):  # NUL cannot be opened, newlines mislead
        raise InputError(f"{INDEX}: tensor {tensor!r} maps to {name!r}, not a valid file name")
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name.startswith("~"):
        raise InputError(
            f"{INDEX}: tensor {tensor!r} maps to {name!r}, a path outside the source folder"
        )
    return str(p)


def hf_cache_blobs(root: Path) -> Path | None:
    """The ``blobs`` folder of a Hugging Face cache repository when ``root`` is a snapshot.

    In ``models--ORG--NAME/snapshots/REV`` every file is a symlink into ``../../blobs/``.
    A ``blobs`` that is itself a symlink is not trusted (it could point anywhere).
    """
    snapshots, repo = root.parent, root.parent.parent
    blobs = repo / "blobs"
    if (
        snapshots.name == "snapshots"
        and repo.name.startswith("models--")
        and blobs.is_dir()
        and not blobs.is_symlink()
    ):
        return blobs
    return None


class LocalSource:
    """A checkpoint folder on local disk.

    Every file it reads (weights, config, index, tokenizer files) must be a regular file whose
    real path lies inside the folder, or, when the folder is a Hugging Face cache snapshot (see
    :func:`hf_cache_blobs`), inside that repository's ``blobs`` folder. Anything else is an
    :class:`InputError` naming the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).resolve()
        if not self.root.is_dir():
            raise InputError(f"{path}: source folder does not exist")
        self.blobs = hf_cache_blobs(self.root)
        self._inside = (self.root,) if self.blobs is None else (self.root, self.blobs)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "path": str(self.root), "revision": None}

    def read_small(self, name: str) -> bytes | None:
        """``name`` (at most ``MAX_SMALL_BYTES``), or None when the folder has no such entry."""
        if not os.path.lexists(self.root / name):
            return None
        fd, st = open_regular(self._path(name), name)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_SMALL_BYTES + 1) if st.st_size <= MAX_SMALL_BYTES else b""
        if st.st_size > MAX_SMALL_BYTES or len(data) > MAX_SMALL_BYTES:
            raise InputError(f"{name}: larger than {MAX_SMALL_BYTES} bytes: not a checkpoint file")
        return data

    def _path(self, file: str) -> Path:
        """The real path of ``file``, checked to lie inside the folder (or its cache blobs)."""
        try:
            p = Path(os.path.realpath(self.root / file, strict=True))
        except FileNotFoundError:
            raise InputError(f"{file}: is a symlink to a missing file") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"{file}: symlink loop") from None
            raise InputError(f"{file}: cannot resolve ({e.strerror or e})") from None
        except ValueError as e:  # an embedded NUL
            raise InputError(f"{file!r}: not a valid file name ({e})") from None
        if not any(p.is_relative_to(d) for d in self._inside):  # a symlink pointing elsewhere
            raise InputError(f"{file}: resolves to {p}, outside the source folder {self.root}")
        return p

    def header(self, file: str) -> Header:
        p = self.root / file
        if not os.path.lexists(p):
            raise InputError(f"{p}: file listed in the index is missing")
        return read_header(self._path(file), name=p)

    def fetch(self, file: str) -> Path:
        return self._path(file)

    def release(self, file: str) -> None:
        pass

    def schedule(self, files: list[str]) -> None:
        pass

    def ready(self, file: str) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class ValidatedSource:
    """A source whose config, index and headers passed validation."""

    source: Source
    raw_config: bytes
    config: MiMoConfig
    weight_map: dict[str, str]
    index_sha256: str
    headers: dict[str, Header]  # file -> header, for every file the plan reads
    file_sizes: dict[str, int]
    mtp_layers: int
    file_ids: dict[str, FileId] = field(default_factory=dict)  # local files: size, mtime, inode

    def entry(self, name: str) -> TensorEntry:
        return self.headers[self.weight_map[name]].tensors[name]


def load_config(source: Source) -> tuple[bytes, MiMoConfig]:
    """The source's ``config.json``, verbatim and parsed (bounded in size and nesting)."""
    raw = source.read_small("config.json")
    if raw is None:
        raise InputError("config.json: missing from the source")
    try:
        return raw, MiMoConfig.from_dict(load_json_object(raw, MAX_CONFIG_BYTES))
    except ConfigError as e:
        raise InputError(f"config.json: {e}") from None


def load_index(source: Source) -> tuple[dict[str, str], str]:
    """``weight_map`` and the sha256 of the index file (or of the single file's header)."""
    raw = source.read_small(INDEX)
    if raw is None:  # a single-file checkpoint has no index: its header is the index
        try:
            header = source.header(SINGLE_FILE)
        except InputError:
            raise InputError(f"{INDEX}: missing from the source (and no {SINGLE_FILE})") from None
        names = json.dumps(sorted(header.tensors)).encode()
        return {n: SINGLE_FILE for n in header.tensors}, hashlib.sha256(names).hexdigest()
    try:
        obj = load_json_object(raw, MAX_INDEX_BYTES)
    except ConfigError as e:
        raise InputError(f"{INDEX}: {e}") from None
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise InputError(f"{INDEX}: 'weight_map' must map tensor names to file names")
    return {k: safe_relative(v, k) for k, v in wm.items()}, hashlib.sha256(raw).hexdigest()


def count_mtp_layers(weight_map: dict[str, str]) -> int:
    """MTP layers the index lists (the real checkpoint: 3)."""
    ids = {n.layer for n in map(names.parse, weight_map) if n is not None and n.is_mtp}
    return max(ids) + 1 if ids else 0


def open_checked(
    source: Source,
    needed: list[str],
    inventory: dict[str, HubTensor],
    config: tuple[bytes, MiMoConfig] | None = None,
) -> ValidatedSource:
    """Check the tensors ``needed`` by the plan against the index, headers and ``inventory``."""
    raw, cfg = config or load_config(source)
    weight_map, digest = load_index(source)
    for name in needed:
        if name not in weight_map:
            what = (
                "scale (FP8 weight without its weight_scale_inv)"
                if name.endswith(SCALE_SUFFIX)
                else "tensor"
            )
            raise InputError(f"{INDEX}: {what} '{name}' is missing from the index")
    files = sorted({weight_map[n] for n in needed})
    many = getattr(source, "headers", None)  # a source that reads headers in parallel
    headers = many(files) if many is not None else {f: source.header(f) for f in files}
    for name in needed:
        file = weight_map[name]
        entry = headers[file].tensors.get(name)
        if entry is None:
            raise InputError(f"{file}: tensor '{name}' is listed in the index but not in the file")
        _check_entry(cfg, inventory[name], entry, file)
    sizes = {f: h.size for f, h in headers.items()}
    ids = {f: h.file_id for f, h in headers.items() if h.file_id is not None}
    return ValidatedSource(
        source, raw, cfg, weight_map, digest, headers, sizes, count_mtp_layers(weight_map), ids
    )


def _check_entry(cfg: MiMoConfig, spec: HubTensor, entry: TensorEntry, file: str) -> None:
    where = f"{file}: tensor '{spec.name}'"
    if not spec.allows(entry.dtype):
        raise InputError(f"{where} has dtype {entry.dtype}; the config implies {spec.dtype}")
    allowed = [spec.shape]
    n = names.parse(spec.name)
    if n is not None and n.role == "k_proj" and n.scale and has_fused_kv(cfg, cfg.layer(n.layer)):
        # a full-attention k grid is per-head fused ([8, 32]); a standard grid is accepted too
        layer = cfg.layer(n.layer)
        allowed.append((kv_grid_rows(layer, cfg.quant.block[0]).standard_k, spec.shape[1]))
    if entry.shape not in allowed:
        raise InputError(
            f"{where} has shape {list(entry.shape)}; the config implies {list(spec.shape)}"
        )


# ----------------------------------------------------------------------------------- reading
class Reader:
    """Reads row ranges of validated tensors, from any thread; counts the bytes it read.

    A local file whose identity (:class:`FileId`) differs from the one its header was read with,
    when opened or after any read, is an InputError: the bytes may not match the header.
    """

    def __init__(self, checked: ValidatedSource) -> None:
        self.checked = checked
        self.cfg = checked.config
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd, st = open_regular(self.checked.source.fetch(file), file)
                try:
                    self._check(file, st)
                except InputError:
                    os.close(fd)
                    raise
                self._fds[file] = fd
            return fd

    def _check(self, file: str, st: os.stat_result) -> None:
        want = self.checked.file_ids.get(file)
        if want is not None and FileId.of(st) != want:
            raise InputError(
                f"{file}: changed since its header was read (size, mtime or inode differ); "
                "the source must not change during a conversion"
            )

    def close(self, file: str | None = None) -> None:
        with self._lock:
            for f in [file] if file else list(self._fds):
                fd = self._fds.pop(f, None)
                if fd is not None:
                    os.close(fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checked.entry(name).shape

    def raw(
        self, name: str, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``name`` in its stored dtype (into ``out``'s memory when given)."""
        entry, file = self.checked.entry(name), self.checked.weight_map[name]
        fd = self._fd(file)
        out = read_rows(fd, entry, r0, r1, out)
        self._check(file, os.fstat(fd))  # after the read: its bytes are of the header's version
        with self._lock:
            self.bytes_read += out.nbytes
        return out
