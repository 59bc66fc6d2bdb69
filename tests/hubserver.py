"""A local stand-in for the Hugging Face Hub, speaking what huggingface_hub's downloads use.

Two HTTP servers on 127.0.0.1 (ephemeral ports), like the Hub and its CDN:

- the hub: ``GET /api/models/{repo}[/revision/{rev}]`` (model info: ``sha`` resolves a
  revision), and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``; a file stored in git is answered
  directly (``ETag`` = git blob sha1), an LFS file (``*.safetensors``) with a 302 to the CDN
  carrying ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``; every answer has ``X-Repo-Commit``;
  errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
  ``GatedRepo``) as the Hub does;
- the CDN: ``GET``/``HEAD /cdn/{repo}/{commit}/{file}`` with ``Range`` support (206).

Faults a test can inject: a connection dropped once after N bytes of a file, an outage (every
connection for a file closed without an answer, possibly from that drop on), content or size
that disagrees with the metadata, a whole repository gated, private or failing with HTTP 500,
and a bandwidth limit.
Every request is logged (:class:`Hit`) so tests can count downloads per file;
:meth:`HubServer.byte_ranges` is the access log of the file bytes each GET sent.

:func:`use_hub` points huggingface_hub at a server, in this process (its import-time settings)
and for subprocesses (environment), with a private ``HF_HOME``, no token and no telemetry.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CHUNK = 64 << 10


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    """A model repository with one commit (``refs`` name it) holding ``files``."""

    files: dict[str, bytes]
    sha: str = "1afd314a2406c282e0956375c34a676501c78649"
    refs: dict[str, str] = field(default_factory=dict)
    mode: str = "ok"  # ok | gated | private | error

    def __post_init__(self) -> None:
        self.refs = self.refs or {"main": self.sha}
        self.sha256 = {n: hashlib.sha256(d).hexdigest() for n, d in self.files.items()}

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return cls(files, **kwargs)

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(".safetensors")

    def etag(self, name: str) -> str:
        return self.sha256[name] if self.is_lfs(name) else git_blob_sha1(self.files[name])

    def commit(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev == self.sha else None)


@dataclass
class Hit:
    """One request: ``kind`` is api, resolve or cdn; ``sent`` counts body bytes written."""

    method: str
    kind: str
    path: str
    file: str | None
    range: str | None
    status: int = 0
    sent: int = 0
    start: int = 0  # the body holds bytes [start, end) of a file of ``size`` bytes
    end: int = 0
    size: int = 0
    dropped: bool = False

    @property
    def whole(self) -> bool:
        """A GET that sent the whole file."""
        return (
            self.method == "GET"
            and not self.dropped
            and (self.start, self.end, self.sent) == (0, self.size, self.size)
        )


class HubServer:
    """The hub and CDN servers for ``repos`` (``{repo_id: Repo}``); stop() when done."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.drop_once: dict[str, int] = {}  # file -> drop the next CDN body after this byte
        self.outage: set[str] = set()  # files whose CDN connections close without an answer
        self.down_after_drop = False  # a dropped file then has an outage
        self.corrupt: dict[str, str] = {}  # file -> "content" (a flipped byte) or "size" (+1)
        self.rate: float | None = None  # CDN bytes per second
        self.watch: dict[str, tuple[int, threading.Event]] = {}  # file -> (byte, set when sent)
        self.hub = self._serve("hub")
        self.cdn = self._serve("cdn")
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def _serve(self, role: str) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        server.role = role  # type: ignore[attr-defined]
        threading.Thread(
            target=server.serve_forever, args=(0.02,), daemon=True, name=f"hub-{role}"
        ).start()
        return server

    def stop(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    def log(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)

    def cdn_gets(self, file: str | None = None) -> list[Hit]:
        """GET requests to the CDN (downloads and header reads), of ``file`` if given."""
        with self.lock:
            hits = [h for h in self.hits if h.kind == "cdn" and h.method == "GET"]
        return [h for h in hits if file is None or h.file == file]

    def byte_ranges(self, file: str | None = None) -> list[tuple[str, int, int]]:
        """The access log of file bytes: (file, start, end) each CDN GET sent, in order."""
        return [(h.file or "", h.start, h.start + h.sent) for h in self.cdn_gets(file) if h.sent]

    def bytes_sent(self, file: str | None = None) -> int:
        """File bytes the CDN sent (downloads, ranges and header reads), of ``file`` if given."""
        return sum(end - start for _, start, end in self.byte_ranges(file))

    def clear_log(self) -> None:
        with self.lock:
            self.hits.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args: Any) -> None:
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    # ------------------------------------------------------------------------------ routing
    def _route(self) -> None:
        path = urlsplit(self.path).path
        if self.server.role == "cdn":  # type: ignore[attr-defined]
            m = re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path)
            return self._cdn(m) if m else self._error(404, "EntryNotFound", None, "api")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._api(m.group(1), unquote(m.group(2) or "main"))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        self._error(404, None, None, "api")

    def _repo(self, repo_id: str, hit: Hit) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", None, hit)
        elif repo.mode == "private":
            self._error(401, "RepoNotFound", None, hit)
        elif repo.mode == "error":
            self._error(500, None, None, hit)
        else:
            return repo
        return None

    def _api(self, repo_id: str, rev: str) -> None:
        hit = Hit(self.command, "api", self.path, None, None)
        repo = self._repo(repo_id, hit)
        if repo is None:
            return
        sha = repo.commit(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", None, hit)
        info = {
            "id": repo_id,
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.mode == "gated" else False,
            "siblings": [{"rfilename": n} for n in repo.files],
        }
        self._send(hit, 200, {"Content-Type": "application/json"}, json.dumps(info).encode())

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        hit = Hit(self.command, "resolve", self.path, name, self.headers.get("Range"))
        repo = self._repo(repo_id, hit)
        if repo is None:
            return
        sha = repo.commit(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", None, hit)
        if repo.mode == "gated":
            return self._error(401, "GatedRepo", sha, hit)
        if name not in repo.files:
            return self._error(404, "EntryNotFound", sha, hit)
        data = repo.files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{repo.etag(name)}"'}
        if not repo.is_lfs(name):
            return self._body(hit, data, headers)
        size = len(data) + (1 if self.hub.corrupt.get(name) == "size" else 0)
        headers |= {
            "ETag": f'"{git_blob_sha1(name.encode())}"',  # the LFS pointer's id, as on the Hub
            "X-Linked-Etag": f'"{repo.sha256[name]}"',
            "X-Linked-Size": str(size),
            "Location": f"{self.hub.cdn_url}/cdn/{repo_id}/{sha}/{name}",
        }
        self._send(hit, 302, headers, b"")

    def _cdn(self, m: re.Match[str]) -> None:
        repo_id, sha, name = m.group(1), m.group(2), unquote(m.group(3))
        hit = Hit(self.command, "cdn", self.path, name, self.headers.get("Range"))
        repo = self.hub.repos.get(repo_id)
        if repo is None or sha != repo.sha or name not in repo.files:
            return self._error(404, "EntryNotFound", None, hit)
        if self.command == "GET" and name in self.hub.outage:
            hit.dropped = True
            self.hub.log(hit)
            return self._hang_up()
        data = repo.files[name]
        if self.hub.corrupt.get(name) == "content":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self._body(hit, data, {"ETag": f'"{repo.sha256[name]}"'}, cdn=True)

    # ------------------------------------------------------------------------------ answers
    def _error(self, status: int, code: str | None, sha: str | None, hit: Hit | str) -> None:
        if isinstance(hit, str):
            hit = Hit(self.command, hit, self.path, None, None)
        headers = {"X-Error-Message": f"error {status}"}
        if code:
            headers["X-Error-Code"] = code
        if sha:
            headers["X-Repo-Commit"] = sha
        body = json.dumps({"error": f"{code or 'error'}"}).encode()
        self._send(hit, status, headers | {"Content-Type": "application/json"}, body)

    def _send(self, hit: Hit, status: int, headers: dict[str, str], body: bytes) -> None:
        hit.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            hit.sent = len(body)
        self.hub.log(hit)

    def _body(self, hit: Hit, data: bytes, headers: dict[str, str], cdn: bool = False) -> None:
        """``data`` (or the requested range of it), throttled, with the injected drop."""
        size, start, end = len(data), 0, len(data)
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or not (m.group(1) or m.group(2)):
                return self._error(416, None, None, hit)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            else:
                start = max(size - int(m.group(2)), 0)
            if start >= size:
                return self._error(416, None, None, hit)
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{size}"}
        hit.status, hit.start, hit.end, hit.size = status, start, end, size
        self.send_response(status)
        for k, v in (headers | {"Accept-Ranges": "bytes"}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return self.hub.log(hit)
        drop = self.hub.drop_once.get(hit.file or "") if cdn else None
        if drop is not None and start < drop < end:  # this body crosses the byte: drop it there
            del self.hub.drop_once[hit.file or ""]
        else:
            drop = None
        watch = self.hub.watch.get(hit.file or "") if cdn else None
        pos = start
        try:
            while pos < end:
                n = min(CHUNK, end - pos)
                if drop is not None and pos < drop <= pos + n:
                    n = drop - pos
                self.wfile.write(data[pos : pos + n])
                pos += n
                hit.sent += n
                if watch is not None and pos >= watch[0]:
                    watch[1].set()
                if drop is not None and pos >= drop:
                    hit.dropped = True
                    if self.hub.down_after_drop and hit.file:
                        self.hub.outage.add(hit.file)
                    self.wfile.flush()
                    return self._hang_up()
                if self.hub.rate and cdn:
                    time.sleep(n / self.hub.rate)
        except (BrokenPipeError, ConnectionResetError):
            hit.dropped = True
            self.close_connection = True
        finally:
            self.hub.log(hit)

    def _hang_up(self) -> None:
        """Close the connection abruptly (a network failure, as the client sees it)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def use_hub(monkeypatch: Any, url: str, home: Path) -> dict[str, str]:
    """Point huggingface_hub at ``url`` with ``home`` as ``HF_HOME``; returns the environment.

    Sets the environment (for subprocesses) and the values huggingface_hub read from it when it
    was imported (for this process); no token, offline mode or telemetry from the real
    environment applies. Nothing leaves the machine.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_STORED_TOKENS_PATH",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_OIDC_RESOURCE",
        "HF_OIDC_ID_TOKEN",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_HUB_DOWNLOAD_TIMEOUT",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    _http.close_session()  # a new client: no connection to an earlier server, proxies from env
    return env
