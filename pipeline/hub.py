"""A Hugging Face Hub repository as a checkpoint source, streamed with bounded disk.

:class:`HubSource` implements the :class:`pipeline.source.Source` interface on top of
huggingface_hub, which does all the talking to the Hub (its cache, ``HF_HOME`` / ``--cache-dir``,
tokens, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` all apply):

- the revision (branch, tag or commit) is resolved to a commit sha once, at construction, and every
  later request names that sha, so a branch that moves during a run cannot mix files;
- small files (config, index, tokenizer) are downloaded into the cache with ``hf_hub_download``;
- :meth:`HubSource.header` reads a safetensors header with two HTTP range requests (the first 8
  bytes, then the JSON header) and validates it against the size in the Hub's metadata, so a dry
  run downloads no tensor data; a file already in the cache is read locally;
- :meth:`HubSource.schedule` starts a download thread that fetches the source files in the order
  the converter needs them, ahead of it, within a bound on the source bytes held on disk; a
  second thread checks each file's size and sha256 against the Hub's metadata (the LFS etag)
  while the next file downloads;
- :meth:`HubSource.release` removes a file from the cache once no pending unit needs it (when
  ``delete_files``), so peak disk is the output plus about two source files;
- :meth:`HubSource.headers` reads many headers at once on a bounded thread pool;
- :meth:`HubSource.want_ranges` names the tensors the run reads per file: a file of which they
  are at most half the bytes (:func:`pipeline.hosts.download_rule`) is not downloaded whole but
  fetched tensor by tensor with HTTP range requests into a sparse local file of the file's size
  (``<cache>/mimo-shard-ranges/``), each range checked against the header's offsets and its
  sha256 recorded (:meth:`HubSource.tensor_sha256`: the Hub has a hash per file only). A side
  file lists the tensors already fetched (with their sha256, re-checked on reuse), so a killed
  run resumes without fetching them again.

A run that is interrupted resumes: files that were completely downloaded are in the cache and are
not downloaded again, and a partial download left by a killed run is removed before the file is
fetched again. Every failure to reach or read the Hub is an :class:`InputError` naming the
repository, the revision and the file.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import (
    _CACHED_NO_EXIST,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import HfFileMetadata, repo_folder_name
from huggingface_hub.utils import (
    WeakFileLock,
    build_hf_headers,
    hf_raise_for_status,
    http_stream_backoff,
)
from tqdm import tqdm

from pipeline import ranges
from pipeline.errors import InputError
from pipeline.hosts import download_rule
from pipeline.safetensors_io import Header, SizeMismatch, header_length, parse_header

LIBRARY = "mimo-shard"
DEFAULT_WINDOW = 2  # with delete_files and no max_disk: files on disk at once (one converting,
# one downloading)
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kmgtp]?)(i?)b?", re.IGNORECASE)
HELD = ("downloading", "verifying", "ready")  # states of a file whose bytes are on disk
HEADER_THREADS = 8  # headers read at once
RANGES_DIR = "mimo-shard-ranges"  # under the cache: sparse files of range-fetched tensors


def parse_size(text: str, option: str = "--max-source-disk") -> int:
    """Bytes in a size such as ``20GB``, ``1.5T``, ``500MiB`` or ``1e10`` (decimal unless ``i``)."""
    m = SIZE.fullmatch(text.strip())
    if m is None:
        raise InputError(f"{option} {text!r}: expected a size such as 20GB, 500MiB or 1e10")
    number, exponent, prefix, binary = m.groups()
    base = 1024 if binary else 1000
    n = float(number) * 10 ** int(exponent or 0) * base ** " kmgtp".index(prefix.lower() or " ")
    if n < 1:
        raise InputError(f"{option} {text!r}: must be at least one byte")
    return int(n)


@dataclass
class _File:
    """A scheduled source file and where its download stands."""

    size: int
    cached: bool  # in the cache when scheduled (nothing to download)
    state: str = "queued"  # queued, downloading, verifying, ready, failed, released
    path: Path | None = None
    error: BaseException | None = None


class _BarShare:
    """A tqdm stand-in that huggingface_hub creates per file: its bytes go to one shared bar."""

    bar: tqdm | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.total = kwargs.get("total")
        self.n = 0

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        if self.bar is not None:
            self.bar.update(int(n or 0))

    def update_transfer(self, n: int | float | None = 1) -> None:
        pass  # network bytes of a Xet download: the bar counts bytes written

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _BarShare:
        return self

    def __exit__(self, *args: Any) -> None:
        pass


class HubSource:
    """The checkpoint in the Hub repository ``repo_id`` at ``revision`` (default: ``main``).

    ``cache_dir`` defaults to huggingface_hub's cache. With ``delete_files`` each file is removed
    from the cache when :meth:`release` says no pending unit needs it. ``max_disk`` (a size such
    as ``"20GB"``) bounds the source bytes on disk at once: downloaded and not yet released, plus
    the one downloading; a single file larger than the bound is still downloaded, alone. Without
    ``max_disk`` the bound is two files when ``delete_files``, else downloads run ahead freely.
    ``progress`` shows a "download" bar (bytes/s, ETA) on stderr.

    Raises :class:`InputError` when the repository or revision does not exist, cannot be
    accessed or the Hub cannot be reached (unless the cache already knows the revision).
    """

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        delete_files: bool = False,
        max_disk: str | int | None = None,
        progress: bool = True,
    ) -> None:
        self.repo_id = repo_id
        self.requested = revision
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.delete_files = delete_files
        self.max_disk = parse_size(max_disk) if isinstance(max_disk, str) else max_disk
        self.progress = progress
        self.sha: str | None = None
        self._cond = threading.Condition()
        self._meta: dict[str, HfFileMetadata] = {}
        self._sizes: dict[str, int] = {}
        self._files: dict[str, _File] = {}
        self._order: list[str] | None = None
        self._wanted: Counter[str] = Counter()  # files fetch() callers are waiting for
        self._failed: BaseException | None = None  # the download thread stopped on this
        self._closed = False
        self._bar: tqdm | None = None
        self._bar_class: type[_BarShare] = _BarShare
        self._verify_queue: queue.Queue[str | None] = queue.Queue()  # downloaded files to check
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}  # file -> tensor -> byte range
        self._tensor_sha: dict[str, str] = {}  # range-fetched tensor -> sha256 of its bytes
        self.sha = self._resolve()

    # ---------------------------------------------------------------------- Source interface
    def describe(self) -> dict[str, Any]:
        return {
            "kind": "hub",
            "repo_id": self.repo_id,
            "revision": self.sha,
            "requested_revision": self.requested,
        }

    def read_small(self, name: str) -> bytes | None:
        """``name`` from the repository (through the cache), or None when the repo lacks it."""
        cached = self._cached(name)
        if cached is _CACHED_NO_EXIST:
            return None
        if cached is None:
            try:
                cached = Path(self._hf_download(name, _BarShare))
            except RemoteEntryNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001 - every Hub failure becomes a clear InputError
                raise self._error(e, name) from None
        self._verify(name, cached)
        return cached.read_bytes()

    def header(self, file: str) -> Header:
        """The validated header of ``file``: two range requests, or the cached file if present."""
        name = self._where(file)
        cached = self._cached(file)
        if isinstance(cached, Path):
            with open(cached, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = header_length(name, size, f.read(8))
                raw = f.read(n)
        else:
            size = self._metadata(file).size
            if size is None:
                raise InputError(f"{name}: the Hub's metadata gives no file size")
            n = header_length(name, size, self._read_range(file, 0, 8))
            raw = self._read_range(file, 8, n)
        if len(raw) < n:
            raise InputError(f"{name}: truncated safetensors header ({len(raw)} of {n} bytes)")
        with self._cond:
            self._sizes[file] = size
        try:
            return parse_header(name, size, raw)
        except SizeMismatch as e:
            if isinstance(cached, Path):
                raise
            raise InputError(
                f"{name}: the file's header disagrees with the Hub's metadata (size {size} bytes): "
                f"{e}"
            ) from None

    def headers(self, files: list[str]) -> dict[str, Header]:
        """:meth:`header` of each of ``files`` (in that order), read ``HEADER_THREADS`` at once;
        the first failing file (in order) raises."""
        if len(files) < 2:
            return {f: self.header(f) for f in files}
        with ThreadPoolExecutor(HEADER_THREADS, thread_name_prefix="hub-header") as pool:
            return dict(zip(files, pool.map(self.header, files), strict=True))

    def want_ranges(self, ranges: dict[str, dict[str, tuple[int, int]]]) -> None:
        """The tensors the run reads, per file: ``{file: {tensor: (begin, end)}}`` (absolute
        offsets from the validated header). Called before :meth:`schedule`: a file not in the
        cache whose needed bytes are at most half of it is then fetched by ranges."""
        for file, tensors in ranges.items():
            needed = sum(b - a for a, b in tensors.values())
            if download_rule(needed, self._size(file)) == "ranges" and not isinstance(
                self._cached(file), Path
            ):
                self._ranges[file] = dict(tensors)

    def tensor_sha256(self, name: str) -> str | None:
        """The sha256 of a range-fetched tensor's bytes (None: its file was fetched whole)."""
        with self._cond:
            return self._tensor_sha.get(name)

    def schedule(self, files: list[str]) -> None:
        """Download ``files`` in this order, ahead of :meth:`fetch`, within the disk bound."""
        with self._cond:
            if self._order is not None:
                raise RuntimeError("schedule() is called once")
            self._order = list(files)
            for f in files:
                self._files[f] = _File(self._disk_size(f), isinstance(self._cached(f), Path))
            total = sum(st.size for st in self._files.values() if not st.cached)
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc="download",
                disable=not self.progress or total == 0,
                file=sys.stderr,
                smoothing=0.1,
            )
            self._bar_class = type("_DownloadBar", (_BarShare,), {"bar": self._bar})
        for target, name in ((self._download_loop, "download"), (self._verify_loop, "verify")):
            threading.Thread(target=target, name=f"hub-{name}", daemon=True).start()

    def ready(self, file: str) -> bool:
        """True when :meth:`fetch` returns (or raises) for ``file`` without waiting."""
        with self._cond:
            st = self._files.get(file)
            if st is None or st.state == "released":
                return False
            return (
                st.state in ("ready", "failed")
                or self._closed
                or (st.state == "queued" and self._failed is not None)
            )

    def fetch(self, file: str) -> Path:
        """A local path holding ``file`` in full, its size and hash checked against the Hub."""
        with self._cond:
            st = self._files.get(file)
            if st is not None and st.state != "released":
                self._wanted[file] += 1
                self._cond.notify_all()
                try:
                    while st.state not in ("ready", "failed"):
                        if self._closed:
                            raise InputError(f"{self._where(file)}: download stopped")
                        if st.state == "queued" and self._failed is not None:
                            raise _again(self._failed)
                        self._cond.wait()
                finally:
                    self._wanted[file] -= 1
                if st.error is not None:
                    raise _again(st.error)
                assert st.path is not None
                return st.path
        path = self._download(file)  # not scheduled: download now, in this thread
        self._verify(file, path)
        with self._cond:
            self._files[file] = _File(self._disk_size(file), False, "ready", path)
        return path

    def release(self, file: str) -> None:
        """No pending unit needs ``file``: with ``delete_files`` remove it from the cache."""
        with self._cond:
            st = self._files.get(file)
            if st is None or st.state != "ready":
                return
            shared = {
                os.path.realpath(o.path)
                for f, o in self._files.items()
                if f != file and o.state in HELD and o.path is not None
            }
        if self.delete_files and st.path is not None:
            self._remove(st.path, keep_blob=os.path.realpath(st.path) in shared)
            if file in self._ranges:
                ranges.sidecar(st.path).unlink(missing_ok=True)
        with self._cond:
            st.state = "released"
            self._cond.notify_all()

    def close(self) -> None:
        """Stop downloading: waiting :meth:`fetch` calls raise, no new download starts."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._bar is not None:
            self._bar.close()

    # ------------------------------------------------------------------------- Hub access
    def _where(self, file: str | None = None) -> str:
        rev = self.requested or "main"
        if self.sha is not None and self.sha != rev:
            rev = f"{rev} ({self.sha[:12]})"
        return f"{self.repo_id}@{rev}" + (f": {file}" if file else "")

    def _resolve(self) -> str:
        try:
            api = HfApi(library_name=LIBRARY, library_version=_version())
            rev = api.resolve_revision(
                self.repo_id, revision=self.requested, cache_dir=self.cache_dir
            )
        except Exception as e:  # noqa: BLE001 - every Hub failure becomes a clear InputError
            raise self._error(e) from None
        return rev.resolved

    def _cached(self, file: str) -> Path | Any | None:
        """The cached copy of ``file`` at our commit, ``_CACHED_NO_EXIST``, or None."""
        hit = try_to_load_from_cache(
            self.repo_id, file, cache_dir=self.cache_dir, revision=self.sha
        )
        return Path(hit) if isinstance(hit, str) else hit

    def _metadata(self, file: str) -> HfFileMetadata:
        """Size, etag and location of ``file`` (one HEAD request, remembered)."""
        with self._cond:
            meta = self._meta.get(file)
        if meta is None:
            try:
                meta = get_hf_file_metadata(
                    hf_hub_url(self.repo_id, file, revision=self.sha),
                    retry_on_errors=True,
                    library_name=LIBRARY,
                    library_version=_version(),
                )
            except Exception as e:  # noqa: BLE001
                raise self._error(e, file) from None
            with self._cond:
                self._meta[file] = meta
        return meta

    def _size(self, file: str) -> int:
        size = self._sizes.get(file)
        return size if size is not None else self._metadata(file).size or 0

    def _disk_size(self, file: str) -> int:
        """Bytes ``file`` occupies on disk once fetched (its needed tensors when by ranges)."""
        tensors = self._ranges.get(file)
        if tensors is None:
            return self._size(file)
        return sum(b - a for a, b in tensors.values())

    def _read_range(self, file: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``file``, by an HTTP range request."""
        url = hf_hub_url(self.repo_id, file, revision=self.sha)
        headers = build_hf_headers(
            library_name=LIBRARY,
            library_version=_version(),
            headers={"Range": f"bytes={start}-{start + length - 1}"},
        )
        out = bytearray()
        try:
            with http_stream_backoff(
                "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as r:
                hf_raise_for_status(r)
                skip = start if r.status_code == 200 else 0  # a server that ignores Range
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    out += chunk
                    if len(out) >= length:
                        break
        except Exception as e:  # noqa: BLE001
            raise self._error(e, file) from None
        return bytes(out[:length])

    def _hf_download(self, file: str, bar_class: type[_BarShare]) -> str:
        return hf_hub_download(
            self.repo_id,
            file,
            revision=self.sha,
            cache_dir=self.cache_dir,
            tqdm_class=bar_class,
            library_name=LIBRARY,
            library_version=_version(),
        )

    def _download(self, file: str) -> Path:
        """``file`` in the cache (downloaded unless already there); Hub failures as InputError."""
        if file in self._ranges:
            return self._download_ranges(file)
        cached = self._cached(file)
        if isinstance(cached, Path):
            return cached
        with self._cond:
            meta = self._meta.get(file)
        if meta is not None and meta.etag:
            self._remove_partials(meta.etag)
        try:
            return Path(self._hf_download(file, self._bar_class))
        except Exception as e:  # noqa: BLE001
            raise self._error(e, file) from None

    def _download_ranges(self, file: str) -> Path:
        """A sparse file of ``file``'s size holding the bytes of its wanted tensors
        (:func:`pipeline.ranges.fill`), under the cache's ``RANGES_DIR``."""
        tensors = self._ranges[file]
        where = self._where(file)
        cache, folder = self._storage()
        path = cache / RANGES_DIR / folder / str(self.sha) / file
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = cache / ".locks" / RANGES_DIR / folder / f"{self.sha}-{file.replace('/', '--')}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            done = ranges.fill(
                path,
                self._size(file),
                tensors,
                lambda start, length: self._read_range(file, start, length),
                where,
                self._bar.update if self._bar is not None else None,
            )
        with self._cond:
            self._tensor_sha.update({t: done[t] for t in tensors})
        return path

    def _storage(self) -> tuple[Path, str]:
        cache = Path(self.cache_dir or constants.HF_HUB_CACHE)
        return cache, repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def _remove_partials(self, etag: str) -> None:
        """Remove what a killed run left of a download of blob ``etag`` (if nobody downloads it)."""
        cache, folder = self._storage()
        partials = list((cache / folder / "blobs").glob(f"{etag}.*.incomplete"))
        if not partials:
            return
        try:
            with WeakFileLock(cache / ".locks" / folder / f"{etag}.lock", timeout=0.5):
                for p in partials:
                    p.unlink(missing_ok=True)
        except TimeoutError:
            pass  # another process is downloading this blob: leave its file alone

    def _remove(self, pointer: Path, keep_blob: bool = False) -> None:
        """Remove ``pointer`` (a snapshot entry) and the blob it links to."""
        blob = Path(os.path.realpath(pointer))
        pointer.unlink(missing_ok=True)
        if blob != pointer and not keep_blob:
            blob.unlink(missing_ok=True)

    def _verify(self, file: str, path: Path) -> None:
        """Check ``path`` against the Hub's size and hash of ``file``; remove it if it differs.

        A file fetched by ranges was checked range by range (its hash covers bytes not fetched).
        """
        if file in self._ranges:
            return
        where = self._where(file)
        size = os.path.getsize(path)
        expected_size = self._sizes.get(file)
        if expected_size is not None and size != expected_size:
            self._remove(path)
            raise InputError(
                f"{where}: the downloaded file has {size} bytes, the Hub's metadata says "
                f"{expected_size}; it was removed from the cache, rerun to download it again"
            )
        with self._cond:
            meta = self._meta.get(file)
        blob = Path(os.path.realpath(path))
        etag = meta.etag if meta is not None and meta.etag else blob.name
        if ranges.SHA256.fullmatch(etag):
            kind, digest = "sha256", _digest(path, hashlib.sha256())
        elif GIT_SHA1.fullmatch(etag):  # a file stored in git, not LFS: its git blob id
            h = hashlib.sha1(usedforsecurity=False)
            h.update(b"blob %d\0" % size)
            kind, digest = "git blob sha1", _digest(path, h)
        else:
            return  # no content hash to compare with
        if digest != etag:
            self._remove(path)
            raise InputError(
                f"{where}: {kind} of the downloaded file is {digest}, the Hub's metadata says "
                f"{etag}; it was removed from the cache, rerun to download it again"
            )

    def _error(self, e: BaseException, file: str | None = None) -> Exception:
        """``e`` (raised by huggingface_hub) as an InputError naming repo, revision and file.

        A local I/O error (an ``OSError`` with an errno, e.g. a full disk) is returned as is.
        """
        if isinstance(e, InputError):
            return e
        if isinstance(e, OSError) and e.errno is not None:
            return e
        if isinstance(e, LocalEntryNotFoundError | RevisionResolutionError) and isinstance(
            e.__cause__, HfHubHTTPError
        ):
            e = e.__cause__  # the Hub answered, with an error
        status = getattr(getattr(e, "response", None), "status_code", None)
        again = "; rerun the same command to resume"
        if isinstance(e, GatedRepoError):
            why = (
                "access denied: the repository is gated; request access on its Hub page, then "
                "log in (`hf auth login`) or set HF_TOKEN"
            )
        elif isinstance(e, RepositoryNotFoundError):
            why = (
                "repository not found (if it is private, log in with `hf auth login` or set "
                "HF_TOKEN to a token that can read it)"
            )
        elif isinstance(e, RevisionNotFoundError):
            why = f"revision {self.requested or 'main'!r} not found in the repository"
        elif isinstance(e, RemoteEntryNotFoundError):
            why = "file not found in the repository"
        elif isinstance(e, HFValidationError):
            why = f"not a valid repository id or revision ({_first_line(e)})"
        elif constants.is_offline_mode() and isinstance(
            e, OfflineModeIsEnabled | LocalEntryNotFoundError | RevisionResolutionError
        ):
            why = "not in the local cache, and HF_HUB_OFFLINE is set"
        elif isinstance(e, HfHubHTTPError) and status in (401, 403):
            why = (
                f"access denied (HTTP {status}): log in with `hf auth login` or set HF_TOKEN to "
                "a token that can read this repository"
            )
        elif isinstance(e, HfHubHTTPError) and status is not None:
            why = f"the Hub answered HTTP {status}{again}"
        elif isinstance(e, LocalEntryNotFoundError | RevisionResolutionError):
            why = f"the Hub could not be reached ({_cause(e)}){again}"
        elif str(e).startswith("Consistency check failed"):
            why = f"the downloaded size disagrees with the Hub's metadata ({_first_line(e)})"
        else:
            why = f"download failed after retries ({_cause(e)}){again}"
        return InputError(f"{self._where(file)}: {why}")

    # ---------------------------------------------------------------------- download thread
    def _admissible(self, st: _File) -> bool:
        """May ``st`` start downloading now, given the files held on disk?"""
        if st.cached or any(self._files[f].state == "queued" for f, n in self._wanted.items() if n):
            return True  # nothing to download, or a unit waits for it (never deadlock)
        held = [o for o in self._files.values() if o.state in HELD]
        if not held:
            return True
        if self.max_disk is not None:
            return sum(o.size for o in held) + st.size <= self.max_disk
        return not self.delete_files or len(held) < DEFAULT_WINDOW

    def _download_loop(self) -> None:
        assert self._order is not None
        for f in self._order:
            st = self._files[f]
            with self._cond:
                while not self._closed and st.state == "queued" and not self._admissible(st):
                    self._cond.wait()
                if self._closed:
                    break
                if st.state != "queued":
                    continue
                st.state = "downloading"
            try:
                path = self._download(f)
            except BaseException as e:  # noqa: BLE001 - handed to fetch() in the unit's thread
                with self._cond:
                    st.state, st.error, self._failed = "failed", e, e
                    self._cond.notify_all()
                break
            with self._cond:
                st.state, st.path = "verifying", path
            self._verify_queue.put(f)
        self._verify_queue.put(None)

    def _verify_loop(self) -> None:
        while (f := self._verify_queue.get()) is not None:
            st = self._files[f]
            assert st.path is not None
            try:
                self._verify(f, st.path)
                state, error = "ready", None
            except BaseException as e:  # noqa: BLE001 - handed to fetch() in the unit's thread
                state, error = "failed", e
            with self._cond:
                st.state, st.error = state, error
                self._cond.notify_all()
        if self._bar is not None:
            self._bar.close()


def _again(e: BaseException) -> BaseException:
    """``e`` to raise in one more thread (an InputError is copied: tracebacks are per raise)."""
    return InputError(str(e)) if isinstance(e, InputError) else e


def _digest(path: Path, h: Any) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cause(e: BaseException) -> str:
    inner = e.__cause__ or e
    return f"{type(inner).__name__}: {_first_line(inner)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _version() -> str:
    from pipeline.manifest import tool_version

    return tool_version()
